"""Validation on the held-out images: colorize their grey versions at 256x256, score the results.

The networks being trained run in eval mode on the same samples training uses (the grey image's
L in); each prediction becomes the reference's 256x256 output (``models.merge.merge_network``) and
is compared with the squashed colour original by ``evaluation.metrics``.

Under torchrun every rank scores its share of the images (``shard``) and the per-image scores are
gathered (``training.loop``), so the ranks meet at a collective after about 1/N of the work each,
never one rank validating alone while the others wait on a collective timeout.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from evaluation.metrics import LpipsMetric, score_pair, summarize
from models.merge import merge_network
from training.data import to_device
from training.losses import colorization_loss
from training.stages import StageModel


def shard(dataset: Dataset[Any], size: int, rank: int, world_size: int) -> Subset[Any]:
    """Rank ``rank``'s images: every ``world_size``-th from ``rank`` (all of them for one rank)."""
    return Subset(dataset, range(rank, size, world_size))


def interleave(shards: Sequence[Sequence[dict[str, float]]]) -> list[dict[str, float]]:
    """The ranks' per-image scores back in dataset order (the inverse of ``shard``)."""
    ordered: list[dict[str, float]] = []
    for j in range(max((len(s) for s in shards), default=0)):
        ordered.extend(s[j] for s in shards if j < len(s))
    return ordered


@torch.no_grad()
def score_images(
    model: StageModel,
    batches: Iterable[dict[str, Any]],
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    lpips: LpipsMetric | None = None,
) -> list[dict[str, float]]:
    """Per image, in order: its loss and its evaluation metrics."""
    model.set_mode(False)
    rows: list[dict[str, float]] = []
    try:
        for cpu_batch in batches:
            batch = to_device(cpu_batch, device)
            with torch.autocast(
                device.type,
                dtype=autocast_dtype or torch.float32,
                enabled=autocast_dtype is not None,
            ):
                pred = model.module(batch)
            for l_norm, ab_pred, ab, rgb in zip(
                cpu_batch["l"], pred.float().cpu(), cpu_batch["ab"], cpu_batch["rgb"], strict=True
            ):
                row = {"loss": float(colorization_loss(ab_pred, ab))}
                image = np.asarray(merge_network(l_norm, ab_pred, None))
                row.update(score_pair(image, rgb.permute(1, 2, 0).numpy(), lpips))
                rows.append(row)
    finally:
        model.set_mode(True)
    return rows


def summarize_scores(rows: Sequence[dict[str, float]]) -> dict[str, Any]:
    """Mean loss and the evaluation metrics (mean and 95% interval) over the images."""
    result: dict[str, Any] = {"split": "val", "images": len(rows)}
    losses = [r["loss"] for r in rows]
    result["loss"] = sum(losses) / len(losses) if losses else float("nan")
    for name in rows[0] if rows else ():
        if name == "loss":
            continue
        summary = summarize([r[name] for r in rows])
        result[name] = summary["mean"]
        result[f"{name}_ci95"] = [summary["ci95_low"], summary["ci95_high"]]
    return result


def validate(
    model: StageModel,
    batches: Iterable[dict[str, Any]],
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    lpips: LpipsMetric | None = None,
) -> dict[str, Any]:
    """One process's validation: ``summarize_scores(score_images(...))``."""
    return summarize_scores(score_images(model, batches, device, autocast_dtype, lpips))
