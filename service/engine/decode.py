"""Bytes to a PIL image, with the limits checked before any pixel is decoded.

Order: content type, ``Image.open`` restricted to the accepted formats (it checks their magic
bytes and reads the header only), the pixel limit, single frame, then a strict ``load()``. A
header that claims 20000x20000 is refused from its header; a truncated file fails at the strict
load (400 ``truncated-image``). The product's input policy (EXIF rotation, mode conversion) is
applied later by ``Colorizer.prepare``.

Strict means missing data is never filled in, whatever the file ends with (Pillow's
``ImageFile.LOAD_TRUNCATED_IMAGES`` stays False):
- JPEG: libjpeg fills a scan that ends early with grey and only warns (Pillow silences the
  warning), so a JPEG cut short with an end-of-image marker appended decodes "fine". The scan
  data is therefore cut where its first marker starts (whatever marker the file ends with) and
  decoded without one: a single-scan JPEG then runs out of data (truncated) unless every block
  was there. A multi-scan (progressive) JPEG needs its end marker to decode at all, so it is
  decoded twice, with and without filler bits before the end marker: filler that reaches the
  pixels means the scan was short.
- PNG: the chunks must end with IEND; a cut IDAT stream fails in Pillow itself.
- WebP: the RIFF size in the header must fit in the data (no best effort: libwebp, through
  Pillow, decodes whole files only).
- GIF, BMP, TIFF: a short pixel stream fails in Pillow itself.
``decode(..., allow_truncated=True)`` (``COLORIZE_ALLOW_TRUNCATED_IMAGES``) instead decodes what
is there (the missing part grey for JPEG, black otherwise) and says it was truncated.

Status per failure (also in the README):
- data that ends before the image it declares (cut short): 400 ``truncated-image``
- empty body, undecodable or corrupt data, or data that is not an image: 400 ``invalid-image``
- request content type that is not an image (and not ``application/octet-stream``): 415
- an image format outside ``ACCEPTED_FORMATS`` (e.g. PSD, ICO): 415
- more than one frame (animated GIF/PNG/WebP, multi-page TIFF): 415 (send a single frame)
- more pixels than ``max_pixels``: 413 ``image-too-large``
"""

from __future__ import annotations

import io
import logging
import re
import struct
import warnings
from dataclasses import dataclass

from PIL import Image, ImageChops, ImageFile, UnidentifiedImageError

