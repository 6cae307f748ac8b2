"""decode.py and encode.py: limits before decoding, one status per kind of bad input."""

from __future__ import annotations

import io
import time

import image_corpus as corpus
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from service.core.errors import (
    ImageTooLargeError,
    InvalidImageError,
    InvalidParameterError,
    TruncatedImageError,
    UnsupportedMediaTypeError,
)
from service.engine.decode import configure_pil, decode, decode_image
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


def _photo_bytes(fmt: str, **params: object) -> bytes:
    return corpus.encode(corpus.gray(160, 120, 3).convert("RGB"), fmt, **params)


CUT_WITH_ENDINGS = {
    "jpeg+eoi": lambda d: d[: len(d) // 2] + b"\xff\xd9",
    "jpeg+comment+eoi": lambda d: d[: len(d) // 2] + b"\xff\xfe\x00\x04hi\xff\xd9",
    "jpeg+fill+eoi": lambda d: d[: len(d) // 2] + b"\xff\xff\xff\xd9",
    "jpeg+soi+eoi": lambda d: d[: len(d) // 2] + b"\xff\xd8\xff\xd9",
    "jpeg-no-marker": lambda d: d[: len(d) // 2],
    "jpeg-last-tenth+eoi": lambda d: d[: len(d) * 9 // 10] + b"\xff\xd9",
}


@pytest.mark.parametrize("ending", list(CUT_WITH_ENDINGS))
@pytest.mark.parametrize(
    "params",
    [{"quality": 90}, {"quality": 90, "progressive": True}, {"quality": 75, "optimize": True},
     {"quality": 90, "restart_marker_blocks": 4}, {"quality": 90, "subsampling": 0}],
    ids=["baseline", "progressive", "optimized", "restart-markers", "4:4:4"],
)  # fmt: skip
def test_a_cut_jpeg_is_truncated_whatever_it_ends_with(
    ending: str, params: dict[str, object]
) -> None:
    whole = _photo_bytes("JPEG", **params)
    assert decode_image(whole, max_pixels=LIMIT).size == (160, 120)
    with pytest.raises(TruncatedImageError) as refused:
        decode_image(CUT_WITH_ENDINGS[ending](whole), max_pixels=LIMIT)
    assert refused.value.status == 400 and refused.value.kind == "truncated-image"


def test_strict_jpeg_decoding_gives_the_same_pixels() -> None:
    for params in ({"quality": 90}, {"quality": 90, "progressive": True}):
        data = _photo_bytes("JPEG", **params)
        with Image.open(io.BytesIO(data)) as plain:
            expected = plain.convert("RGB").tobytes()
        assert decode_image(data, max_pixels=LIMIT).convert("RGB").tobytes() == expected
    # a grey JPEG, one with bytes after its end (a Multi-Picture file's next image), and one
    # without its end marker still decode: no pixel is missing
    grey = corpus.encode(corpus.gray(160, 120), "JPEG")
    assert decode_image(grey, max_pixels=LIMIT).mode == "L"
    whole = _photo_bytes("JPEG", quality=90)
    assert decode_image(whole + whole, max_pixels=LIMIT).size == (160, 120)
    assert decode_image(whole[:-2], max_pixels=LIMIT).size == (160, 120)


@pytest.mark.parametrize(
    "data",
    [corpus.png_without_iend(), corpus.png()[: len(corpus.png()) // 2] + corpus.png()[-12:],
     corpus.cut_webp(), _photo_bytes("GIF")[:-200] + b";", _photo_bytes("BMP")[:-300],
     _photo_bytes("TIFF")[:-300]],
    ids=["png-without-iend", "png-cut+iend", "webp", "gif+trailer", "bmp", "tiff"],
)  # fmt: skip
def test_other_formats_cut_short_are_truncated(data: bytes) -> None:
    with pytest.raises(TruncatedImageError):
        decode_image(data, max_pixels=LIMIT)


def test_corrupt_data_is_invalid_not_truncated() -> None:
    with pytest.raises(InvalidImageError) as refused:
        decode_image(corpus.corrupt_jpeg(), max_pixels=LIMIT)
    assert not isinstance(refused.value, TruncatedImageError)
    assert refused.value.kind == "invalid-image"


def test_pillow_never_fills_missing_data_process_wide() -> None:
    configure_pil(LIMIT)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize(
    ("data", "filled"),
    [(corpus.cut_jpeg_with_eoi(), 128), (corpus.cut_jpeg_with_eoi(progressive=True), None),
     (corpus.png()[: len(corpus.png()) * 2 // 3], 0), (corpus.png_without_iend(), None)],
    ids=["jpeg+eoi", "progressive-jpeg+eoi", "png-cut", "png-without-iend"],
)  # fmt: skip
def test_best_effort_decodes_what_there_is_and_says_so(data: bytes, filled: int | None) -> None:
    decoded = decode(data, max_pixels=LIMIT, allow_truncated=True)
    assert decoded.truncated is True
    pixels = decoded.image.convert("L")
    assert pixels.size in ((160, 120), (64, 48))
    if filled is not None:  # the last row is the filler: grey for JPEG, black for PNG
        bottom = pixels.crop((0, pixels.height - 1, pixels.width, pixels.height))
        assert bottom.getextrema() == (filled, filled)
    whole = decode(corpus.png(), max_pixels=LIMIT, allow_truncated=True)
    assert whole.truncated is False
    with pytest.raises(TruncatedImageError):  # a cut WebP cannot be decoded in part
        decode(corpus.cut_webp(), max_pixels=LIMIT, allow_truncated=True)


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_an_unwanted_encode_stops_at_its_next_write(fmt: str) -> None:
    from service.engine.encode import EncodeStopped

    image = corpus.gray(2000, 1500, 4).convert("RGB")
    asked: list[int] = []

    def stop_after_the_first_write() -> bool:
        asked.append(1)
        return len(asked) > 1

    with pytest.raises(EncodeStopped):
        encode_image(image, fmt, 90, stop_after_the_first_write)  # type: ignore[arg-type]
    assert len(asked) == 2  # one block written, then stopped
    body, _ = encode_image(image, fmt, 90, lambda: False)  # type: ignore[arg-type]
    assert body == encode_image(image, fmt, 90)[0]  # asking changes nothing else
