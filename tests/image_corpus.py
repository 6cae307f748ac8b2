"""Image bytes for the service tests: good inputs of every mode and a corpus of bad inputs.

Everything is generated in memory with Pillow (or, for the header bomb, written byte by byte),
so no file is downloaded or checked in.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image


def gray(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, width, dtype=np.float64)[None, :].repeat(height, axis=0)
    noise = rng.integers(0, 40, size=(height, width))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), mode="L")


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def jpeg(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    return encode(gray(width, height, seed), "JPEG", quality=90)


def png(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    return encode(gray(width, height, seed), "PNG")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid PNG header claiming width x height, with a few bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def animated_gif() -> bytes:
    frames = [gray(32, 32, seed).convert("P") for seed in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def cmyk_jpeg() -> bytes:
    return encode(gray(40, 30).convert("RGB").convert("CMYK"), "JPEG")


def png16() -> bytes:
    values = (np.linspace(0, 65535, 40 * 30).reshape(30, 40)).astype(np.uint16)
    return encode(Image.fromarray(values), "PNG")


def rgba_png() -> bytes:
    image = gray(40, 30).convert("RGBA")
    alpha = Image.linear_gradient("L").resize((40, 30))
    image.putalpha(alpha)
    return encode(image, "PNG")


def exif_rotated_jpeg(width: int = 40, height: int = 30) -> bytes:
    """Stored width x height with EXIF orientation 6 (rotate 90°): shown height x width."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(gray(width, height), "JPEG", exif=exif.tobytes())


def float_tiff() -> bytes:
    return encode(Image.fromarray(np.ones((8, 8), dtype=np.float32)), "TIFF")


def ico() -> bytes:
    return encode(gray(32, 32).convert("RGB"), "ICO")


JPEG_EOI = b"\xff\xd9"


def cut_jpeg_with_eoi(progressive: bool = False) -> bytes:
    """A JPEG cut in the middle of its scan data with an end-of-image marker appended: libjpeg
    would fill the missing half with grey and only warn."""
    data = encode(gray(160, 120, 5).convert("RGB"), "JPEG", quality=90, progressive=progressive)
    return data[: len(data) // 2] + JPEG_EOI


def png_without_iend() -> bytes:
    data = png(160, 120)
    assert data[-8:-4] == b"IEND"
    return data[:-12]


def cut_webp() -> bytes:
    data = encode(gray(160, 120).convert("RGB"), "WEBP", quality=80)
    return data[: len(data) * 3 // 4]


def corrupt_jpeg() -> bytes:
    """Whole, but its first Huffman table's code counts are garbage: libjpeg refuses it."""
    data = bytearray(jpeg())
    table = data.index(b"\xff\xc4")  # DHT: marker, length, class/id, then 16 code counts
    data[table + 5 : table + 21] = b"\xff" * 16
    return bytes(data)


@dataclass(frozen=True)
class BadInput:
    name: str
    body: bytes
    content_type: str
    status: int
    type_slug: str | None  # problem type slug for errors; None for success
    size: tuple[int, int] | None = None  # expected output size for successes


def corpus() -> list[BadInput]:
    """Every hostile or unusual input the service must answer without harm, with its status."""
    good_jpeg = jpeg()
    good_png = png()
    return [
        BadInput("zero-bytes", b"", "image/jpeg", 400, "invalid-image"),
        BadInput("truncated-jpeg", good_jpeg[: len(good_jpeg) // 2], "image/jpeg", 400,
                 "truncated-image"),
        BadInput("truncated-png", good_png[: len(good_png) // 2], "image/png", 400,
                 "truncated-image"),
        BadInput("truncated-jpeg-with-eoi", cut_jpeg_with_eoi(), "image/jpeg", 400,
                 "truncated-image"),
        BadInput("truncated-progressive-jpeg-with-eoi", cut_jpeg_with_eoi(progressive=True),
                 "image/jpeg", 400, "truncated-image"),
        BadInput("png-without-iend", png_without_iend(), "image/png", 400, "truncated-image"),
        BadInput("truncated-webp", cut_webp(), "image/webp", 400, "truncated-image"),
        BadInput("corrupt-jpeg-huffman-table", corrupt_jpeg(), "image/jpeg", 400, "invalid-image"),
        BadInput("wrong-content-type", good_jpeg, "text/plain", 415, "unsupported-media-type"),
        BadInput("text-posing-as-image", b"hello, I am definitely a JPEG\n" * 20, "image/jpeg",
                 400, "invalid-image"),
        BadInput("one-pixel", png(1, 1), "image/png", 200, None, (1, 1)),
        BadInput("header-bomb-20000x20000", png_header_bomb(), "image/png", 413,
                 "image-too-large"),
        BadInput("animated-gif", animated_gif(), "image/gif", 415, "unsupported-media-type"),
        BadInput("cmyk-jpeg", cmyk_jpeg(), "image/jpeg", 200, None, (40, 30)),
        BadInput("png-16-bit", png16(), "image/png", 200, None, (40, 30)),
        BadInput("rgba-png", rgba_png(), "image/png", 200, None, (40, 30)),
        BadInput("exif-rotated-jpeg", exif_rotated_jpeg(40, 30), "image/jpeg", 200, None,
                 (30, 40)),
        BadInput("float-tiff", float_tiff(), "image/tiff", 415, "unsupported-media-type"),
        BadInput("ico-format", ico(), "image/x-icon", 415, "unsupported-media-type"),
    ]  # fmt: skip
