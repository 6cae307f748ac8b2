"""Box integerisation, the top-8 cap and box_info (spec §4.1, §4.2, §7 quirks 7, 8, 15)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.boxes import (
    FUSION_SCALES,
    Detections,
    box_info,
    choose_boxes,
    clip_boxes,
    integer_boxes,
    select_top_k,
)


@pytest.mark.parametrize(
    ("box", "scale", "expected"),
    [
        ((200, 5, 300, 50), 256, (160, 16, 5, 203, 80, 48)),
        ((250, 10, 253, 12), 128, (100, 27, 5, 122, 1, 1)),
        ((316, 100, 319, 140), 32, (30, 1, 13, 14, 1, 5)),  # left-extension branch
    ],
)
def test_spec_worked_examples(box, scale, expected) -> None:  # type: ignore[no-untyped-def]
    assert box_info(box, 320, 240, scale) == expected


def test_truncation_toward_zero() -> None:
    assert integer_boxes(Detections(((10.9, 5.99, 100.1, 7.5),), (0.9,))) == [(10, 5, 100, 7)]


def test_top_k_keeps_highest_in_ascending_order() -> None:
    boxes = [(i, i, i + 10, i + 10) for i in range(10)]
    scores = [0.5, 0.9, 0.1, 0.8, 0.7, 0.95, 0.3, 0.6, 0.85, 0.2]
    kept, kept_scores = select_top_k(boxes, scores, 8)
    assert kept_scores == sorted(kept_scores)
    assert kept_scores == [0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95]
    assert kept[0] == boxes[6]


def test_at_most_k_keeps_detector_order() -> None:
    boxes = [(0, 0, 5, 5), (1, 1, 6, 6)]
    assert select_top_k(boxes, [0.7, 0.9], 8) == (boxes, [0.7, 0.9])
    assert select_top_k(boxes, [0.7, 0.9], 0) == ([], [])


def test_clip_drops_degenerate_and_outside_boxes() -> None:
    boxes = [(-5, -5, 50, 50), (10, 10, 10, 40), (400, 0, 500, 10), (300, 200, 330, 260)]
    kept, scores = clip_boxes(boxes, [1, 2, 3, 4], 320, 240)
    assert kept == [(0, 0, 50, 50), (300, 200, 320, 240)]
    assert scores == [1, 4]


def test_supplied_boxes_without_scores_use_list_order_as_priority() -> None:
    detections = Detections.from_boxes([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 3, 3]])
    assert detections.scores[0] > detections.scores[1] > detections.scores[2]
    boxes, _ = choose_boxes(detections, 100, 100, 2)
    assert boxes == [(5, 5, 20, 20), (0, 0, 10, 10)]  # top 2, ascending priority


@pytest.mark.parametrize("bad", [[[1, 2, 3]], [[0, 0, float("nan"), 4]]])
def test_supplied_boxes_are_validated(bad) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="box 0"):
        Detections.from_boxes(bad)


@st.composite
def image_and_box(draw):  # type: ignore[no-untyped-def]
    width = draw(st.integers(1, 5000))
    height = draw(st.integers(1, 5000))
    x1 = draw(st.integers(0, width - 1))
    y1 = draw(st.integers(0, height - 1))
    x2 = draw(st.integers(x1 + 1, width))
    y2 = draw(st.integers(y1 + 1, height))
    return width, height, (x1, y1, x2, y2)


@given(image_and_box())
def test_box_info_tiles_the_canvas(case) -> None:  # type: ignore[no-untyped-def]
    width, height, box = case
    for scale in FUSION_SCALES:
        left, right, top, bottom, w, h = box_info(box, width, height, scale)
        assert w >= 1 and h >= 1
        assert left + w + right == scale and top + h + bottom == scale
        assert left >= 0 and top >= 0 and right >= 0 and bottom >= 0
