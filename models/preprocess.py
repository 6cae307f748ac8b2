"""Network inputs from an input image (spec §2.4, §5.3, §5.5): pure functions, CPU.

The network always sees L at 256x256: the whole image squashed to a square, and each box cropped
from the original-resolution image and squashed the same way (PIL bilinear, antialiased).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from models.boxes import IntBox
from models.lab import lightness_of_uint8, normalize_l, rgb_to_lab

NETWORK_SIZE = 256
MASK_VALUE = -0.5  # hint mask 0 minus mask_cent 0.5: no user hints (automatic mode)
_LIGHTNESS_CHUNK = 1 << 20  # pixels per chunk when computing full-resolution L


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float32 in [0, 1], as torchvision ``ToTensor``."""
    array = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
    return array.permute(2, 0, 1).contiguous().float().div(255)


def resize_to_network(image: Image.Image) -> Image.Image:
    return image.resize((NETWORK_SIZE, NETWORK_SIZE), Image.Resampling.BILINEAR)


def normalized_l(image: Image.Image) -> torch.Tensor:
    """The reference's L_norm of a 256x256 RGB image, shape (1, 256, 256)."""
    return normalize_l(rgb_to_lab(to_tensor(image))[0:1])


def network_input(l_norm: torch.Tensor) -> torch.Tensor:
    """[L_norm, hint_a = 0, hint_b = 0, mask = -0.5] along the channel axis, (..., 4, H, W)."""
    hints = torch.zeros_like(l_norm).expand(*l_norm.shape[:-3], 2, *l_norm.shape[-2:])
    mask = torch.full_like(l_norm, MASK_VALUE)
    return torch.cat((l_norm, hints, mask), dim=-3)


def crop_l(image: Image.Image, boxes: Sequence[IntBox]) -> torch.Tensor:
    """L_norm of each box cropped from the full-resolution image, (N, 1, 256, 256)."""
    if not boxes:
        return torch.empty(0, 1, NETWORK_SIZE, NETWORK_SIZE)
    return torch.stack([normalized_l(resize_to_network(image.crop(box))) for box in boxes])


def lightness(image: Image.Image) -> torch.Tensor:
    """Full-resolution Lab L (1, H, W) with the reference's formulas, in bounded-memory chunks."""
    rgb = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).reshape(-1, 3)
    out = torch.empty(rgb.shape[0], dtype=torch.float32)
    for start in range(0, rgb.shape[0], _LIGHTNESS_CHUNK):
        part = slice(start, start + _LIGHTNESS_CHUNK)
        out[part] = lightness_of_uint8(rgb[part])
    width, height = image.size
    return out.view(1, height, width)


def detector_lightness(
    l_full: torch.Tensor, max_short: int, max_long: int
) -> tuple[Image.Image, float, float]:
    """The detector's input: 8-bit L (OpenCV scale, 0..255), pre-shrunk to the detector's size.

    The reference detector sees the L plane replicated to three channels (spec §5.1). Shrinking to
    the size the detector would resize to anyway keeps large photos cheap to move and normalise.
    Returns the L image and the factors mapping its coordinates back to the input's.
    """
    height, width = l_full.shape[-2:]
    l8 = Image.fromarray(
        torch.round(l_full[0] * (255.0 / 100.0)).clamp(0, 255).to(torch.uint8).numpy(), mode="L"
    )
    scale = min(max_short / min(width, height), max_long / max(width, height))
    if scale >= 1.0:
        return l8, 1.0, 1.0
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    small = l8.resize((new_w, new_h), Image.Resampling.BILINEAR)
    return small, width / new_w, height / new_h


