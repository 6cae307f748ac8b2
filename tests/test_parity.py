"""The batched, vectorised pipeline against the naive reference transcription (spec §8 tolerances)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from reference_impl import reference_colorize
from weight_files import write_official

from models.boxes import Detections
from models.checkpoints import load_networks
from models.pipeline import ColorizeOptions, Colorizer

AB_TOLERANCE = 1e-5  # spec §8, CPU fp32


def photo(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.asarray(Image.linear_gradient("L").resize((width, height)), dtype=np.float64)
    noise = rng.normal(0, 25, size=(height // 8 + 1, width // 8 + 1))
    noise = np.asarray(Image.fromarray(noise.astype(np.float32)).resize((width, height)))
    return Image.fromarray(np.clip(base * 0.7 + noise + 40, 0, 255).astype(np.uint8)).convert("RGB")


BOXES_9 = [  # 9 boxes with distinct scores: the top-8 cap keeps 8, in ascending score order
    (10.7, 12.2, 120.9, 200.5), (200.0, 5.0, 300.0, 50.0), (250.0, 10.0, 253.0, 12.0),
    (316.0, 100.0, 319.0, 140.0), (0.0, 0.0, 320.0, 240.0), (40.0, 150.0, 90.0, 239.0),
    (100.0, 100.0, 101.0, 101.0), (150.5, 60.2, 230.9, 180.1), (5.0, 5.0, 25.0, 45.0),
]  # fmt: skip
SCORES_9 = [0.91, 0.85, 0.99, 0.72, 0.95, 0.88, 0.70, 0.93, 0.80]


def expected_boxes(boxes: list, scores: list, k: int = 8) -> list[tuple[int, int, int, int]]:
    """The reference's selection (spec §4.1), written out independently."""
    ints = [tuple(int(v) for v in b) for b in boxes]
    if len(ints) <= k:
        return ints
    order = np.argsort(np.asarray(scores), kind="stable")[-k:]
    return [ints[i] for i in order]


@pytest.mark.parametrize("n_boxes", [0, 2, 9])
def test_matches_reference_for_0_2_and_9_boxes(tiny_colorizer: Colorizer, n_boxes: int) -> None:
    image = photo(320, 240, seed=n_boxes)
    boxes, scores = BOXES_9[:n_boxes], SCORES_9[:n_boxes]
    supplied = Detections.from_boxes(boxes, scores) if boxes else None
    result = tiny_colorizer.colorize(
        [image], ColorizeOptions(resolution="network", boxes=supplied, max_instances=8)
    )[0]
    chosen = expected_boxes(boxes, scores)
    assert result.boxes == chosen
    nets = tiny_colorizer.networks
    ref_ab, ref_rgb = reference_colorize(image, chosen, nets.instance, nets.fusion, nets.full_image)

    prepared = tiny_colorizer.prepare(image, ColorizeOptions(resolution="network", boxes=supplied))
    ab = tiny_colorizer.predict([prepared])[0].ab.numpy()
    assert np.abs(ab - ref_ab).max() <= AB_TOLERANCE
    ours = np.asarray(result.image)
    assert ours.shape == (256, 256, 3)
    flips = np.abs(ours.astype(int) - ref_rgb.astype(int))
    assert flips.max() <= 1
    assert (flips > 0).mean() < 1e-3


@pytest.mark.slow
def test_matches_reference_at_official_width(tmp_path) -> None:
    """Full-size (width 64) networks from official-layout files: the real shapes, two boxes."""
    folder = write_official(tmp_path / "ck", width=64, seed=3)
    colorizer = Colorizer(load_networks(folder))
    image = photo(300, 200, seed=7)
    boxes = [(20.0, 30.0, 150.0, 190.0), (120.0, 10.0, 290.0, 120.0)]
    options = ColorizeOptions(resolution="network", boxes=Detections.from_boxes(boxes))
    ab = colorizer.predict([colorizer.prepare(image, options)])[0].ab.numpy()
    nets = colorizer.networks
    ref_ab, _ = reference_colorize(
        image, expected_boxes(boxes, [2, 1]), nets.instance, nets.fusion, nets.full_image
    )
    assert np.abs(ab - ref_ab).max() <= AB_TOLERANCE


def test_fp16_on_cpu_stays_finite_and_close(tiny_checkpoints) -> None:
    """The +1e5 background logit would overflow fp16; the fusion path keeps it in fp32."""
    try:
        half = Colorizer(load_networks(tiny_checkpoints), precision="fp16")
        image = photo(320, 240, seed=1)
        options = ColorizeOptions(resolution="network", boxes=Detections.from_boxes(BOXES_9[:3]))
        ab16 = half.predict([half.prepare(image, options)])[0].ab
    except RuntimeError as exc:  # pragma: no cover - depends on the CPU build
        if "not implemented for 'Half'" in str(exc):
            pytest.skip(f"this CPU build has no fp16 convolution: {exc}")
        raise
    full = Colorizer(load_networks(tiny_checkpoints))
    ab32 = full.predict([full.prepare(image, options)])[0].ab
    assert torch.isfinite(ab16).all()
    assert (ab16 - ab32).abs().max() < 0.05


@pytest.mark.cuda
def test_fp16_on_cuda_close_to_fp32(tiny_checkpoints) -> None:
    image = photo(320, 240, seed=2)
    options = ColorizeOptions(resolution="network", boxes=Detections.from_boxes(BOXES_9[:8]))
    half = Colorizer(load_networks(tiny_checkpoints), device="cuda", precision="fp16")
    full = Colorizer(load_networks(tiny_checkpoints), device="cuda", precision="fp32")
    ab16 = half.predict([half.prepare(image, options)])[0].ab
    ab32 = full.predict([full.prepare(image, options)])[0].ab
    cpu = Colorizer(load_networks(tiny_checkpoints))
    ab_cpu = cpu.predict([cpu.prepare(image, options)])[0].ab
    assert torch.isfinite(ab16).all()
    assert (ab32 - ab_cpu).abs().max() < 1e-4  # spec §8: GPU fp32 without TF32
    assert (ab16 - ab32).abs().max() < 0.05
