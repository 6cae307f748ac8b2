"""Precisions and memory formats: bf16 against fp32, channels_last against NCHW, the auto choice.

bf16 is emulated (slow) on CPUs without AMX/AVX512-BF16, so these run tiny width-8 networks on
small inputs. The tolerances are the ones docs/performance.md states.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

from models import precision
from models.boxes import Detections
from models.checkpoints import ColorizationNetworks, load_networks
from models.pipeline import ColorizeOptions, Colorizer, Prediction
from models.precision import (
    CpuFeatures,
    Precision,
    cuda_auto_precision,
    probe_cpu,
    resolve_precision,
)
from service.settings import AUTO_BATCH_SIZE, ModelSettings, ServiceSettings

BF16_MEAN_AB = 0.01  # normalised ab (range [-1, 1]), mean absolute difference to fp32
BF16_MAX_AB = 0.1  # normalised ab, largest difference at any pixel


def _colorizer(checkpoints: Path, precision: Precision, channels_last: bool) -> Colorizer:
    return Colorizer(load_networks(checkpoints), precision=precision, channels_last=channels_last)


def _boxes() -> Detections:
    return Detections.from_boxes([[20, 30, 140, 200], [150, 50, 300, 180], [5, 5, 60, 60]])


def _predict(colorizer: Colorizer, images: list[Image.Image], with_boxes: bool) -> list[Prediction]:
    options = ColorizeOptions(resolution="network", boxes=_boxes() if with_boxes else None)
    return colorizer.predict([colorizer.prepare(image, options) for image in images])


def _ab(predictions: list[Prediction]) -> torch.Tensor:
    return torch.stack([p.ab for p in predictions])


@pytest.mark.parametrize("with_boxes", [True, False], ids=["fusion", "full-image"])
def test_channels_last_equals_nchw_at_fp32(
    tiny_checkpoints: Path, gray_photo: Image.Image, with_boxes: bool
) -> None:
    nchw = _colorizer(tiny_checkpoints, "fp32", channels_last=False)
    nhwc = _colorizer(tiny_checkpoints, "fp32", channels_last=True)
    assert nhwc.full_image_net.model1[0].weight.is_contiguous(memory_format=torch.channels_last)
    expected = _ab(_predict(nchw, [gray_photo], with_boxes))
    actual = _ab(_predict(nhwc, [gray_photo], with_boxes))
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("with_boxes", [True, False], ids=["fusion", "full-image"])
def test_bf16_on_cpu_is_within_the_documented_tolerance(
    tiny_checkpoints: Path, gray_photo: Image.Image, with_boxes: bool
) -> None:
    reference = _ab(_predict(_colorizer(tiny_checkpoints, "fp32", False), [gray_photo], with_boxes))
    bf16 = _colorizer(tiny_checkpoints, "bf16", channels_last=True)
    assert bf16.full_image_net.model1[0].weight.dtype == torch.bfloat16
    # the fusion logits stay float32 in bf16 mode too (models/fusion.py)
    assert bf16.fusion_net.weight_layer.simple_bg_conv[0].weight.dtype == torch.float32
    actual = _ab(_predict(bf16, [gray_photo], with_boxes))
    assert actual.dtype == torch.float32
    difference = (actual - reference).abs()
    assert 0 < difference.mean().item() <= BF16_MEAN_AB  # > 0: bf16 really ran
    assert difference.max().item() <= BF16_MAX_AB


def test_bf16_batch_equals_one_by_one(tiny_checkpoints: Path, gray_photo: Image.Image) -> None:
    bf16 = _colorizer(tiny_checkpoints, "bf16", channels_last=True)
    images = [gray_photo, gray_photo.rotate(90, expand=True), gray_photo.transpose(0)]
    batched = _ab(_predict(bf16, images, with_boxes=True))
    alone = torch.cat([_ab(_predict(bf16, [image], with_boxes=True)) for image in images])
    difference = (batched - alone).abs()
    assert difference.mean().item() <= BF16_MEAN_AB / 10
    assert difference.max().item() <= BF16_MAX_AB


def test_bf16_detector_runs_under_autocast(tiny_checkpoints: Path, detector_weights: Path) -> None:
    colorizer = Colorizer.load(tiny_checkpoints, detector_weights, precision="bf16",
                               detector_size=(64, 96))  # fmt: skip
    assert colorizer.detector is not None
    assert colorizer.detector.autocast_dtype == torch.bfloat16
    backbone = colorizer.detector.model.backbone.body.conv1.weight
    assert backbone.is_contiguous(memory_format=torch.channels_last)
    image = Image.linear_gradient("L").resize((96, 64))
    result = colorizer.colorize([image], ColorizeOptions(resolution="network", score_threshold=0))
    assert result[0].image.size == (256, 256)


AVX2 = CpuFeatures("AVX2", amx=False, avx512_bf16=False, cpuinfo_flags=())
AVX512_NO_BF16 = CpuFeatures("AVX512", amx=False, avx512_bf16=False, cpuinfo_flags=())
ZEN4 = CpuFeatures("AVX512", amx=False, avx512_bf16=True, cpuinfo_flags=("avx512_bf16",))
SAPPHIRE_RAPIDS = CpuFeatures("AVX512", amx=True, avx512_bf16=True,
                              cpuinfo_flags=("amx_bf16", "avx512_bf16"))  # fmt: skip


@pytest.mark.parametrize(
    ("cpu", "expected"),
    [(AVX2, "fp32"), (AVX512_NO_BF16, "fp32"), (ZEN4, "bf16"), (SAPPHIRE_RAPIDS, "bf16")],
)
def test_auto_picks_bf16_only_on_cpus_with_native_bf16(
    monkeypatch: pytest.MonkeyPatch, cpu: CpuFeatures, expected: str
) -> None:
    monkeypatch.setattr(precision, "probe_cpu", lambda: cpu)
    assert resolve_precision("auto", "cpu") == expected
    assert ModelSettings(device="cpu").resolved_precision() == expected
    if not torch.cuda.is_available():  # capability unknown here: the Ampere+ choice
        assert resolve_precision("auto", "cuda") == "bf16"
        assert resolve_precision("auto", "cuda:1") == "bf16"
    assert cuda_auto_precision((9, 0)) == "bf16"  # Hopper
    assert cuda_auto_precision((8, 0)) == "bf16"  # Ampere
    assert cuda_auto_precision((7, 5)) == "fp16"  # Turing: no bf16 tensor cores
    for explicit in ("fp32", "fp16", "bf16"):
        assert resolve_precision(explicit, "cpu") == explicit  # type: ignore[arg-type]
    reason = precision.precision_reason("auto", "cpu")
    assert f"precision {expected}" in reason and cpu.capability in reason


def test_cpu_probe_reads_cpuinfo_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n\n")
    monkeypatch.setattr(precision, "CPUINFO", cpuinfo)
    monkeypatch.setattr(precision, "_torch_probe", lambda name: False)
    found = probe_cpu.__wrapped__()  # type: ignore[attr-defined]  # bypass the cache
    assert found.avx512_bf16 and not found.amx and found.native_bf16
    assert found.describe()["bf16_instructions"] == ["AVX512-BF16"]
    cpuinfo.write_text("flags\t\t: fpu sse avx2\n")
    found = probe_cpu.__wrapped__()  # type: ignore[attr-defined]
    assert not found.native_bf16 and found.describe()["bf16_instructions"] == []


def test_this_machine_is_described(tiny_colorizer: Colorizer) -> None:
    info = tiny_colorizer.describe()
    assert info["channels_last"] is True
    assert info["cpu"]["capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(info["cpu"]["native_bf16"], bool)


def test_warmup_is_minimal_on_cpu_and_full_on_cuda() -> None:
    settings = ServiceSettings(max_batch_size=8, instance_limit=8)
    assert settings.warmup_plan("cpu") == ([1], 1)
    assert settings.warmup_plan("cuda") == ([1, 2, 4, 8], 8)
    assert ServiceSettings(warmup_scope="full", max_batch_size=8).warmup_plan("cpu") == (
        [1, 2, 4, 8],
        8,
    )
    assert ServiceSettings(warmup_scope="minimal").warmup_plan("cuda") == ([1], 1)
    assert ServiceSettings(instance_limit=0).warmup_plan("cpu") == ([1], 0)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["fp16", "bf16"])
def test_cuda_half_precisions_with_channels_last_against_fp32(
    tiny_checkpoints: Path, gray_photo: Image.Image, mode: Precision
) -> None:
    reference = Colorizer(load_networks(tiny_checkpoints), device="cuda", channels_last=False)
    expected = _ab(_predict(reference, [gray_photo], with_boxes=True))
    half = Colorizer(load_networks(tiny_checkpoints), device="cuda", precision=mode)
    actual = _ab(_predict(half, [gray_photo], with_boxes=True))
    difference = (actual - expected).abs()
    assert difference.mean().item() <= BF16_MEAN_AB
    assert difference.max().item() <= BF16_MAX_AB
    nhwc = Colorizer(load_networks(tiny_checkpoints), device="cuda", channels_last=True)
    torch.testing.assert_close(
        _ab(_predict(nhwc, [gray_photo], with_boxes=True)), expected, rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("command", ["colorize", "serve", "worker"])
def test_precision_flags_reach_the_settings(command: str) -> None:
    from service.cli import build_parser
    from service.commands.model_flags import model_overrides

    extra = ["in.png", "-o", "out"] if command == "colorize" else []
    args = build_parser().parse_args(
        [command, *extra, "--precision", "bf16", "--no-channels-last", "--device", "cpu"]
    )
    settings = ModelSettings(**model_overrides(args))
    assert settings.precision == "bf16" and settings.channels_last is False
    assert settings.resolved_precision() == "bf16"
    args = build_parser().parse_args([command, *extra, "--precision", "auto"])
    assert ModelSettings(**model_overrides(args)).channels_last is True


def test_colorize_batch_size_is_auto_unless_given(
    tiny_checkpoints: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.cli import build_parser, main
    from service.commands import colorize

    assert build_parser().parse_args(["colorize", "a.png", "-o", "o"]).batch_size is None
    assert (
        build_parser()
        .parse_args(["colorize", "a.png", "-o", "o", "--batch-size", "auto"])
        .batch_size
        is None
    )
    assert (
        build_parser().parse_args(["colorize", "a.png", "-o", "o", "--batch-size", "3"]).batch_size
        == 3
    )
    seen: list[int] = []
    real = colorize.process

    def spy(*args: object, batch_size: int, **kwargs: object) -> object:
        seen.append(batch_size)
        return real(*args, batch_size=batch_size, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(colorize, "process", spy)
    source = tmp_path / "in.png"
    Image.linear_gradient("L").resize((40, 30)).save(source)
    argv = ["colorize", str(source), "-o", str(tmp_path / "out"), "--no-progress",
            "--no-detector", "--checkpoints", str(tiny_checkpoints)]  # fmt: skip
    assert main(argv) == 0
    assert seen == [AUTO_BATCH_SIZE["cpu"]] == [1]


def test_max_batch_size_defaults_per_device() -> None:
    """Unset, a CPU batches one image at a time (the fastest there) and CUDA up to 8."""
    assert ServiceSettings(device="cpu").resolved_max_batch_size() == 1
    assert ServiceSettings(device="cpu").batch_buckets() == [1]
    assert ServiceSettings(device="cuda").resolved_max_batch_size() == 8
    assert ServiceSettings(device="cuda:1").batch_buckets() == [1, 2, 4, 8]
    assert ServiceSettings(device="cpu", max_batch_size=4).resolved_max_batch_size() == 4


def test_the_python_api_accepts_auto_with_the_command_lines_rule(tiny_checkpoints: Path) -> None:
    colorizer = Colorizer.load(tiny_checkpoints, precision="auto")
    assert colorizer.precision == resolve_precision("auto", "cpu")
    assert colorizer.precision == ModelSettings(device="cpu").resolved_precision()
    assert colorizer.dtype == precision.DTYPES[colorizer.precision]
    assert colorizer.describe()["precision"] == colorizer.precision
    direct = Colorizer(load_networks(tiny_checkpoints), precision="auto")
    assert direct.precision == colorizer.precision


@pytest.mark.parametrize("bad", ["fp64", "AUTO", "", "float32"])
def test_an_unknown_precision_is_a_value_error_naming_the_valid_ones(
    tiny_checkpoints: Path, tmp_path: Path, bad: str
) -> None:
    valid = "'auto', 'fp32', 'fp16', 'bf16'"
    with pytest.raises(ValueError, match=f"precision must be one of {valid}, got {bad!r}"):
        Colorizer.load(tiny_checkpoints, precision=bad)  # type: ignore[arg-type]
    # refused before any weight is read: a missing folder is not what is reported
    with pytest.raises(ValueError, match="precision must be one of"):
        Colorizer.load(tmp_path / "missing", precision=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="precision must be one of"):
        Colorizer(load_networks(tiny_checkpoints), precision=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision(bad, "cpu")


OVERFLOW_SCALE = 1e5
"""Times the full-image net's first convolution: its outputs pass fp16's 65504 (inf, then NaN
further on) while float32 holds them."""


def _overflowing_networks(checkpoints: Path) -> ColorizationNetworks:
    networks = load_networks(checkpoints)
    with torch.no_grad():
        networks.full_image.model1[0].weight.mul_(OVERFLOW_SCALE)
    return networks


def test_fp16_overflow_is_rerun_in_fp32_per_image(
    tiny_checkpoints: Path, gray_photo: Image.Image
) -> None:
    boxed = ColorizeOptions(resolution="network", boxes=_boxes())
    plain = ColorizeOptions(resolution="network", max_instances=0)

    def run(colorizer: Colorizer) -> list[Prediction]:
        return colorizer.predict([colorizer.prepare(gray_photo, o) for o in (boxed, plain)])

    networks = _overflowing_networks
    unguarded = run(
        Colorizer(networks(tiny_checkpoints), precision="fp16", precision_fallback=False)
    )
    # the overflow is real: the full-image image's fp16 output is not finite, nothing re-ran it
    assert unguarded[1].nonfinite > 0 and not unguarded[1].fallback
    assert not torch.isfinite(unguarded[1].ab).all()

    reference = run(Colorizer(networks(tiny_checkpoints), precision="fp32"))
    assert all(torch.isfinite(p.ab).all() and p.nonfinite == 0 for p in reference)

    guarded = run(Colorizer(networks(tiny_checkpoints), precision="fp16"))
    overflowed, kept = guarded[1], guarded[0]
    assert overflowed.fallback and overflowed.nonfinite == unguarded[1].nonfinite
    assert torch.isfinite(overflowed.ab).all()
    # the re-run is the fp32 networks' own result (same boxes, same weights)
    torch.testing.assert_close(overflowed.ab, reference[1].ab, rtol=0, atol=1e-5)
    # the image with boxes (fusion net, untouched weights) stayed fp16: no re-run, fp16's result
    assert kept.nonfinite == 0 and not kept.fallback
    torch.testing.assert_close(kept.ab, unguarded[0].ab, rtol=0, atol=0)
    assert (kept.ab - reference[0].ab).abs().max().item() > 0  # it really is fp16's


def test_fp32_keeps_no_fallback_copy(tiny_checkpoints: Path) -> None:
    assert Colorizer(load_networks(tiny_checkpoints))._fp32 is None
    guarded = Colorizer(load_networks(tiny_checkpoints), precision="bf16")
    assert guarded._fp32 is not None
    assert guarded._fp32.full_image.model1[0].weight.dtype == torch.float32


async def test_the_engine_counts_precision_fallbacks(tiny_checkpoints: Path) -> None:
    import image_corpus as corpus
    from prometheus_client import CollectorRegistry
    from service_helpers import make_job

    from service.core.jobs import JobResult
    from service.core.metrics import Metrics
    from service.engine.batch import BatchEngine

    colorizer = Colorizer(_overflowing_networks(tiny_checkpoints), precision="fp16")
    registry = CollectorRegistry()
    engine = BatchEngine(colorizer, ThreadPoolExecutor(2), Metrics(registry), max_pixels=10**7)
    try:  # no detector, no boxes: both go through the overflowing full-image net
        outcomes = await engine.run_batch(
            [make_job(corpus.png(), "a"), make_job(corpus.png(), "b")]
        )
    finally:
        engine.close()
    assert all(isinstance(o, JobResult) for o in outcomes)
    assert registry.get_sample_value("colorize_precision_fallbacks_total") == 2


# Device crops (one batched roi_align, no 8-bit rounding) against PIL's, measured on this photo
# (AMD EPYC, fp32): L_norm max 0.132 at the crops' outer rows and columns (roi_align reads the
# pixel just outside the box where PIL clamps at the crop's edge; here a sharp paste edge lies
# just outside two boxes), 0.0042 inside them, mean 0.00078; ab (tiny width-8 random nets)
# max 0.0116, mean 0.000115. Bounds about 1.5-2x that. Trained full-width nets: unmeasured.
DEVICE_CROP_MAX_L = 0.2  # normalised L (range about [-1, 1]), crop borders included
DEVICE_CROP_MAX_L_INSIDE = 0.01  # two pixels in from each crop edge
DEVICE_CROP_MEAN_L = 0.0015
DEVICE_CROP_MAX_AB = 0.025  # normalised ab (range [-1, 1])
DEVICE_CROP_MEAN_AB = 0.0003


def test_device_crops_deviate_from_pil_within_the_stated_bound(
    tiny_checkpoints: Path, gray_photo: Image.Image
) -> None:
    from models.preprocess import crop_l, crop_l_on_device, rgb_uint8

    rgb = gray_photo.convert("RGB")
    boxes = [(20, 30, 140, 200), (150, 50, 300, 180), (5, 5, 60, 60)]
    pil = crop_l(rgb, boxes)
    device = crop_l_on_device(
        [rgb_uint8(rgb)],
        torch.tensor(boxes),
        torch.zeros(len(boxes), dtype=torch.long),
        torch.device("cpu"),
    )
    l_diff = (device - pil).abs()
    print(f"device crops vs PIL, L_norm: max {l_diff.max():.5f} mean {l_diff.mean():.6f}")
    assert 0 < l_diff.mean().item() <= DEVICE_CROP_MEAN_L
    assert l_diff.max().item() <= DEVICE_CROP_MAX_L
    assert l_diff[..., 2:-2, 2:-2].max().item() <= DEVICE_CROP_MAX_L_INSIDE

    reference = _ab(_predict(Colorizer(load_networks(tiny_checkpoints)), [gray_photo], True))
    on_device = Colorizer(load_networks(tiny_checkpoints), device_crops=True)
    ab_diff = (_ab(_predict(on_device, [gray_photo], True)) - reference).abs()
    print(f"device crops vs PIL, ab: max {ab_diff.max():.5f} mean {ab_diff.mean():.6f}")
    assert 0 < ab_diff.mean().item() <= DEVICE_CROP_MEAN_AB
    assert ab_diff.max().item() <= DEVICE_CROP_MAX_AB
