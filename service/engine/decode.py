"""Bytes to a PIL image, with the limits checked before any pixel is decoded.

Order: content type, ``Image.open`` restricted to the accepted formats (it checks their magic
bytes and reads the header only), the pixel limit, single frame, then ``load()``. A header
that claims 20000x20000 is refused from its header; a truncated file fails at ``load()`` (400).
The product's input policy (EXIF rotation, mode conversion) is applied later by
``Colorizer.prepare``.

Status per failure (also in the README):
- empty body, undecodable or truncated data, or data that is not an image: 400 ``invalid-image``
- request content type that is not an image (and not ``application/octet-stream``): 415
- an image format outside ``ACCEPTED_FORMATS`` (e.g. PSD, ICO): 415
- more than one frame (animated GIF/PNG/WebP, multi-page TIFF): 415 (send a single frame)
- more pixels than ``max_pixels``: 413 ``image-too-large``
"""

from __future__ import annotations

import io
import logging
import warnings

from PIL import Image, UnidentifiedImageError

from service.core.errors import (
    ImageTooLargeError,
    InvalidImageError,
    UnsupportedMediaTypeError,
)
from service.core.image_header import ACCEPTED_FORMATS, too_large

log = logging.getLogger(__name__)


def configure_pil(max_pixels: int) -> None:
    """Make Pillow's own bomb guard agree with ours; call once at start-up (process-wide).

    Pillow raises ``DecompressionBombError`` from ``Image.open`` above twice MAX_IMAGE_PIXELS and
    only warns between; ``decode_image`` refuses everything above ``max_pixels`` itself, so the
    warning is silenced.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode one single-frame image of an accepted format, refusing bombs before decoding."""
    if not data:
        raise InvalidImageError("the image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        log.info("Pillow refused the image: %s", exc)
        raise ImageTooLargeError(
            f"image is over the limit of {max_pixels} pixels; send a smaller image"
        ) from exc
    except UnidentifiedImageError as exc:
        other = _identify_other_format(data)
        if other is not None:
            raise UnsupportedMediaTypeError(
                f"{other} images are not supported; send one of {', '.join(ACCEPTED_FORMATS)}"
            ) from exc
        raise InvalidImageError(
            "the data is not a decodable image (truncated, corrupt, or not an image at all)"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        log.info("Pillow could not read the image header: %s", exc)
        raise InvalidImageError("the image header is corrupt") from exc
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"the image claims an empty size {width}x{height}")
    if width * height > max_pixels:
        raise too_large(width, height, max_pixels)
    try:
        frames = getattr(image, "n_frames", 1) if image.format == "TIFF" else 1
        animated = bool(getattr(image, "is_animated", False)) or frames > 1
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        log.info("Pillow could not count the frames: %s", exc)
        raise InvalidImageError("the image is corrupt (its frames cannot be read)") from exc
    if animated:
        raise UnsupportedMediaTypeError(
            f"animated or multi-frame {image.format} images are not supported; send a single frame"
        )
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        log.info("Pillow refused the image: %s", exc)
        raise too_large(width, height, max_pixels) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        log.info("Pillow could not decode the image data: %s", exc)
        raise InvalidImageError(
            "the image data is truncated or corrupt: it holds less data than its header declares"
        ) from exc
    return image


def _identify_other_format(data: bytes) -> str | None:
    """The name of an image format Pillow knows but the service refuses, or None."""
    try:
        with Image.open(io.BytesIO(data)) as other:
            return str(other.format)
    except Exception:  # any failure means "not an image Pillow knows"
        return None
