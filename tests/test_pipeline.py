"""The batched pipeline: batching, output resolutions, the input policy, per-stage timings."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from models.boxes import Detections
from models.lab import rgb_to_lab
from models.pipeline import PIPELINE_STAGES, ColorizeOptions, Colorizer, OptionsError
from models.preprocess import to_tensor


def noisy(width: int, height: int, seed: int, mode: str = "L") -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.asarray(Image.linear_gradient("L").resize((width, height)), dtype=np.float64)
    values = np.clip(base + rng.normal(0, 20, size=base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(values, mode="L").convert(mode)


def boxes_for(width: int, height: int) -> Detections:
    return Detections.from_boxes(
        [[0, 0, width // 2, height // 2], [width // 4, height // 3, width, height]], [0.9, 0.8]
    )


def test_batched_equals_one_by_one(tiny_colorizer: Colorizer) -> None:
    images = [noisy(320, 240, 0), noisy(100, 400, 1), noisy(640, 480, 2), noisy(50, 50, 3)]
    options = [
        ColorizeOptions(resolution="network", boxes=boxes_for(320, 240)),
        ColorizeOptions(resolution="network"),  # no detector, no boxes: full-image net
        ColorizeOptions(resolution="network", boxes=boxes_for(640, 480), max_instances=1),
        ColorizeOptions(resolution="network", boxes=boxes_for(50, 50)),
    ]
    batched = tiny_colorizer.colorize(images, options)
    for image, option, together in zip(images, options, batched, strict=True):
        alone = tiny_colorizer.colorize([image], option)[0]
        assert alone.boxes == together.boxes
        a, b = np.asarray(alone.image, dtype=int), np.asarray(together.image, dtype=int)
        assert np.abs(a - b).max() <= 1
    assert [len(r.boxes) for r in batched] == [2, 0, 1, 2]


def test_batched_ab_equals_one_by_one_within_fp_tolerance(tiny_colorizer: Colorizer) -> None:
    images = [noisy(320, 240, 4), noisy(200, 300, 5)]
    options = [ColorizeOptions(boxes=boxes_for(*im.size)) for im in images]
    prepared = [tiny_colorizer.prepare(im, op) for im, op in zip(images, options, strict=True)]
    together = tiny_colorizer.predict(prepared)
    for p, t in zip(prepared, together, strict=True):
        alone = tiny_colorizer.predict([p])[0]
        assert torch.allclose(alone.ab, t.ab, atol=1e-5)


def test_original_resolution_keeps_size_and_the_inputs_lightness(tiny_colorizer: Colorizer) -> None:
    image = noisy(500, 333, 6)
    result = tiny_colorizer.colorize([image], ColorizeOptions(boxes=boxes_for(500, 333)))[0]
    assert result.image.size == (500, 333) and result.image.mode == "RGB"
    l_in = rgb_to_lab(to_tensor(image.convert("RGB")))[0]
    l_out = rgb_to_lab(to_tensor(result.image))[0]
    # 8-bit quantisation moves L by well under one unit, unless a colour fell out of gamut.
    in_gamut = np.ones(l_in.shape, dtype=bool)
    out = np.asarray(result.image)
    in_gamut &= (out > 0).all(-1) & (out < 255).all(-1)
    diff = (l_in - l_out).abs().numpy()
    assert in_gamut.mean() > 0.5
    assert diff[in_gamut].max() < 0.6
    assert np.asarray(result.image, dtype=int).std(axis=-1).mean() > 0  # it is coloured


def test_network_resolution_is_256(tiny_colorizer: Colorizer) -> None:
    result = tiny_colorizer.colorize([noisy(1000, 300, 7)], ColorizeOptions(resolution="network"))[
        0
    ]
    assert result.image.size == (256, 256)


def test_timings_cover_every_stage(tiny_colorizer: Colorizer) -> None:
    result = tiny_colorizer.colorize([noisy(64, 64, 8)])[0]
    assert set(result.timings) == set(PIPELINE_STAGES)
    assert all(v >= 0 for v in result.timings.values())


def sixteen_bit(image: Image.Image) -> Image.Image:
    return Image.fromarray(np.asarray(image, dtype=np.uint16) * 257)


def to_bytes(image: Image.Image, fmt: str, **kwargs: object) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    buffer.seek(0)
    return Image.open(buffer)


def test_odd_inputs(tiny_colorizer: Colorizer) -> None:
    gray = noisy(120, 80, 9)
    rgba = gray.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((120, 80)))
    sixteen = sixteen_bit(gray)
    palette = gray.convert("P")
    cmyk = to_bytes(gray.convert("RGB").convert("CMYK"), "JPEG")
    la = gray.convert("LA")
    inputs = {
        "1x1": Image.new("L", (1, 1), 128),
        "4000x300": noisy(4000, 300, 10),
        "rgba": rgba,
        "palette": palette,
        "16-bit": to_bytes(sixteen, "PNG"),
        "cmyk": cmyk,
        "la": la,
        "bilevel": gray.convert("1"),
        "color": noisy(120, 80, 11, "RGB").convert("HSV").convert("RGB"),
    }
    results = tiny_colorizer.colorize(list(inputs.values()))
    for (name, image), result in zip(inputs.items(), results, strict=True):
        assert result.image.size == image.size, name
        assert result.image.mode == ("RGBA" if name in ("rgba", "la") else "RGB"), name
    alpha = np.asarray(results[2].image.getchannel("A"))
    assert np.array_equal(alpha, np.asarray(rgba.getchannel("A")))
    # 16-bit is scaled, not clipped: it reads like its 8-bit original.
    l16 = rgb_to_lab(to_tensor(results[4].image))[0].mean()
    l8 = rgb_to_lab(to_tensor(tiny_colorizer.colorize([gray])[0].image))[0].mean()
    assert abs(float(l16 - l8)) < 1.0


def test_exif_rotation_is_applied_before_everything(tiny_colorizer: Colorizer) -> None:
    image = noisy(200, 100, 12)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    rotated = to_bytes(image.convert("RGB"), "JPEG", exif=exif.tobytes(), quality=95)
    assert rotated.size == (200, 100)
    # A box in the *upright* frame (100 wide, 200 tall) is valid only after the rotation.
    result = tiny_colorizer.colorize(
        [rotated], ColorizeOptions(boxes=Detections.from_boxes([[10, 120, 90, 195]]))
    )[0]
    assert result.image.size == (100, 200)
    assert result.boxes == [(10, 120, 90, 195)]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (ColorizeOptions(max_instances=9), "max_instances must be between 0 and 8"),
        (ColorizeOptions(max_instances=-1), "max_instances"),
        (ColorizeOptions(score_threshold=1.5), "score_threshold must be between 0 and 1"),
    ],
)
def test_bad_options_are_refused(tiny_colorizer: Colorizer, options, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(OptionsError, match=message):
        tiny_colorizer.prepare(noisy(10, 10, 0), options)


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.integers(1, 700), st.integers(1, 700), st.sampled_from(["L", "RGB", "RGBA", "P", "I;16"]))
def test_any_size_and_mode_keeps_size_and_l(tiny_colorizer: Colorizer, width, height, mode) -> None:  # type: ignore[no-untyped-def]
    image = noisy(width, height, width * height)
    source = image if mode != "I;16" else sixteen_bit(image)
    if mode not in ("L", "I;16"):
        source = image.convert(mode)
    result = tiny_colorizer.colorize([source])[0]
    assert result.image.size == (width, height)
    l_in = rgb_to_lab(to_tensor(image.convert("RGB")))[0]
    l_out = rgb_to_lab(to_tensor(result.image.convert("RGB")))[0]
    out = np.asarray(result.image.convert("RGB"))
    in_gamut = torch.from_numpy((out > 0).all(-1) & (out < 255).all(-1))
    if in_gamut.any():
        assert (l_in - l_out).abs()[in_gamut].max() < 0.6


@pytest.mark.parametrize(
    ("batch_size", "expected"),
    [(1, {"instance", "fusion"}), (2, {"instance", "fusion", "full_image"})],
)
def test_warmup_runs_the_networks_a_batch_will_use(tiny_checkpoints, batch_size, expected) -> None:  # type: ignore[no-untyped-def]
    colorizer = Colorizer.load(tiny_checkpoints)
    called: set[str] = set()
    for name, net in (
        ("instance", colorizer.instance_net),
        ("fusion", colorizer.fusion_net),
        ("full_image", colorizer.full_image_net),
    ):
        net.register_forward_hook(lambda *_args, name=name: called.add(name))
    colorizer.warmup(batch_size)
    assert called == expected


def test_an_unwanted_full_resolution_merge_stops_between_chunks(
    tiny_colorizer: Colorizer,
) -> None:
    from models.merge import Stopped

    image = noisy(2000, 1600, 9)  # 3.2 MP: two chunks of rows
    prepared = tiny_colorizer.prepare(image, ColorizeOptions())
    prediction = tiny_colorizer.predict([prepared])[0]
    asked: list[int] = []

    def stop_after_the_first_chunk() -> bool:
        asked.append(1)
        return len(asked) > 1

    with pytest.raises(Stopped):
        tiny_colorizer.merge(prepared, prediction, stop_after_the_first_chunk)
    assert len(asked) == 2
    whole = tiny_colorizer.merge(prepared, prediction, lambda: False).image
    assert whole.tobytes() == tiny_colorizer.merge(prepared, prediction).image.tobytes()