from service.core.errors import (
    ImageTooLargeError,
    InvalidImageError,
    TruncatedImageError,
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
    # Never fill missing data process-wide; ``decode(allow_truncated=True)`` does it per image.
    ImageFile.LOAD_TRUNCATED_IMAGES = False


TRUNCATED_DETAIL = (
    "the image data is truncated or corrupt: it holds less data than its header declares"
)


@dataclass(frozen=True)
class Decoded:
    image: Image.Image
    truncated: bool = False  # True only with allow_truncated: the missing part was filled


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode one single-frame image of an accepted format strictly, refusing bombs first."""
    return decode(data, max_pixels=max_pixels).image


def decode(data: bytes, *, max_pixels: int, allow_truncated: bool = False) -> Decoded:
    """``decode_image``; with ``allow_truncated`` a truncated image is decoded as far as its data
    goes (``truncated=True``) instead of refused."""
    if _webp_is_short(data):  # libwebp (through Pillow) decodes whole files only: no best effort
        raise TruncatedImageError(TRUNCATED_DETAIL)
    image = _open(data, max_pixels)
    try:
        return Decoded(_load_strictly(image, data))
    except TruncatedImageError:
        if not allow_truncated:
            raise
    log.info("decoding a truncated %s image as far as its data goes", image.format)
    return Decoded(_load_best_effort(image, data), truncated=True)


def _open(data: bytes, max_pixels: int) -> ImageFile.ImageFile:
    """``Image.open`` with the header checks: format, size, pixel limit, one frame."""
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
    assert isinstance(image, ImageFile.ImageFile)  # what Image.open returns
    return image


def _load(image: Image.Image) -> Image.Image:
    """``image.load()`` with Pillow's errors as ours: a short pixel stream is truncated.

    (Pillow's own bomb guard cannot fire here: ``_open`` refused every image above the limit.)
    """
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        log.info("Pillow could not decode the image data: %s", exc)
        if "truncated" in str(exc):  # ImageFile.load: the data ended before the pixels did
            raise TruncatedImageError(TRUNCATED_DETAIL) from exc
        raise InvalidImageError(
            "the image data is corrupt: it cannot be decoded as the image its header declares"
        ) from exc
    return image


def _reopen(data: bytes) -> ImageFile.ImageFile:
    try:
        return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImageError("the image header is corrupt") from exc


def _load_strictly(image: ImageFile.ImageFile, data: bytes) -> Image.Image:
    if image.format == "JPEG":
        return _load_jpeg_strictly(data)
    if image.format == "PNG" and not _png_has_iend(data):
        _load(image)  # a cut IDAT stream says so itself; a complete one lacks only its IEND
        raise TruncatedImageError(TRUNCATED_DETAIL)
    return _load(image)


def _load_best_effort(image: ImageFile.ImageFile, data: bytes) -> Image.Image:
    """What a truncated image's data holds, without ``LOAD_TRUNCATED_IMAGES`` (process-wide):
    JPEG through libjpeg's own grey fill; other formats through Pillow's decoders fed until the
    data ends (``ImageFile.load``'s loop, stopping where it would raise), the rest black."""
    if image.format == "JPEG":
        scan = _jpeg_scans(data)
        end = scan.end if scan is not None else len(data)
        return _load(_reopen(data[:end] + JPEG_EOI))
    image = _reopen(data)
    try:
        _decode_what_there_is(image)
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        log.info("best effort for a truncated image failed: %s", exc)
        raise InvalidImageError("the truncated image data cannot be decoded at all") from exc
    return image


def _decode_what_there_is(image: ImageFile.ImageFile) -> None:
    assert image.fp is not None  # a freshly opened image
    image.load_prepare()
    read = getattr(image, "load_read", None) or image.fp.read
    for name, extents, offset, args in sorted(image.tile, key=lambda tile: tile[2]):
        image.fp.seek(offset)
        decoder = Image._getdecoder(image.mode, name, args, image.decoderconfig)
        try:
            decoder.setimage(image.im, extents)
            if decoder.pulls_fd:
                decoder.setfd(image.fp)
                decoder.decode(b"")
                continue
            pending = b""
            while True:
                try:
                    chunk = read(image.decodermaxblock)
                except (IndexError, struct.error, EOFError, SyntaxError, OSError):
                    break  # the data ends inside a chunk header (PNG, GIF)
                if not chunk:
                    break  # the data ends
                pending += chunk
                consumed, _ = decoder.decode(pending)
                if consumed < 0:
                    break
                pending = pending[consumed:]
        finally:
            decoder.cleanup()
    image.tile = []
    image.readonly = 0


# -- JPEG --------------------------------------------------------------------------------------

JPEG_EOI = b"\xff\xd9"
# Entropy-coded data ends at the first 0xFF not followed by a stuffed 0x00 or a restart marker.
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")
# All-ones bits (0xFF, stuffed as FF 00) are no valid Huffman code: libjpeg warns and decodes each
# 16 bits as a zero symbol. 64 bits cover the decoder's look-ahead (57 bits) past the last real
# bit, and complete at most the last two blocks of a short scan.
_FILLER = b"\xff\x00" * 8
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # markers without a length field (TEM, RSTn)


@dataclass(frozen=True)
class _Scans:
    count: int  # SOS segments before the first EOI
    end: int  # offset where the last scan's entropy-coded data ends
    progressive: bool  # SOF2/6/10/14: libjpeg reads every scan, up to EOI, before any row


def _jpeg_scans(data: bytes) -> _Scans | None:
    """Walk the first image's segments (SOI to the first EOI: a Multi-Picture file's appended
    images are not this image); None where the structure breaks before any scan."""
    pos, count, end, progressive = 2, 0, 0, False
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            break
        if marker in _STANDALONE:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        pos += 2 + length
        progressive = progressive or marker in (0xC2, 0xC6, 0xCA, 0xCE)
        if marker == 0xDA:  # SOS: its header, then entropy-coded data up to the next marker
            found = _SCAN_END.search(data, pos)
            end = found.start() if found else len(data)
            count += 1
            pos = end
    if not count:
        return None
    return _Scans(count, min(end, len(data)), progressive)


def _load_jpeg_strictly(data: bytes) -> Image.Image:
    scans = _jpeg_scans(data)
    if scans is None:
        raise TruncatedImageError(TRUNCATED_DETAIL)
    body = data[: scans.end]
    if scans.count == 1 and not scans.progressive:
        # No end marker: a short scan runs out of data instead of being filled with grey.
        return _load(_reopen(body + _FILLER))
    # Several scans: libjpeg reads them all before the first row, up to the end marker. Filler
    # before it is skipped after a complete scan and decoded into a short one.
    image = _load(_reopen(body + JPEG_EOI))
    filled = _load(_reopen(body + _FILLER + JPEG_EOI))
    if ImageChops.difference(image, filled).getbbox() is not None:
        raise TruncatedImageError(TRUNCATED_DETAIL)
    return image


# -- PNG, WebP ---------------------------------------------------------------------------------


def _png_has_iend(data: bytes) -> bool:
    """The chunks, walked by their lengths, reach an IEND chunk within the data."""
    pos = 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        if data[pos + 4 : pos + 8] == b"IEND":
            return True
        pos += 12 + length
    return False


def _webp_is_short(data: bytes) -> bool:
    """A WebP whose RIFF size (the bytes after the first 8) is more than the data holds."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return False
    (size,) = struct.unpack_from("<I", data, 4)
    return len(data) < 8 + size


def _identify_other_format(data: bytes) -> str | None:
    """The name of an image format Pillow knows but the service refuses, or None."""
    try:
        with Image.open(io.BytesIO(data)) as other:
            return str(other.format)
    except Exception:  # any failure means "not an image Pillow knows"
        return None
