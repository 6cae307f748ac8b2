"""decode.py and encode.py: limits before decoding, one status per kind of bad input."""

from __future__ import annotations

import io
import time

import image_corpus as corpus
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from service.core.errors import (
    ImageTooLargeError,
    InvalidImageError,
    InvalidParameterError,
    UnsupportedMediaTypeError,
)
from service.engine.decode import configure_pil, decode_image
from service.engine.encode import choose_format, encode_image, flatten_alpha
from service.router.inputs import check_content_type

LIMIT = 40_000_000


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_accepted_formats_decode(fmt: str) -> None:
    data = corpus.encode(corpus.gray(50, 30).convert("RGB" if fmt == "JPEG" else "L"), fmt)
    image = decode_image(data, max_pixels=LIMIT)
    assert image.format == fmt
    assert image.size == (50, 30)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", InvalidImageError),
        (b"not an image at all" * 10, InvalidImageError),
        (corpus.jpeg()[:300], InvalidImageError),
        (corpus.png()[:100], InvalidImageError),
        (corpus.animated_gif(), UnsupportedMediaTypeError),
        (corpus.ico(), UnsupportedMediaTypeError),
    ],
    ids=["empty", "text", "truncated-jpeg", "truncated-png", "animated-gif", "ico"],
)
def test_bad_data_gets_its_error(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode_image(data, max_pixels=LIMIT)


def test_header_bomb_is_refused_before_decoding() -> None:
    configure_pil(LIMIT)
    bomb = corpus.png_header_bomb(20_000, 20_000)  # 400 MP claimed, 100 bytes sent
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="pixels"):
        decode_image(bomb, max_pixels=LIMIT)
    assert time.perf_counter() - start < 0.5  # refused from the header, never decoded


def test_pixel_limit_is_ours_not_pillows() -> None:
    configure_pil(LIMIT)
    data = corpus.png(100, 100)
    with pytest.raises(ImageTooLargeError, match="10000 pixels"):
        decode_image(data, max_pixels=9_999)
    assert decode_image(data, max_pixels=10_000).size == (100, 100)
    # between our limit and Pillow's (twice MAX_IMAGE_PIXELS): our own check still refuses
    configure_pil(5_000)
    try:
        with pytest.raises(ImageTooLargeError):
            decode_image(data, max_pixels=5_000)
    finally:
        configure_pil(LIMIT)


@pytest.mark.parametrize(
    "content_type",
    ["image/jpeg", "image/png; charset=binary", "IMAGE/WEBP", "application/octet-stream"],
)
def test_image_content_types_pass(content_type: str) -> None:
    check_content_type(content_type)


@pytest.mark.parametrize("content_type", ["text/plain", "application/json", "", None])
def test_other_content_types_are_415(content_type: str | None) -> None:
    with pytest.raises(UnsupportedMediaTypeError, match="not an image"):
        check_content_type(content_type)


def test_default_output_format_follows_input() -> None:
    assert choose_format(None, "JPEG") == "jpeg"
    assert choose_format(None, "PNG") == "png"
    assert choose_format(None, "GIF") == "png"
    assert choose_format("webp", "JPEG") == "webp"


def test_rgba_to_jpeg_is_flattened_on_white_png_keeps_alpha() -> None:
    image = Image.new("RGBA", (4, 2), (10, 20, 30, 0))  # fully transparent
    body, media = encode_image(image, "jpeg", 95)
    assert media == "image/jpeg"
    decoded = Image.open(io.BytesIO(body))
    assert decoded.mode == "RGB"
    assert min(decoded.getpixel((0, 0))) > 240  # white, not the hidden colour
    body, media = encode_image(image, "png")
    assert media == "image/png"
    assert Image.open(io.BytesIO(body)).mode == "RGBA"
    assert flatten_alpha(Image.new("LA", (1, 1), (0, 255))).getpixel((0, 0)) == (0, 0, 0)


def test_encode_refuses_what_the_format_cannot_hold() -> None:
    with pytest.raises(InvalidParameterError, match="16383"):
        encode_image(Image.new("RGB", (16_384, 1)), "webp")
    with pytest.raises(InvalidParameterError, match="quality"):
        encode_image(Image.new("RGB", (4, 4)), "jpeg", 0)


@settings(max_examples=40, deadline=None)
@given(
    width=st.integers(1, 64),
    height=st.integers(1, 64),
    mode=st.sampled_from(["L", "RGB", "RGBA", "LA", "P", "I;16", "CMYK", "1"]),
    fmt=st.sampled_from(["PNG", "TIFF", "WEBP", "JPEG"]),
)
def test_any_size_and_mode_round_trips_its_size(
    width: int, height: int, mode: str, fmt: str
) -> None:
    image = Image.new(mode, (width, height))
    try:
        data = corpus.encode(image, fmt)
    except (OSError, KeyError, ValueError):
        return  # Pillow cannot write this mode in this format: not an input a client can send
    decoded = decode_image(data, max_pixels=LIMIT)
    assert decoded.size == (width, height)
    for out_fmt in ("jpeg", "png", "webp"):
        body, _ = encode_image(
            decoded.convert("RGBA" if "A" in decoded.getbands() else "RGB"), out_fmt
        )
        assert Image.open(io.BytesIO(body)).size == (width, height)
