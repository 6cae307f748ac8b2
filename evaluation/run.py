"""Colorize ground-truth photos through the batched engine and score every result.

Through the offline runner ``models.offline.run_batches`` (shared with ``colorize``), per batch:
decode each photo, make its training grey (spec §6) and ``Colorizer.prepare`` it (on the runner's
load pool, a few batches ahead), one ``Colorizer.predict`` for the batch (image by image if it
fails), then merge, save ``images/<key>.png`` atomically and score the saved pixels against the
target (on the runner's finish thread, in photo order, while the next batch predicts: ``finish``
only appends to ``run.scores``, which nothing else touches until the run returns, and LPIPS and
the FID network are stateless ``inference_mode`` forwards, safe beside ``predict``). A
photo that cannot be decoded, colorized or scored is recorded as a failure and skipped; the others
go on.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from evaluation.dataset import GroundTruth, Instance, Pair, instance_box, load_pair
from evaluation.fid import FidFeatures
from evaluation.metrics import LpipsMetric, colorfulness, score_pair
from models.atomic import write_atomic
from models.hints import Hint, ground_truth_hints, hint_planes
from models.offline import FINISH_ERRORS, describe_failure, run_batches
from models.pipeline import ColorizeOptions, Prediction, PreparedImage
from models.preprocess import NETWORK_SIZE
from models.zoo import ModelColorizer

METRICS: tuple[str, ...] = ("psnr", "ssim", "lpips", "colorfulness")
"""Per-image metrics, in the order of ``metrics.csv``. Higher is better except for lpips."""
LOWER_IS_BETTER = frozenset({"lpips"})
SCORE_ERRORS = (*FINISH_ERRORS, RuntimeError)  # RuntimeError: LPIPS on a tiny image


@dataclass(frozen=True)
class InstanceScore:
    annotation_id: int
    category: str
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in the scored image
    scores: dict[str, float]


@dataclass(frozen=True)
class ImageScore:
    item: GroundTruth
    scores: dict[str, float]
    target_colorfulness: float
    instances: list[InstanceScore] | None  # None: no annotations were given
    skipped_instances: int = 0  # annotated instances too small to score
    fid_features: tuple[np.ndarray, np.ndarray] | None = None  # (colorized, ground truth)
    hints: tuple[Hint, ...] = ()  # the ground-truth hints the photo was given (--hints N)
    hinted_pixels: int = 0  # pixels of the 256x256 network input they cover (the mask's area)


@dataclass
class EvaluationRun:
    scores: list[ImageScore] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0  # colorizing and scoring, without loading the model

    @property
    def images_per_second(self) -> float:
        return len(self.scores) / self.seconds if self.seconds > 0 else 0.0


def machine_description(device: torch.device) -> dict[str, Any]:
    """Where the figures were measured."""
    described: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        described["gpu"] = torch.cuda.get_device_name(device)
    return described


def save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG atomically (``models.atomic``)."""
    write_atomic(path, lambda handle: image.save(handle, format="PNG"))


def score_instances(
    pred: np.ndarray,
    target: np.ndarray,
    instances: Sequence[Instance],
    original_size: tuple[int, int],
    lpips: LpipsMetric | None,
) -> tuple[list[InstanceScore], int]:
    """The metrics on each ground-truth instance crop (Table 2); and how many were too small."""
    scored_size = (target.shape[1], target.shape[0])
    results, skipped = [], 0
    for instance in instances:
        box = instance_box(instance, original_size, scored_size)
        if box is None:
            skipped += 1
            continue
        x1, y1, x2, y2 = box
        crop_pred = np.ascontiguousarray(pred[y1:y2, x1:x2])
        crop_target = np.ascontiguousarray(target[y1:y2, x1:x2])
        results.append(
            InstanceScore(
                instance.annotation_id,
                instance.category,
                box,
                score_pair(crop_pred, crop_target, lpips),
            )
        )
    return results, skipped


def hint_seed(image_name: str, seed: int = 0) -> int:
    """The seed of a photo's hint generator: CRC-32 of its ``images/`` name plus seed x 2^32, so
    every count, configuration and rerun with the same ``--seed`` reveals the same points."""
    return zlib.crc32(image_name.encode()) + seed * 2**32


