"""The device path of ``Colorizer.predict`` (issue 18): batched device crops, box layout in
tensor ops, instance-batch buckets. Each piece is checked against the per-box computation it
replaces (``crop_l``-shaped per-image crops, ``box_info`` + ``build_layout``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from models.boxes import FUSION_SCALES, Detections, box_info, box_info_rows, box_info_table
from models.checkpoints import load_networks
from models.fusion import build_layout
from models.pipeline import (
    ColorizeOptions,
    Colorizer,
    _BoxLayout,
    instance_bucket,
    instance_buckets_up_to,
    pad_rows,
)
from models.preprocess import crop_l_on_device, rgb_uint8

CPU = torch.device("cpu")


@st.composite
def boxes_in_images(draw: st.DrawFn) -> tuple[list[tuple[int, int]], list[list[tuple[int, ...]]]]:
    sizes, boxes = [], []
    for _ in range(draw(st.integers(1, 3))):
        width, height = draw(st.integers(1, 900)), draw(st.integers(1, 900))
        image = []
        for _ in range(draw(st.integers(1, 4))):
            x1, y1 = draw(st.integers(0, width - 1)), draw(st.integers(0, height - 1))
            x2, y2 = draw(st.integers(x1 + 1, width)), draw(st.integers(y1 + 1, height))
            image.append((x1, y1, x2, y2))
        sizes.append((width, height))
        boxes.append(image)
    return sizes, boxes


@settings(deadline=None, max_examples=60)
@given(boxes_in_images())
def test_box_info_rows_equal_box_info_row_by_row(case) -> None:  # type: ignore[no-untyped-def]
    sizes, boxes = case
    flat = torch.tensor([b for image in boxes for b in image])
    per_box = torch.tensor([s for s, image in zip(sizes, boxes, strict=True) for _ in image])
    for scale in FUSION_SCALES:
        expected = [
            box_info(b, *s, scale) for s, image in zip(sizes, boxes, strict=True) for b in image
        ]  # type: ignore[arg-type]
        assert box_info_rows(flat, per_box, scale).tolist() == [list(r) for r in expected]


@settings(deadline=None, max_examples=25)
@given(boxes_in_images())
def test_tensor_layout_equals_the_per_box_layout(case) -> None:  # type: ignore[no-untyped-def]
    sizes, boxes = case
    infos = [
        [{s: box_info(b, *size, s) for s in FUSION_SCALES} for b in image]  # type: ignore[arg-type]
        for size, image in zip(sizes, boxes, strict=True)
    ]
    expected = build_layout(infos, "cpu")
    got = _BoxLayout.of(boxes, sizes).fusion_layout(CPU)  # type: ignore[arg-type]
    assert torch.equal(got.image_index, expected.image_index)
    assert torch.equal(got.slot_index, expected.slot_index)
    assert (got.batch_size, got.max_instances) == (expected.batch_size, expected.max_instances)
    for scale in FUSION_SCALES:
        for name in ("grid", "mask", "union"):
            assert torch.equal(
                getattr(got.scales[scale], name), getattr(expected.scales[scale], name)
            )


@settings(deadline=None, max_examples=25)
@given(boxes_in_images())
def test_all_scales_at_once_equal_one_scale_at_a_time(case) -> None:  # type: ignore[no-untyped-def]
    """``_axes`` (every scale in one pass) against ``_axis`` (the per-scale form), bit for bit."""
    from models.fusion import _axes, _axis

    sizes, boxes = case
    flat = torch.tensor([b for image in boxes for b in image])
    per_box = torch.tensor([s for s, image in zip(sizes, boxes, strict=True) for _ in image])
    table = box_info_table(flat, per_box)
    coords, inside = _axes(table[:, :, 0], table[:, :, 4])
    offset = 0
    for i, scale in enumerate(FUSION_SCALES):
        one_coords, one_inside = _axis(table[i, :, 0], table[i, :, 4], scale)
        assert torch.equal(coords[:, offset : offset + scale], one_coords)
        assert torch.equal(inside[:, offset : offset + scale], one_inside)
        offset += scale


def test_a_layout_without_stopped_images_keeps_the_others_rows() -> None:
    layout = _BoxLayout.of([[(0, 0, 5, 5)], [(1, 1, 4, 4), (2, 2, 8, 8)], [(0, 0, 3, 3)]],
                           [(10, 10), (20, 20), (30, 30)])  # fmt: skip
    kept = layout.images([1, 2])
    assert kept.rows.tolist() == [1, 2, 3]
    assert kept.image_index.tolist() == [0, 0, 1]
    assert kept.slot_index.tolist() == [0, 1, 0]
    assert kept.sizes.tolist() == [[20, 20], [20, 20], [30, 30]]
    assert kept.counts == (2, 1)


def picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.asarray(Image.linear_gradient("L").resize((width, height)), dtype=np.float64)
    values = np.clip(base + rng.normal(0, 20, size=base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(values, mode="L").convert("RGB")


def test_device_crops_of_an_image_do_not_depend_on_the_other_images_of_the_batch() -> None:
    """The padded canvas repeats each image's edge: a box at the image's right/bottom edge reads
    the same values beside a larger image as alone (to float rounding: roi_align's bilinear
    weights then mix a pixel with its copy, which need not round back to the pixel)."""
    small, large = picture(120, 90, 0), picture(300, 260, 1)
    boxes_small = [(0, 0, 120, 90), (60, 40, 120, 90), (100, 80, 120, 90)]
    boxes_large = [(10, 10, 300, 260)]
    alone = crop_l_on_device(
        [rgb_uint8(small)], torch.tensor(boxes_small), torch.zeros(3, dtype=torch.long), CPU
    )
    together = crop_l_on_device(
        [rgb_uint8(large), rgb_uint8(small)],
        torch.tensor(boxes_large + boxes_small),
        torch.tensor([0, 1, 1, 1]),
        CPU,
    )
    torch.testing.assert_close(together[1:], alone, atol=1e-6, rtol=0)
    first = crop_l_on_device(
        [rgb_uint8(large)], torch.tensor(boxes_large), torch.zeros(1, dtype=torch.long), CPU
    )
    torch.testing.assert_close(together[:1], first, atol=1e-6, rtol=0)


def test_device_crops_in_several_groups_equal_one_group(monkeypatch: pytest.MonkeyPatch) -> None:
    from models import preprocess

    images = [picture(64, 48, 2), picture(80, 100, 3), picture(50, 50, 4)]
    boxes = torch.tensor([(0, 0, 64, 48), (10, 20, 80, 100), (5, 5, 30, 40), (0, 0, 50, 50)])
    index = torch.tensor([0, 1, 1, 2])
    one = crop_l_on_device([rgb_uint8(i) for i in images], boxes, index, CPU)
    monkeypatch.setattr(preprocess, "MAX_CROP_SOURCE_ELEMENTS", 3 * 100 * 80)  # one image each
    assert preprocess._source_groups([(48, 64), (100, 80), (50, 50)]) == [[0], [1], [2]]
    grouped = crop_l_on_device([rgb_uint8(i) for i in images], boxes, index, CPU)
    torch.testing.assert_close(grouped, one, atol=1e-6, rtol=0)  # edge copies: see above


def test_instance_bucket() -> None:
    assert [instance_bucket(n) for n in (0, 1, 2, 3, 5, 8, 9, 33, 64, 65, 200)] == [
        0, 1, 2, 4, 8, 8, 16, 64, 64, 128, 256,
    ]  # fmt: skip
    assert instance_bucket(3, (4, 10)) == 4 and instance_bucket(11, (4, 10)) == 20
    assert instance_buckets_up_to(8) == [1, 2, 4, 8]
    assert instance_buckets_up_to(6) == [1, 2, 4, 8]
    assert instance_buckets_up_to(256) == [1, 2, 4, 8, 16, 32, 64, 128, 192, 256]
    for count in range(1, 300):  # every size a batch can pad to is warmed
        assert instance_bucket(count) in instance_buckets_up_to(max(count, 1) + 7)


def test_padded_instance_rows_do_not_change_the_real_rows(tiny_checkpoints: Path) -> None:
    colorizer = Colorizer(load_networks(tiny_checkpoints))
    crops = torch.rand(3, 1, 256, 256) * 2 - 1
    _, alone = colorizer.instance_net(colorizer._network_input(crops, torch.float32))
    padded = pad_rows(crops, instance_bucket(3))
    assert padded.shape[0] == 4 and torch.equal(padded[:3], crops)
    _, together = colorizer.instance_net(colorizer._network_input(padded, torch.float32))
    for name, value in alone.items():
        torch.testing.assert_close(together[name][:3], value, atol=1e-5, rtol=0)


def test_device_crop_pipeline_batched_equals_one_by_one(tiny_checkpoints: Path) -> None:
    colorizer = Colorizer(load_networks(tiny_checkpoints), device_crops=True)
    images = [picture(160, 120, 5), picture(90, 200, 6), picture(64, 64, 7)]
    options = [
        ColorizeOptions(
            boxes=Detections.from_boxes([[0, 0, 80, 60], [40, 30, 160, 120], [5, 5, 9, 9]])
        ),
        ColorizeOptions(boxes=Detections.from_boxes([[10, 10, 90, 200]])),
        ColorizeOptions(max_instances=0),
    ]
    prepared = [colorizer.prepare(im, op) for im, op in zip(images, options, strict=True)]
    assert prepared[0].pixels is not None and prepared[2].pixels is None
    together = colorizer.predict(prepared)  # 4 crops: no padding; alone: 3 -> 4, 1 -> 1
    for p, t in zip(prepared, together, strict=True):
        alone = colorizer.predict([p])[0]
        assert alone.boxes == t.boxes
        torch.testing.assert_close(alone.ab, t.ab, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("device", "setting", "expected"),
    [("cpu", "auto", False), ("cuda", "auto", True), ("cuda:1", "auto", True),
     ("cpu", "on", True), ("cuda", "off", False)],
)  # fmt: skip
def test_device_crops_setting(device: str, setting: str, expected: bool) -> None:
    from service.settings import ModelSettings

    settings = ModelSettings(device=device, device_crops=setting)  # type: ignore[arg-type]
    assert settings.resolved_device_crops() is expected


def test_fusion_drops_the_padded_instance_rows(tiny_checkpoints: Path) -> None:
    colorizer = Colorizer(load_networks(tiny_checkpoints))
    boxes = [[(0, 0, 60, 40), (20, 10, 100, 80), (5, 5, 9, 9)]]
    layout = _BoxLayout.of(boxes, [(100, 80)]).fusion_layout(CPU)
    crops = torch.rand(3, 1, 256, 256) * 2 - 1
    full = colorizer._network_input(torch.rand(1, 1, 256, 256) * 2 - 1, torch.float32)
    _, exact = colorizer.instance_net(colorizer._network_input(crops, torch.float32))
    _, padded = colorizer.instance_net(colorizer._network_input(pad_rows(crops, 4), torch.float32))
    assert all(value.shape[0] == 4 for value in padded.values())
    torch.testing.assert_close(
        colorizer.fusion_net(full, padded, layout),
        colorizer.fusion_net(full, exact, layout),
        atol=1e-5,
        rtol=0,
    )


def test_warm_shapes_runs_every_bucket_and_image_count(tiny_checkpoints: Path) -> None:
    colorizer = Colorizer(load_networks(tiny_checkpoints))
    seen: dict[str, set[int]] = {"instance": set(), "fusion": set(), "full": set()}
    for name, net in (("instance", colorizer.instance_net), ("fusion", colorizer.fusion_net),
                      ("full", colorizer.full_image_net)):  # fmt: skip

        def record(module: object, args: tuple[torch.Tensor, ...], name: str = name) -> None:
            seen[name].add(int(args[0].shape[0]))

        net.register_forward_pre_hook(record)
    colorizer.warm_shapes(4, 3)
    assert seen["instance"] == {1, 2, 4, 8, 16}  # every bucket of 1..12 crops
    assert seen["fusion"] == seen["full"] == {1, 2, 3, 4}
    for name in seen:
        seen[name].clear()
    colorizer.warm_shapes(4, 3)  # already warm: nothing runs again
    assert not any(seen.values())


def test_warm_shapes_runs_the_detector_at_every_canvas(
    tiny_checkpoints: Path, detector_weights: Path
) -> None:
    from models.detector import BoxDetector

    detector = BoxDetector.from_file(detector_weights, min_size=64, max_size=96, shape_buckets=True)
    colorizer = Colorizer(load_networks(tiny_checkpoints), detector=detector)
    seen: set[tuple[int, ...]] = set()

    def record(module: object, args: tuple[torch.Tensor, ...]) -> None:
        seen.add(tuple(args[0].shape))

    detector.model.backbone.register_forward_pre_hook(record)
    colorizer.warm_shapes(2, 1)
    # landscape 64x96 and portrait 96x64 at 1 and 2 images, the mixed square 96x96 at 2
    assert seen == {(1, 3, 64, 96), (2, 3, 64, 96), (1, 3, 96, 64), (2, 3, 96, 64), (2, 3, 96, 96)}


@pytest.mark.cuda
def test_on_cuda_predict_synchronises_once_and_matches_the_cpu(tiny_checkpoints: Path) -> None:
    """On a GPU: the device path's only synchronisations are the final copy of ab (and its
    counts) to the host; its ab equals the CPU's device-crop path to float tolerance."""
    import warnings

    images = [picture(320, 240, 8), picture(200, 300, 9)]
    options = [
        ColorizeOptions(boxes=Detections.from_boxes([[0, 0, 160, 120], [100, 50, 320, 240]])),
        ColorizeOptions(boxes=Detections.from_boxes([[10, 10, 190, 290]])),
    ]
    gpu = Colorizer(load_networks(tiny_checkpoints), device="cuda", device_crops=True)
    assert gpu.device_crops
    prepared = [gpu.prepare(im, op) for im, op in zip(images, options, strict=True)]
    gpu.predict(prepared)  # first run: allocations, cudnn tuning
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            on_gpu = gpu.predict(prepared)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 2, [
        str(w.message) for w in syncs
    ]  # the copy (and .tolist of its host copy: none)
    cpu = Colorizer(load_networks(tiny_checkpoints), device_crops=True)
    on_cpu = cpu.predict([cpu.prepare(im, op) for im, op in zip(images, options, strict=True)])
    for g, c in zip(on_gpu, on_cpu, strict=True):
        torch.testing.assert_close(g.ab, c.ab, atol=1e-3, rtol=0)
