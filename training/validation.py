"""Validation on the held-out images: colorize their grey versions at 256x256, score the results.

The networks being trained run in eval mode on the same samples training uses (the grey image's
L in); each prediction becomes the reference's 256x256 output (``models.merge.merge_network``) and
is compared with the squashed colour original by ``evaluation.metrics``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from evaluation.metrics import LpipsMetric, score_pair, summarize
from models.merge import merge_network
from training.data import to_device
from training.losses import colorization_loss
from training.stages import StageModel


@torch.no_grad()
def validate(
    model: StageModel,
    batches: Iterable[dict[str, Any]],
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    lpips: LpipsMetric | None = None,
) -> dict[str, Any]:
    """Mean loss and the evaluation metrics (mean and 95% interval) over the validation batches."""
    model.set_mode(False)
    losses: list[float] = []
    scores: dict[str, list[float]] = {}
    try:
        for cpu_batch in batches:
            batch = to_device(cpu_batch, device)
            with torch.autocast(
                device.type,
                dtype=autocast_dtype or torch.float32,
                enabled=autocast_dtype is not None,
            ):
                pred = model.module(batch)
            losses.append(float(colorization_loss(pred, batch["ab"])) * len(pred))
            for l_norm, ab, rgb in zip(
                cpu_batch["l"], pred.float().cpu(), cpu_batch["rgb"], strict=True
            ):
                image = np.asarray(merge_network(l_norm, ab, None))
                target = rgb.permute(1, 2, 0).numpy()
                for name, value in score_pair(image, target, lpips).items():
                    scores.setdefault(name, []).append(value)
    finally:
        model.set_mode(True)
    count = len(next(iter(scores.values()), []))
    result: dict[str, Any] = {"split": "val", "images": count}
    result["loss"] = sum(losses) / count if count else float("nan")
    for name, values in scores.items():
        summary = summarize(values)
        result[name] = summary["mean"]
        result[f"{name}_ci95"] = [summary["ci95_low"], summary["ci95_high"]]
    return result
