"""Box selection and box geometry (spec §4.1, §4.2, §7 quirks 7, 8, 15).

Pure functions: the detector's float boxes become the integer boxes the crops are cut with (plain
Python numbers), and each integer box becomes its ``box_info`` row at the four fusion scales
(``box_info`` for one box; ``box_info_rows`` for all boxes of a batch at once, in tensor ops).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

FUSION_SCALES: tuple[int, ...] = (256, 128, 64, 32)
"""The scales of ``box_info``, ``box_info_2x``, ``box_info_4x`` and ``box_info_8x``."""

DEFAULT_MAX_INSTANCES = 8

IntBox = tuple[int, int, int, int]


@dataclass(frozen=True)
class Detections:
    """Boxes in input-image pixel coordinates (x1, y1, x2, y2) and their scores, in detector order."""

    boxes: tuple[tuple[float, float, float, float], ...]
    scores: tuple[float, ...]
    labels: tuple[int, ...] = ()  # the detector's COCO class per box; () when not known

    def __post_init__(self) -> None:
        if len(self.boxes) != len(self.scores):
            raise ValueError(f"{len(self.boxes)} boxes but {len(self.scores)} scores")
        if self.labels and len(self.labels) != len(self.boxes):
            raise ValueError(f"{len(self.boxes)} boxes but {len(self.labels)} labels")

    @classmethod
    def from_boxes(
        cls, boxes: Sequence[Sequence[float]], scores: Sequence[float] | None = None
    ) -> Detections:
        """Caller-supplied boxes; without scores, list order is priority (first = highest)."""
        parsed = []
        for i, box in enumerate(boxes):
            if len(box) != 4 or not all(math.isfinite(float(v)) for v in box):
                raise ValueError(
                    f"box {i} must be four finite numbers [x1, y1, x2, y2], got {box!r}"
                )
            x1, y1, x2, y2 = (float(v) for v in box)
            parsed.append((x1, y1, x2, y2))
        if scores is None:
            scores = [float(len(parsed) - i) for i in range(len(parsed))]
        elif len(scores) != len(parsed):
            raise ValueError(f"{len(parsed)} boxes but {len(scores)} scores")
        elif not all(math.isfinite(float(s)) for s in scores):
            raise ValueError("scores must be finite numbers")
        return cls(tuple(parsed), tuple(float(s) for s in scores))


def integer_boxes(detections: Detections) -> list[IntBox]:
    """Truncate float boxes toward zero, as the reference's int32 cast does."""
    return [
        (math.trunc(x1), math.trunc(y1), math.trunc(x2), math.trunc(y2))
        for x1, y1, x2, y2 in detections.boxes
    ]


def clip_boxes(
    boxes: Sequence[IntBox], scores: Sequence[float], width: int, height: int
) -> tuple[list[IntBox], list[float]]:
    """Clip to the image and drop boxes narrower or shorter than 1 px (spec §7 quirk 15).

    The reference's detector already clips; this makes caller-supplied boxes safe too.
    """
    kept: list[IntBox] = []
    kept_scores: list[float] = []
    for (x1, y1, x2, y2), score in zip(boxes, scores, strict=True):
        x1, x2 = max(0, min(x1, width)), max(0, min(x2, width))
        y1, y2 = max(0, min(y1, height)), max(0, min(y2, height))
        if x2 - x1 >= 1 and y2 - y1 >= 1:
            kept.append((x1, y1, x2, y2))
            kept_scores.append(score)
    return kept, kept_scores


def select_top_k(
    boxes: Sequence[IntBox], scores: Sequence[float], k: int
) -> tuple[list[IntBox], list[float]]:
    """Keep at most ``k`` boxes, as the reference's top-8 cap does (spec §4.1).

    More than ``k``: the ``k`` highest scores in *ascending* score order (ascending sort, keep the
    last ``k``). At most ``k``: all of them, in the given (detector) order.
    """
    if len(boxes) <= k:
        return list(boxes), list(scores)
    if k <= 0:
        return [], []
    order = sorted(range(len(scores)), key=lambda i: scores[i])[-k:]
    return [boxes[i] for i in order], [scores[i] for i in order]


def choose_boxes(
    detections: Detections, width: int, height: int, k: int
) -> tuple[list[IntBox], list[float]]:
    """Detector (or caller) boxes -> the integer boxes the crops are cut with, and their scores."""
    boxes, scores = clip_boxes(integer_boxes(detections), detections.scores, width, height)
    return select_top_k(boxes, scores, k)


def _span(start: int, end: int, size: int, scale: int) -> tuple[int, int]:
    lo = int((start / size) * scale)
    hi = int((end / size) * scale)
    if hi - lo < 1:
        if scale - hi > 1:
            hi += 1
        else:
            lo -= 1
    return lo, hi


def box_info(
    box: IntBox, width: int, height: int, scale: int
) -> tuple[int, int, int, int, int, int]:
    """The reference's six numbers [L, R, T, B, w, h] for one integer box at one scale (spec §4.2)."""
    x1, y1, x2, y2 = box
    sx, ex = _span(x1, x2, width, scale)
    sy, ey = _span(y1, y2, height, scale)
    return sx, scale - ex, sy, scale - ey, ex - sx, ey - sy


def _span_rows(
    start: torch.Tensor, end: torch.Tensor, size: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_span`` on tensors: float64, so ``(start / size) * scale`` rounds as Python's does.
    ``start``, ``end``, ``size``: (K,); ``scale``: (S, 1); results (S, K)."""
    lo = torch.floor((start / size) * scale).long()  # start, end >= 0: floor is int()
    hi = torch.floor((end / size) * scale).long()
    short = (hi - lo) < 1
    grow = short & ((scale.long() - hi) > 1)
    return lo - (short & ~grow).long(), hi + grow.long()


def box_info_table(
    boxes: torch.Tensor, sizes: torch.Tensor, scales: Sequence[int] = FUSION_SCALES
) -> torch.Tensor:
    """``box_info`` of K boxes at S scales at once: ``boxes`` (K, 4) integer (x1, y1, x2, y2),
    ``sizes`` (K, 2) the (width, height) of each box's image -> (S, K, 6) long
    [L, R, T, B, w, h], equal to ``box_info`` row by row (tests/test_device_path.py). A fixed
    number of tensor operations whatever K and S."""
    b = boxes.to(torch.float64)
    w, h = sizes.to(torch.float64).unbind(1)
    scale = torch.tensor(scales, dtype=torch.float64)[:, None].to(b.device, non_blocking=True)
    sx, ex = _span_rows(b[:, 0], b[:, 2], w, scale)
    sy, ey = _span_rows(b[:, 1], b[:, 3], h, scale)
    whole = scale.long()
    return torch.stack((sx, whole - ex, sy, whole - ey, ex - sx, ey - sy), dim=2)


def box_info_rows(boxes: torch.Tensor, sizes: torch.Tensor, scale: int) -> torch.Tensor:
    """``box_info_table`` at one scale: (K, 6)."""
    return box_info_table(boxes, sizes, (scale,))[0]
