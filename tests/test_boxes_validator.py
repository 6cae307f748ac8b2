"""The one boxes validator (``service.core.boxes``): shapes, limits, non-finite values, bools."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from service.core.boxes import MAX_COORDINATE, BoxesError, validate_boxes


def test_a_list_of_boxes_without_scores() -> None:
    boxes, scores = validate_boxes([[0, 0, 10, 10], [1.5, 2, 3, 4.25]])
    assert boxes == [[0.0, 0.0, 10.0, 10.0], [1.5, 2.0, 3.0, 4.25]]
    assert all(isinstance(v, float) for box in boxes for v in box)
    assert scores is None


def test_an_object_with_boxes_and_scores() -> None:
    boxes, scores = validate_boxes({"boxes": [[0, 0, 5, 5], [1, 1, 6, 6]], "scores": [1, 0.5]})
    assert boxes == [[0, 0, 5, 5], [1, 1, 6, 6]]
    assert scores == [1.0, 0.5]


def test_no_boxes_is_valid() -> None:
    assert validate_boxes([]) == ([], None)
    assert validate_boxes({"boxes": [], "scores": []}) == ([], [])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("[[0, 0, 5, 5]]", "boxes must be a JSON list"),
        ({"scores": [1]}, "boxes must be a JSON list"),  # an object without "boxes"
        (None, "boxes must be a JSON list"),
        ([[0, 0, 5]], "box 0 must be four finite numbers"),
        ([[0, 0, 5, 5], [0, 0, 5, 5, 5]], "box 1 must be four finite numbers"),
        ([[0, 0, 5, 5], 7], "box 1 must be four finite numbers"),
        ([[0, 0, "5", 5]], "box 0 coordinates must be numbers, not str"),
        ([[0, 0, None, 5]], "box 0 coordinates must be numbers, not NoneType"),
        ([[0, 0, [5], 5]], "box 0 coordinates must be numbers"),
        ([[10, 0, 5, 5]], "box 0 must have x2 > x1 and y2 > y1"),
        ([[0, 5, 5, 5]], "box 0 must have x2 > x1 and y2 > y1"),
        ({"boxes": [[0, 0, 5, 5]], "scores": 0.5}, "scores must be a list of numbers, one per box"),
        ({"boxes": [[0, 0, 5, 5]], "scores": [1, 2]}, "1 boxes but 2 scores"),
        ({"boxes": [[0, 0, 5, 5]], "scores": ["high"]}, "scores must be numbers"),
    ],
)
def test_shapes_that_are_refused(data: object, message: str) -> None:
    with pytest.raises(BoxesError, match="^" + message.replace("[", r"\[")):
        validate_boxes(data)


def test_bools_are_not_numbers() -> None:
    with pytest.raises(BoxesError, match="box 0 coordinates must be numbers, not bool"):
        validate_boxes([[False, 0, True, 5]])
    with pytest.raises(BoxesError, match="scores must be numbers"):
        validate_boxes({"boxes": [[0, 0, 5, 5]], "scores": [True]})


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_refused(value: float) -> None:
    with pytest.raises(BoxesError, match="box 0 must be four finite numbers"):
        validate_boxes([[0, 0, value, 5]])
    with pytest.raises(BoxesError, match="scores must be finite numbers"):
        validate_boxes({"boxes": [[0, 0, 5, 5]], "scores": [value]})


def test_coordinates_beyond_the_limit_are_refused() -> None:
    assert validate_boxes([[-MAX_COORDINATE, 0, MAX_COORDINATE, 1]])[0] == [
        [-MAX_COORDINATE, 0, MAX_COORDINATE, 1]
    ]
    with pytest.raises(BoxesError, match=r"box 2 has a coordinate beyond \+-1000000 pixels"):
        validate_boxes([[0, 0, 5, 5], [0, 0, 5, 5], [0, 0, 1e9, 5]])
    with pytest.raises(BoxesError, match="box 0 has a coordinate beyond"):
        validate_boxes([[0, 0, 10**4000, 5]])  # too large even for a float
    with pytest.raises(BoxesError, match="scores must be finite numbers"):
        validate_boxes({"boxes": [[0, 0, 5, 5]], "scores": [10**4000]})


def test_max_boxes() -> None:
    assert len(validate_boxes([[0, 0, 5, 5]] * 3, max_boxes=3)[0]) == 3
    with pytest.raises(BoxesError, match="boxes holds 4 boxes; at most 3"):
        validate_boxes([[0, 0, 5, 5]] * 4, max_boxes=3)
    assert len(validate_boxes([[0, 0, 5, 5]] * 5000)[0]) == 5000  # None: no limit


def test_the_error_is_a_value_error_that_does_not_echo_the_input() -> None:
    secret = "x" * 500
    with pytest.raises(ValueError, match="not str") as info:
        validate_boxes([[0, 0, secret, 5]])
    assert secret not in str(info.value)


def test_the_validator_imports_no_torch() -> None:
    code = "import sys, service.core.boxes; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
