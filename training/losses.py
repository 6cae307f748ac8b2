"""The reference's training loss and near-grey test (spec §6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.lab import AB_NORM

HUBER_DELTA = 1.0 / AB_NORM
LOSS_WEIGHT = 10.0
NEAR_GREY_AB_RANGE = 10.0 / AB_NORM
"""An image whose ab range (max - min over pixels, summed over a and b) is below this is dropped."""


def colorization_loss(pred_ab: torch.Tensor, target_ab: torch.Tensor) -> torch.Tensor:
    """10 x mean over pixels of the sum over a, b of Huber(delta = 1/110), on normalised ab.

    Per element ``0.5 d^2 / delta`` if ``|d| < delta`` else ``|d| - 0.5 delta``: torch's
    ``smooth_l1_loss`` with ``beta = delta``. Computed in float32 whatever the autocast dtype.
    """
    per_element = F.smooth_l1_loss(
        pred_ab.float(), target_ab.float(), beta=HUBER_DELTA, reduction="none"
    )
    return LOSS_WEIGHT * per_element.sum(dim=-3).mean()


def is_near_grey(ab: torch.Tensor) -> torch.Tensor:
    """(..., 2, H, W) normalised ab -> (...) bool: too little colour to learn from."""
    spread = ab.amax(dim=(-2, -1)) - ab.amin(dim=(-2, -1))
    return spread.abs().sum(dim=-1) < NEAR_GREY_AB_RANGE
