"""Predicted ab + L -> the output image (spec §5.7, §10 (b)).

``network`` resolution is the reference's output exactly: the 256x256 L of the resized input with
the predicted ab, Lab->RGB, clamp, round half to even. ``original`` resolution upsamples ab to the
input's size and joins it to the input's own full-resolution L, so every detail of the input is
kept (richzhang/colorization's ``postprocess_tens``; the reference notebook's display recipe).

``scale_saturation`` is the product's colour-strength control, applied to the predicted ab before
either merge; at 1.0 it returns the prediction untouched, so the default output is the model's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from PIL import Image

from models.constants import SATURATION_RANGE
from models.lab import AB_NORM, lab_norm_to_rgb, lab_to_rgb, to_uint8

Resolution = Literal["original", "network"]
_ROWS_PER_CHUNK_PIXELS = 1 << 21  # bounds the float temporaries of a full-resolution merge


class Stopped(RuntimeError):
    """A merge given ``should_stop`` was told to stop between two chunks (result not wanted)."""


def scale_saturation(ab_norm: torch.Tensor, saturation: float) -> torch.Tensor:
    """The predicted normalised ab scaled by ``saturation`` (chroma scales, hue is kept).

    Scaling a and b together scales chroma sqrt(a² + b²) and leaves the hue angle unchanged; the
    Lab->RGB conversion clamps whatever leaves the sRGB gamut. 1.0 returns ``ab_norm`` itself.
    """
    low, high = SATURATION_RANGE
    if not low <= saturation <= high:  # also refuses NaN
        raise ValueError(f"saturation must be between {low} and {high}, got {saturation}")
    if saturation == 1.0:
        return ab_norm
    return ab_norm * saturation


def _to_pil(rgb8: torch.Tensor, alpha: Image.Image | None) -> Image.Image:
    image = Image.fromarray(rgb8.permute(1, 2, 0).contiguous().numpy(), mode="RGB")
    if alpha is not None:
        image.putalpha(alpha.resize(image.size, Image.Resampling.BILINEAR))
    return image


def merge_network(
    l_norm: torch.Tensor, ab_norm: torch.Tensor, alpha: Image.Image | None
) -> Image.Image:
    """The reference's 256x256 result from its L_norm (1, 256, 256) and ab_norm (2, 256, 256)."""
    return _to_pil(to_uint8(lab_norm_to_rgb(l_norm, ab_norm)), alpha)


def upsample_ab(ab_norm: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear (antialiased when shrinking) resize of (2, h, w) ab to (2, height, width).

    Done in two separable steps, first the axes that shrink, then the axes that grow, so no
    temporary is larger than the output or the input: one call on a 2 x 4,000,000 target would
    make a 256 x 4,000,000 intermediate (4 GB). Separable filtering makes the result the same.
    """
    h, w = ab_norm.shape[-2:]
    x = ab_norm[None].float()
    shrunk = (min(h, height), min(w, width))
    if shrunk != (h, w):
        x = F.interpolate(x, size=shrunk, mode="bilinear", align_corners=False, antialias=True)
    if shrunk != (height, width):
        x = F.interpolate(
            x, size=(height, width), mode="bilinear", align_corners=False, antialias=True
        )
    return x[0]


def merge_original(
    lightness: torch.Tensor,
    ab_norm: torch.Tensor,
    alpha: Image.Image | None,
    should_stop: Callable[[], bool] | None = None,
) -> Image.Image:
    """Full-resolution output from the input's L (1, H, W, Lab units) and the predicted ab.

    ``should_stop`` is asked before each chunk of rows; True raises ``Stopped``.
    """
    height, width = lightness.shape[-2:]
    ab = upsample_ab(ab_norm, height, width)
    rgb8 = torch.empty(3, height, width, dtype=torch.uint8)
    rows = max(1, _ROWS_PER_CHUNK_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        if should_stop is not None and should_stop():
            raise Stopped(f"merge stopped at row {top} of {height}")
        part = slice(top, top + rows)
        lab = torch.cat((lightness[:, part].float(), ab[:, part] * AB_NORM), dim=0)
        rgb8[:, part] = to_uint8(lab_to_rgb(lab).clamp(0.0, 1.0))
    return _to_pil(rgb8, alpha)
