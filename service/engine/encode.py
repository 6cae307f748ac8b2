"""PIL image to response bytes: JPEG, PNG or WebP.

Alpha: PNG and WebP keep it. JPEG has no alpha channel, so an RGBA result asked for as JPEG is
flattened onto white (what a viewer shows for a transparent PNG on a white page); ask for png or
webp to keep transparency. PNG ignores ``quality`` (lossless); WebP uses it (100: still lossy).
JPEG uses Pillow's default 4:2:0 chroma subsampling: the predicted ab is bilinearly upsampled from
the network's 256x256 output, so at any output size above 512 px half-resolution chroma loses
nothing the model made, and full chroma (4:4:4) would only grow the file (about 15%).

One encoder for both interfaces: the HTTP API (``quality``, default 90) and the ``colorize`` command
(quality 95, ``service.commands.colorize.QUALITY``) call ``encode_image``, so the same format and
quality give the same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from PIL import Image

from service.core.errors import InvalidParameterError
from service.core.jobs import OutputFormat

MEDIA_TYPES: dict[str, str] = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
MAX_SIDE: dict[str, int] = {"jpeg": 65_535, "png": 2**31 - 1, "webp": 16_383}


def choose_format(requested: OutputFormat | None, source_format: str | None) -> OutputFormat:
    """The requested format, else JPEG for JPEG input and PNG for everything else."""
    if requested is not None:
        return requested
    return "jpeg" if source_format == "JPEG" else "png"


def flatten_alpha(
    image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)
) -> Image.Image:
    """Composite an image with alpha onto an opaque background (RGB result)."""
    rgba = image.convert("RGBA")
    base = Image.new("RGB", rgba.size, background)
    base.paste(rgba, mask=rgba.getchannel("A"))
    return base


class EncodeStopped(RuntimeError):
    """``encode_image``'s ``should_stop`` said the result is no longer wanted."""


class _StoppableBuffer(io.BytesIO):
    """Pillow writes an encoding as it goes (PNG per IDAT chunk, JPEG per 64 KiB block): each
    write asks ``should_stop`` first, so an unwanted encode ends within one block's work."""

    def __init__(self, should_stop: Callable[[], bool]) -> None:
        super().__init__()
        self.should_stop = should_stop

    def write(self, data: object) -> int:
        if self.should_stop():
            raise EncodeStopped("encoding stopped: the result is no longer wanted")
        return super().write(data)  # type: ignore[arg-type]


def encode_image(
    image: Image.Image,
    fmt: OutputFormat,
    quality: int = 90,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[bytes, str]:
    """Encoded bytes and their media type; ``should_stop`` (asked as the bytes are written) raises
    ``EncodeStopped`` once it says True. WebP is encoded in one call and not stopped midway."""
    if fmt not in MEDIA_TYPES:
        raise InvalidParameterError(f"format must be one of {', '.join(MEDIA_TYPES)}, got {fmt!r}")
    if not 1 <= quality <= 100:
        raise InvalidParameterError(f"quality must be between 1 and 100, got {quality}")
    if max(image.size) > MAX_SIDE[fmt]:
        raise InvalidParameterError(
            f"{fmt} output is limited to {MAX_SIDE[fmt]} pixels per side and the image is "
            f"{image.width}x{image.height}; ask for format=png or resolution=network"
        )
    out = io.BytesIO() if should_stop is None else _StoppableBuffer(should_stop)
    if fmt == "jpeg":
        rgb = flatten_alpha(image) if "A" in image.getbands() else image.convert("RGB")
        rgb.save(out, format="JPEG", quality=quality)
    elif fmt == "png":
        image.save(out, format="PNG", compress_level=6)
    else:
        image.save(out, format="WEBP", quality=quality, method=4)
    return out.getvalue(), MEDIA_TYPES[fmt]
