"""Vectorised instance fusion (spec §4.3, §4.4): all instances of all images at once.

The reference loops over instances, resizing each feature map to its box with
``F.interpolate(bilinear, align_corners=False)`` and zero-padding it into the canvas. Here one
``grid_sample`` call per fusion point does that for every instance: the grid reproduces
``interpolate``'s source coordinates inside the box, ``border`` padding reproduces its edge clamp,
and the box mask zeroes everything outside. Instances of different images are grouped by padding
each image's logits to ``max_instances`` with ``-inf`` (weight exactly 0), so one softmax covers
the batch. Logits, softmax and the weighted sum run in float32 whatever the trunk's dtype: the
+1e5 background logit overflows fp16 (spec §7 quirk 5). bf16 has float32's exponent range, so
there the logit would not overflow, but it would still be wrong enough to keep float32: bf16's
8-bit significand rounds ``logit + 1e5`` to a multiple of 512 and the in-box logits to about
three digits, and summing up to nine weighted features in bf16 adds its rounding to every
fused pixel. The weight generators are 16-channel branches, so float32 there costs little.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.boxes import FUSION_SCALES

BACKGROUND_BOOST = 100000.0
"""Added to the background logit outside every box, so the full-image feature passes through."""

MAX_PLACED_ELEMENTS = 1 << 27
"""Upper bound on the elements of one chunk of placed instance features (bounds peak memory)."""

BoxInfo = tuple[int, int, int, int, int, int]


@dataclass(frozen=True)
class ScaleLayout:
    grid: torch.Tensor  # (M, S, S, 2) grid_sample coordinates of each instance's resized feature
    mask: torch.Tensor  # (M, 1, S, S) 1 inside the instance's box, 0 outside
    union: torch.Tensor  # (B, 1, S, S) 1 inside any box of the image


@dataclass(frozen=True)
class FusionLayout:
    """Where each of the M instances of a B-image batch sits, at each fusion scale."""

    image_index: torch.Tensor  # (M,) image of each instance
    slot_index: torch.Tensor  # (M,) position of the instance in its image's box list
    batch_size: int
    max_instances: int
    scales: dict[int, ScaleLayout]

    @property
    def num_instances(self) -> int:
        return int(self.image_index.numel())


def _axis(
    start: torch.Tensor, length: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised sampling coordinates and the in-box mask along one axis, shapes (M, size).

    Inside the box, output pixel ``d = x - start`` reads source ``(d + 0.5) * size / length - 0.5``,
    the source index of ``interpolate(..., size=length, align_corners=False)``.
    """
    positions = torch.arange(size, device=start.device, dtype=torch.float32)
    dst = positions[None, :] - start[:, None].float()
    scale = size / length.float()
    src = (dst + 0.5) * scale[:, None] - 0.5
    src = src.clamp(min=0.0)
    normalised = (2.0 * src + 1.0) / size - 1.0
    inside = (dst >= 0) & (dst < length[:, None].float())
    return normalised, inside


def build_layout(
    box_infos: Sequence[Sequence[dict[int, BoxInfo]]], device: torch.device | str
) -> FusionLayout:
    """``box_infos[b][i][S]`` is instance i of image b at scale S; every image has >= 1 instance."""
    if any(len(boxes) == 0 for boxes in box_infos):
        raise ValueError("every image in a fusion batch needs at least one instance")
    image_index = [b for b, boxes in enumerate(box_infos) for _ in boxes]
    slot_index = [i for boxes in box_infos for i in range(len(boxes))]
    flat = [info for boxes in box_infos for info in boxes]
    rows = {
        size: torch.tensor([info[size] for info in flat], dtype=torch.long, device=device)
        for size in FUSION_SCALES
    }
    return layout_from_rows(
        rows,
        torch.tensor(image_index, dtype=torch.long, device=device),
        torch.tensor(slot_index, dtype=torch.long, device=device),
        len(box_infos),
        max(len(boxes) for boxes in box_infos),
    )


