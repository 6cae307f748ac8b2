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


def crop_l_on_device(
    image: Image.Image, boxes: Sequence[IntBox], device: torch.device
) -> torch.Tensor:
    """``crop_l`` with the crop, resize and Lab conversion on ``device`` (one upload of the RGB).

    ``torch.nn.functional.interpolate`` bilinear with antialias stands in for PIL's antialiased
    bilinear, without PIL's rounding of the resized RGB to 8 bits: the L differs slightly (bounded
    in tests/test_precision.py::test_device_crops_deviate_from_pil_within_the_stated_bound).
    """
    if not boxes:
        return torch.empty(0, 1, NETWORK_SIZE, NETWORK_SIZE, device=device)
    rgb = torch.from_numpy(np.asarray(image, dtype=np.uint8)).to(device, non_blocking=True)
    chw = rgb.permute(2, 0, 1).float().div_(255).unsqueeze(0)
    crops = [
        torch.nn.functional.interpolate(
            chw[:, :, y1:y2, x1:x2],
            size=(NETWORK_SIZE, NETWORK_SIZE),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )[0]
        for x1, y1, x2, y2 in boxes
    ]
    return torch.stack([normalize_l(rgb_to_lab(c)[0:1]) for c in crops])