def rgb_uint8(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (H, W, 3) uint8 tensor (a copy): what ``crop_l_on_device`` uploads."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))


MAX_CROP_SOURCE_ELEMENTS = 1 << 28
"""Most float elements of one padded ``(images, 3, H, W)`` source of ``crop_l_on_device``: a
batch of large photos is cut in several calls (groups of consecutive images) to bound memory."""


def crop_l_on_device(
    images: Sequence[torch.Tensor],
    boxes: torch.Tensor,
    image_index: torch.Tensor,
    device: torch.device,
) -> torch.Tensor:
    """``crop_l`` for every box of a batch at once, on ``device``: (K, 1, 256, 256) L_norm.

    ``images``: each image's (H, W, 3) uint8 RGB (``rgb_uint8``); ``boxes``: (K, 4) integer
    (x1, y1, x2, y2); ``image_index``: (K,) the image of each box, non-decreasing; all three on
    the host (nothing here waits for the device). The images are
    uploaded once into one padded canvas and every box is cut and resized by one
    ``torchvision.ops.roi_align`` call (per group of images, see ``MAX_CROP_SOURCE_ELEMENTS``).

    Not bit-equal to PIL (docs/performance.md, tests/test_precision.py): roi_align's adaptive
    sampling averages ceil(box/256)^2 bilinear samples per output pixel (a box filter) where PIL
    antialiases with a scaled triangle filter, it reads the pixels just outside the box where
    PIL clamps at the crop's edge, and the resized RGB is not rounded to 8 bits. Upscaled boxes
    (<= 256 px) are plain bilinear at PIL's sample positions.
    """
    from torchvision.ops import roi_align  # torchvision: the detector's package

    count = int(boxes.shape[0])
    if count == 0:
        return torch.empty(0, 1, NETWORK_SIZE, NETWORK_SIZE, device=device)
    out = torch.empty(count, 1, NETWORK_SIZE, NETWORK_SIZE, device=device)
    first = 0
    for group in _source_groups([(int(i.shape[0]), int(i.shape[1])) for i in images]):
        canvas = _padded_canvas([images[b] for b in group], device)
        # rows of this group: image_index is non-decreasing, so they are contiguous
        lo = int(torch.searchsorted(image_index, group[0]))
        hi = int(torch.searchsorted(image_index, group[-1], right=True))
        if hi > lo:
            rois = torch.cat(((image_index[lo:hi] - group[0])[:, None], boxes[lo:hi]), dim=1).to(
                device, torch.float32, non_blocking=True
            )
            rgb = roi_align(
                canvas, rois, NETWORK_SIZE, spatial_scale=1.0, sampling_ratio=-1, aligned=True
            )
            out[lo:hi] = normalize_l(rgb_to_lab(rgb)[:, 0:1])
        first = hi
    assert first == count, "image_index must be non-decreasing and name images of the batch"
    return out


def _source_groups(shapes: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Consecutive images whose padded float canvas stays within ``MAX_CROP_SOURCE_ELEMENTS``."""
    groups: list[list[int]] = []
    height = width = 0
    for b, (h, w) in enumerate(shapes):
        grown_h, grown_w = max(height, h), max(width, w)
        if groups and (len(groups[-1]) + 1) * 3 * grown_h * grown_w <= MAX_CROP_SOURCE_ELEMENTS:
            groups[-1].append(b)
            height, width = grown_h, grown_w
        else:
            groups.append([b])
            height, width = h, w
    return groups


def _padded_canvas(images: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """(B, 3, H, W) float RGB in [0, 1] on ``device``, each image top-left, its last row and
    column repeated once into the padding (roi_align then clamps at the image's own edge, as
    it does at the canvas's)."""
    height = max(int(image.shape[0]) for image in images)
    width = max(int(image.shape[1]) for image in images)
    canvas = torch.zeros(len(images), height, width, 3, dtype=torch.uint8, device=device)
    for b, image in enumerate(images):
        h, w = int(image.shape[0]), int(image.shape[1])
        canvas[b, :h, :w].copy_(image, non_blocking=True)
        if w < width:
            canvas[b, :h, w] = canvas[b, :h, w - 1]
        if h < height:
            canvas[b, h, : w + 1] = canvas[b, h - 1, : w + 1]
    return canvas.permute(0, 3, 1, 2).float().div_(255)