_POSITIONS: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _scale_positions(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixel positions of every fusion scale, concatenated, with each one's scale size and scale
    number (cached per device: made once)."""
    key = str(device)
    if key not in _POSITIONS:
        positions = torch.cat([torch.arange(size, dtype=torch.float32) for size in FUSION_SCALES])
        sizes = torch.cat([torch.full((size,), float(size)) for size in FUSION_SCALES])
        which = torch.cat([torch.full((size,), i) for i, size in enumerate(FUSION_SCALES)])
        _POSITIONS[key] = (positions.to(device), sizes.to(device), which.to(device))
    return _POSITIONS[key]


def _axes(start: torch.Tensor, length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``_axis`` at every fusion scale at once: ``start``/``length`` (S, M) -> normalised
    coordinates and in-box mask (M, P), P the scales' positions concatenated (same float32
    operations as ``_axis``, so the same values)."""
    positions, sizes, which = _scale_positions(start.device)
    first = start.t().float()[:, which]
    extent = length.t().float()[:, which]
    dst = positions[None, :] - first
    src = ((dst + 0.5) * (sizes[None, :] / extent) - 0.5).clamp(min=0.0)
    normalised = (2.0 * src + 1.0) / sizes[None, :] - 1.0
    inside = (dst >= 0) & (dst < extent)
    return normalised, inside


def layout_from_rows(
    rows: dict[int, torch.Tensor] | torch.Tensor,
    image_index: torch.Tensor,
    slot_index: torch.Tensor,
    batch_size: int,
    max_instances: int,
) -> FusionLayout:
    """The layout from tensors already on the device: ``box_info`` rows, (S, M, 6) in
    ``FUSION_SCALES`` order (``models.boxes.box_info_table``) or ``rows[S]`` (M, 6) per scale,
    and the image and slot of each instance. A fixed number of tensor operations whatever M,
    nothing that waits for the device."""
    device = image_index.device
    table = (
        rows if isinstance(rows, torch.Tensor) else torch.stack([rows[s] for s in FUSION_SCALES])
    )
    gx_all, in_x_all = _axes(table[:, :, 0], table[:, :, 4])
    gy_all, in_y_all = _axes(table[:, :, 2], table[:, :, 5])
    scales: dict[int, ScaleLayout] = {}
    offset = 0
    for size in FUSION_SCALES:
        part = slice(offset, offset + size)
        offset += size
        gx, in_x, gy, in_y = gx_all[:, part], in_x_all[:, part], gy_all[:, part], in_y_all[:, part]
        m = gx.shape[0]
        grid = torch.stack(
            (gx[:, None, :].expand(m, size, size), gy[:, :, None].expand(m, size, size)), dim=-1
        )
        mask = (in_y[:, :, None] & in_x[:, None, :]).unsqueeze(1).float()
        union = torch.zeros(batch_size, 1, size, size, device=device)
        union.index_add_(0, image_index, mask)
        scales[size] = ScaleLayout(grid=grid, mask=mask, union=union.clamp_(max=1.0))
    return FusionLayout(
        image_index=image_index,
        slot_index=slot_index,
        batch_size=batch_size,
        max_instances=max_instances,
        scales=scales,
    )


def place(values: torch.Tensor, grid: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Resize each map to its box and zero-pad it into the canvas (the reference's resize + pad)."""
    sampled = F.grid_sample(
        values, grid.to(values.dtype), mode="bilinear", padding_mode="border", align_corners=False
    )
    return sampled * mask.to(values.dtype)


def _float32(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast(device_type=x.device.type, enabled=False):
        return module(x.float())


def fuse_instances(
    full: torch.Tensor,
    instances: torch.Tensor,
    instance_conv: nn.Module,
    bg_conv: nn.Module,
    layout: FusionLayout,
) -> torch.Tensor:
    """Blend M instance features (M, C, S, S) into the batch's full-image feature (B, C, S, S).

    ``instances`` may have more than M rows (an instance batch padded to a bucket): the weight
    conv runs on all of them, so its shape is the bucket's, and rows past M are dropped."""
    size = full.shape[-1]
    geometry = layout.scales[size]
    batch, slots, count = layout.batch_size, layout.max_instances, layout.num_instances

    bg_logit = _float32(bg_conv, full) + BACKGROUND_BOOST * (1.0 - geometry.union)
    inst_conv = _float32(instance_conv, instances)[:count]
    instances = instances[:count]
    inst_logit = place(inst_conv, geometry.grid, geometry.mask)
    logits = torch.full(
        (batch, slots + 1, size, size), float("-inf"), device=full.device, dtype=torch.float32
    )
    logits[layout.image_index, layout.slot_index] = inst_logit[:, 0]
    logits[:, slots] = bg_logit[:, 0]
    weights = torch.softmax(logits, dim=1)
    inst_weight = weights[layout.image_index, layout.slot_index].unsqueeze(1)

    fused = torch.zeros_like(full, dtype=torch.float32)  # keeps full's memory format (NHWC)
    per_instance = instances[0].numel()
    chunk = max(1, MAX_PLACED_ELEMENTS // max(per_instance, 1))
    for start in range(0, layout.num_instances, chunk):
        part = slice(start, start + chunk)
        placed = place(instances[part].float(), geometry.grid[part], geometry.mask[part])
        fused.index_add_(0, layout.image_index[part], placed * inst_weight[part])
    fused += weights[:, slots : slots + 1] * full.float()
    return fused.to(full.dtype)