def photo_hints(item: GroundTruth, pair: Pair, count: int, seed: int = 0) -> tuple[Hint, ...]:
    """``count`` hints sampled from the photo's ground truth (``ground_truth_hints``) with its
    own generator (``hint_seed``): the first k of a larger count are the k of the smaller one."""
    generator = torch.Generator().manual_seed(hint_seed(item.image_name, seed))
    return tuple(ground_truth_hints(pair.target, count, pair.grey.size, generator))


@dataclass
class _Photo:
    """One ground-truth photo through the runner: its pair is filled in by ``load``."""

    item: GroundTruth
    pair: Pair | None = None
    hints: tuple[Hint, ...] = ()


class Evaluator:
    """One configuration: a colorizer, its options, LPIPS (optional) and instances (optional)."""

    def __init__(
        self,
        colorizer: ModelColorizer,
        options: ColorizeOptions,
        lpips: LpipsMetric | None = None,
        instances: dict[str, list[Instance]] | None = None,
        fid: FidFeatures | None = None,
        hints: int = 0,
        seed: int = 0,
    ) -> None:
        """``hints`` > 0: each photo gets that many hints sampled from its ground truth
        (``photo_hints``, seeded by the photo's name and ``seed``: every configuration and
        rerun reveals the same points)."""
        self.hints = hints
        self.seed = seed
        self.colorizer = colorizer
        self.options = options
        self.lpips = lpips
        self.instances = instances
        self.fid = fid

    def _load(self, photo: _Photo) -> PreparedImage:
        photo.pair = load_pair(photo.item.source, self.options.resolution)
        options = self.options
        if self.hints:
            photo.hints = photo_hints(photo.item, photo.pair, self.hints, self.seed)
            options = replace(options, hints=photo.hints)
        return self.colorizer.prepare(photo.pair.grey, options)

    def score(self, item: GroundTruth, pair: Pair, colorized: Image.Image) -> ImageScore:
        pred = np.asarray(colorized.convert("RGB"), dtype=np.uint8)
        target = np.asarray(pair.target, dtype=np.uint8)
        instances, skipped = None, 0
        if self.instances is not None:
            instances, skipped = score_instances(
                pred,
                target,
                self.instances.get(item.source.name, []),
                pair.original_size,
                self.lpips,
            )
        features = None
        if self.fid is not None:
            features = (self.fid(pred).astype(np.float32), self.fid(target).astype(np.float32))
        return ImageScore(
            item,
            score_pair(pred, target, self.lpips),
            colorfulness(target),
            instances,
            skipped,
            features,
        )

    def _finish(
        self, photo: _Photo, prepared: PreparedImage, prediction: Prediction, report_dir: Path
    ) -> ImageScore:
        assert photo.pair is not None  # loaded before it was predicted
        colorized = self.colorizer.merge(prepared, prediction).image.convert("RGB")
        save_png(colorized, report_dir / photo.item.image_name)
        score = self.score(photo.item, photo.pair, colorized)
        if not photo.hints:
            return score
        _, mask = hint_planes(photo.hints, *photo.pair.grey.size, NETWORK_SIZE)
        return replace(score, hints=photo.hints, hinted_pixels=int(mask.sum()))

    def run(
        self,
        items: Sequence[GroundTruth],
        report_dir: Path,
        *,
        batch_size: int = 8,
        progress: bool = True,
    ) -> EvaluationRun:
        """Colorize and score ``items``; images go to ``report_dir/images/``."""
        from tqdm import tqdm

        run = EvaluationRun()
        started = time.perf_counter()

        def finish(photo: _Photo, prepared: PreparedImage, prediction: Prediction) -> None:
            run.scores.append(self._finish(photo, prepared, prediction, report_dir))

        with tqdm(
            total=len(items),
            unit="img",
            file=sys.stderr,
            disable=not progress,
            dynamic_ncols=True,
            desc=report_dir.name,
        ) as bar:
            failures = run_batches(
                self.colorizer,
                [_Photo(item) for item in items],
                self._load,
                finish,
                batch_size=batch_size,
                progress=bar.update,
                finish_errors=SCORE_ERRORS,
            )
        run.failures = [(str(p.item.source), describe_failure(exc)) for p, exc in failures]
        run.seconds = time.perf_counter() - started
        return run


def finite_or_none(value: float) -> float | str | None:
    """JSON has no nan or inf: nan -> null, inf -> "inf" (so an identical pair stays visible)."""
    if math.isnan(value):
        return None
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value
