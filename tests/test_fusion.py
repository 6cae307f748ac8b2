"""The vectorised resize-and-pad and fusion against the reference's per-instance operations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from models.boxes import FUSION_SCALES, box_info
from models.fusion import build_layout, fuse_instances, place
from models.networks import WeightGenerator


@st.composite
def boxes_on_image(draw):  # type: ignore[no-untyped-def]
    width = draw(st.integers(8, 2000))
    height = draw(st.integers(8, 2000))
    n = draw(st.integers(1, 4))
    boxes = []
    for _ in range(n):
        x1 = draw(st.integers(0, width - 1))
        y1 = draw(st.integers(0, height - 1))
        boxes.append((x1, y1, draw(st.integers(x1 + 1, width)), draw(st.integers(y1 + 1, height))))
    return width, height, boxes


@settings(max_examples=25, deadline=None)
@given(boxes_on_image(), st.sampled_from(FUSION_SCALES))
def test_place_equals_interpolate_and_pad(case, size) -> None:  # type: ignore[no-untyped-def]
    width, height, boxes = case
    infos = [[{s: box_info(b, width, height, s) for s in FUSION_SCALES} for b in boxes]]
    layout = build_layout(infos, "cpu")
    values = torch.randn(len(boxes), 3, size, size, generator=torch.Generator().manual_seed(size))
    geometry = layout.scales[size]
    placed = place(values, geometry.grid, geometry.mask)
    for i, info in enumerate(infos[0]):
        left, right, top, bottom, w, h = info[size]
        resized = F.interpolate(
            values[i : i + 1], size=(h, w), mode="bilinear", align_corners=False
        )
        expected = F.pad(resized, (left, right, top, bottom))[0]
        # Source coordinates up to 255 carry float32 rounding of ~1.5e-5 px in both
        # implementations; with N(0, 1) neighbours that is at most ~1e-4 in value.
        assert torch.allclose(placed[i], expected, atol=1e-4, rtol=0)
        outside = geometry.mask[i].expand_as(expected) == 0
        assert torch.equal(placed[i][outside], torch.zeros_like(placed[i][outside]))
        assert torch.equal(expected[outside], torch.zeros_like(expected[outside]))


def test_full_image_feature_passes_through_outside_every_box_bit_exactly() -> None:
    torch.manual_seed(0)
    generator = WeightGenerator(8)
    infos = [[{s: box_info((20, 30, 120, 90), 320, 240, s) for s in FUSION_SCALES}],
             [{s: box_info((0, 0, 10, 10), 100, 100, s) for s in FUSION_SCALES},
              {s: box_info((50, 50, 100, 100), 100, 100, s) for s in FUSION_SCALES}]]  # fmt: skip
    layout = build_layout(infos, "cpu")
    full = torch.randn(2, 8, 64, 64)
    instances = torch.randn(3, 8, 64, 64)
    with torch.no_grad():
        fused = fuse_instances(full, instances, generator.simple_instance_conv,
                               generator.simple_bg_conv, layout)  # fmt: skip
    outside = layout.scales[64].union == 0
    assert torch.equal(fused[outside.expand_as(fused)], full[outside.expand_as(full)])
    inside = ~outside
    assert not torch.equal(fused[inside.expand_as(fused)], full[inside.expand_as(full)])


def test_fp16_features_do_not_overflow_with_the_background_boost() -> None:
    torch.manual_seed(0)
    generator = WeightGenerator(4)
    infos = [[{s: box_info((10, 10, 50, 50), 64, 64, s) for s in FUSION_SCALES}]]
    layout = build_layout(infos, "cpu")
    full = torch.randn(1, 4, 32, 32).half()
    with torch.no_grad():
        fused = fuse_instances(full, torch.randn(1, 4, 32, 32).half(),
                               generator.simple_instance_conv, generator.simple_bg_conv, layout)  # fmt: skip
    assert fused.dtype == torch.float16 and torch.isfinite(fused).all()
