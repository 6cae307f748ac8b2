"""What an image's header says, read without decoding a pixel: its size, and whether it fits.

The HTTP edge uses it to refuse oversized or too-thin images before queueing them; the engine's
decoder applies the same checks again (``service.engine.decode``).
"""

from __future__ import annotations

import io

from PIL import Image

from service.core.errors import ImageTooLargeError, InvalidParameterError

ACCEPTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def too_large(width: int, height: int, max_pixels: int) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}; "
        "send a smaller image"
    )


def probe_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the image's header alone (no pixel is decoded); None if unreadable.

    The HTTP edge uses it to refuse oversized or too-thin images and to estimate a request's
    cost before queueing it; the full checks run again in ``decode_image``.
    """
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:
            width, height = image.size
    except Exception:  # any unreadable header: decode_image gives the precise answer
        return None
    return int(width), int(height)


def check_shape(width: int, height: int, *, max_pixels: int, max_aspect_ratio: float) -> None:
    """413 above the pixel budget; 422 beyond the aspect-ratio limit."""
    if width * height > max_pixels:
        raise too_large(width, height, max_pixels)
    if width > 0 and height > 0 and max(width, height) > max_aspect_ratio * min(width, height):
        raise InvalidParameterError(
            f"image is {width}x{height}, a side ratio over the limit of {max_aspect_ratio:g}:1; "
            "crop or pad it"
        )
