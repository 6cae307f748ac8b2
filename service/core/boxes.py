"""Caller-supplied boxes: the one validator of the box list and its scores (no torch).

The HTTP router (the ``boxes`` query, after its JSON text is parsed within limits), the engine
(before ``models.boxes.Detections``) and the ``colorize --boxes`` file all check boxes here, so a
box is refused for the same reason with the same message wherever it comes from.
"""

from __future__ import annotations

import math

MAX_COORDINATE = 1_000_000.0  # no side of an image within max_pixels is longer


class BoxesError(ValueError):
    """Boxes or scores that cannot be used; the message says which and why (never the input)."""


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _coordinate(value: object, index: int) -> float:
    if not _is_number(value):
        raise BoxesError(f"box {index} coordinates must be numbers, not {type(value).__name__}")
    beyond = BoxesError(f"box {index} has a coordinate beyond +-{MAX_COORDINATE:.0f} pixels")
    try:
        number = float(value)  # type: ignore[arg-type]
    except OverflowError:  # an integer too large for a float
        raise beyond from None
    if not math.isfinite(number):
        raise BoxesError(f"box {index} must be four finite numbers [x1, y1, x2, y2]")
    if abs(number) > MAX_COORDINATE:
        raise beyond
    return number


def _box(value: object, index: int) -> list[float]:
    if not isinstance(value, list | tuple) or len(value) != 4:
        raise BoxesError(f"box {index} must be four finite numbers [x1, y1, x2, y2]")
    x1, y1, x2, y2 = (_coordinate(v, index) for v in value)
    if x2 <= x1 or y2 <= y1:
        raise BoxesError(f"box {index} must have x2 > x1 and y2 > y1")
    return [x1, y1, x2, y2]


def _scores(value: object, count: int) -> list[float]:
    if not isinstance(value, list | tuple):
        raise BoxesError("scores must be a list of numbers, one per box")
    if len(value) != count:
        raise BoxesError(
            f"{count} boxes but {len(value)} scores: scores must be a list of numbers, one per box"
        )
    if not all(_is_number(s) for s in value):
        raise BoxesError("scores must be numbers, one per box")
    try:
        scores = [float(s) for s in value]
    except OverflowError:  # an integer too large for a float
        scores = [math.inf]
    if not all(math.isfinite(s) for s in scores):
        raise BoxesError("scores must be finite numbers")
    return scores


def validate_boxes(
    data: object, max_boxes: int | None = None
) -> tuple[list[list[float]], list[float] | None]:
    """``data`` as ``(boxes, scores)``: ``[[x1, y1, x2, y2], ...]`` or ``{"boxes", "scores"}``.

    Every coordinate is a finite number (not a bool) within +-``MAX_COORDINATE``, with x2 > x1 and
    y2 > y1; scores (optional: without them list order is priority) are finite, one per box; at
    most ``max_boxes`` boxes (None: no limit). Raises ``BoxesError`` with the reason.
    """
    scores: object = None
    if isinstance(data, dict):
        scores = data.get("scores")
        data = data.get("boxes")
    if not isinstance(data, list | tuple):
        raise BoxesError(
            'boxes must be a JSON list of [x1, y1, x2, y2] number lists, or {"boxes": [...], '
            '"scores": [...]}'
        )
    if max_boxes is not None and len(data) > max_boxes:
        raise BoxesError(f"boxes holds {len(data)} boxes; at most {max_boxes}")
    boxes = [_box(box, i) for i, box in enumerate(data)]
    return boxes, None if scores is None else _scores(scores, len(boxes))
