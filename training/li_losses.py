"""Li et al.'s losses: class-rebalanced cross-entropy over the 313 ab bins plus the class loss.

* Targets: the ab of the colour photo subsampled to the logits' grid (every 4th pixel, as ECCV16's
  ``data_ab_ss`` layer), each pixel's bin the nearest centre (Li et al.: "if its colour belongs to
  bin_i then P(bin_i) = 1", a hard one-hot target).
* Rebalancing (Li et al. eq. 3, weight w by the target bin; ECCV16 §2.2's rule): from the empirical
  bin distribution p of the training set, smoothed by a Gaussian of sigma 5 in ab, w is proportional
  to ((1 - lambda) p + lambda / Q)^-1 with lambda = 1/2, normalised so that sum_q p_q w_q = 1.
  The fallback where no prior is computed (``--prior-images 0``): the uniform prior, w = 1 for
  every bin (plain cross-entropy).
* Colour loss: the per-pixel weighted cross-entropy summed over the 64x64 grid (Li eq. 3), averaged
  over the batch; class loss: cross-entropy of the classifier on the image label (Li eq. 1-2),
  averaged over the batch; total = colour + ``class_weight`` x class (Li et al. add them, weight 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.lab import AB_NORM

SUBSAMPLE = 4
PRIOR_SIGMA = 5.0
PRIOR_LAMBDA = 0.5


def target_bins(ab_norm: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(N, 2, H, W) normalised ab, (Q, 2) centres in ab units -> (N, H/4, W/4) nearest-bin index."""
    ab = ab_norm[:, :, ::SUBSAMPLE, ::SUBSAMPLE].float() * AB_NORM
    n, _, h, w = ab.shape
    flat = ab.permute(0, 2, 3, 1).reshape(-1, 2)
    nearest = torch.cdist(flat, centres.float().to(flat.device)).argmin(dim=1)
    return nearest.view(n, h, w)


def bin_histogram(bins: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Counts per bin (float64) of an index tensor of any shape."""
    return torch.bincount(bins.reshape(-1).cpu(), minlength=num_bins).double()


def rebalancing_weights(
    counts: torch.Tensor | None, centres: torch.Tensor, *, sigma: float = PRIOR_SIGMA,
    mix: float = PRIOR_LAMBDA,
) -> torch.Tensor:  # fmt: skip
    """(Q,) float32 weights from the training set's bin counts; ``None`` or no pixels: all ones."""
    q = centres.shape[0]
    if counts is None or float(counts.sum()) <= 0:
        return torch.ones(q)
    p = counts.double() / counts.sum()
    d2 = torch.cdist(centres.double(), centres.double()) ** 2
    kernel = torch.exp(-d2 / (2 * sigma**2))
    smoothed = kernel @ p
    smoothed = smoothed / smoothed.sum()
    w = 1.0 / ((1.0 - mix) * smoothed + mix / q)
    w = w / (smoothed * w).sum()
    return w.float()


def colour_loss(logits: torch.Tensor, bins: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Li eq. 3: sum over pixels of w(target bin) x cross-entropy, mean over the batch (float32)."""
    per_pixel = F.cross_entropy(logits.float(), bins, reduction="none")  # (N, h, w)
    w = weights.to(per_pixel.device)[bins]
    return (w * per_pixel).sum(dim=(1, 2)).mean()


def class_loss(class_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Li eq. 2: -log P(label | image), mean over the batch."""
    return F.cross_entropy(class_logits.float(), labels)
