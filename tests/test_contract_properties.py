"""Property-based tests of the request contract: the ``boxes`` parser against its documented
schema, and every declared query parameter of POST /colorize through the ASGI app."""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from service_helpers import service_settings

from service.app import create_app
from service.core.boxes import MAX_COORDINATE
from service.core.errors import InvalidParameterError
from service.router.inputs import boxes_max_chars, parse_boxes
from service.router.schemas import PROBLEM_JSON, boxes_content_schema

MAX_BOXES = 16
SCHEMA = boxes_content_schema(MAX_BOXES, MAX_COORDINATE)
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)

finite = st.floats(-MAX_COORDINATE, MAX_COORDINATE, allow_nan=False) | st.integers(-1000, 1000)


@st.composite
def valid_box(draw: st.DrawFn) -> list[float]:
    """A box of the schema that also holds x2 > x1 and y2 > y1 (which JSON Schema cannot say)."""
    x1, x2 = sorted(draw(st.lists(finite, min_size=2, max_size=2, unique=True)))
    y1, y2 = sorted(draw(st.lists(finite, min_size=2, max_size=2, unique=True)))
    return [x1, y1, x2, y2]


@st.composite
def valid_boxes_value(draw: st.DrawFn) -> Any:
    boxes = draw(st.lists(valid_box(), max_size=MAX_BOXES))
    form = draw(st.sampled_from(["list", "object", "scored"]))
    if form == "list":
        return boxes
    if form == "object":
        return {"boxes": boxes}
    scores = draw(st.lists(st.floats(allow_nan=False, allow_infinity=False),
                           min_size=len(boxes), max_size=len(boxes)))  # fmt: skip
    return {"boxes": boxes, "scores": scores}


json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(
        st.sampled_from(["boxes", "scores", "x"]) | st.text(max_size=3), children, max_size=3
    ),
    max_leaves=30,
)  # fmt: skip


def assert_within_contract(text: str, boxes: list[list[float]] | None, scores: Any) -> None:
    """What an accepted ``boxes`` text gives: finite boxes within the limits, schema-valid JSON."""
    assert boxes is not None
    assert len(boxes) <= MAX_BOXES
    for x1, y1, x2, y2 in boxes:
        assert all(math.isfinite(v) and abs(v) <= MAX_COORDINATE for v in (x1, y1, x2, y2))
        assert x2 > x1 and y2 > y1
    if scores is not None:
        assert len(scores) == len(boxes) and all(math.isfinite(s) for s in scores)
    VALIDATOR.validate(json.loads(text))  # nothing outside the documented schema is accepted


@settings(max_examples=300, deadline=None)
@given(valid_boxes_value())
def test_every_schema_value_with_ordered_corners_is_accepted_as_sent(value: Any) -> None:
    VALIDATOR.validate(value)
    text = json.dumps(value)
    assert len(text) <= boxes_max_chars(MAX_BOXES)
    boxes, scores = parse_boxes(text, MAX_BOXES)
    sent = value if isinstance(value, list) else value["boxes"]
    assert boxes == [[float(v) for v in box] for box in sent]
    expected = value.get("scores") if isinstance(value, dict) else None
    assert scores == expected
    assert_within_contract(text, boxes, scores)


@settings(max_examples=400, deadline=None)
@given(st.one_of(json_values.map(json.dumps), st.text(max_size=80)))
def test_any_text_is_accepted_within_the_contract_or_refused_with_422(text: str) -> None:
    refusal: InvalidParameterError | None = None
    try:
        boxes, scores = parse_boxes(text, MAX_BOXES)
    except InvalidParameterError as exc:  # any other exception fails the test
        refusal = exc
    if refusal is not None:
        assert refusal.status == 422
        assert refusal.detail
    else:
        assert_within_contract(text, boxes, scores)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(finite, min_size=4, max_size=4), min_size=1, max_size=MAX_BOXES))
def test_boxes_with_unordered_corners_are_refused(boxes: list[list[float]]) -> None:
    """The one rule of the box list JSON Schema cannot state: refused, never normalised."""
    degenerate = any(x2 <= x1 or y2 <= y1 for x1, y1, x2, y2 in boxes)
    if degenerate:
        with pytest.raises(InvalidParameterError, match="x2 > x1 and y2 > y1"):
            parse_boxes(json.dumps(boxes), MAX_BOXES)
    else:
        assert parse_boxes(json.dumps(boxes), MAX_BOXES)[0] == [
            [float(v) for v in b] for b in boxes
        ]


def test_limits_are_the_documented_ones() -> None:
    too_many = [[0, 0, 1, 1]] * (MAX_BOXES + 1)
    VALIDATOR.validate(too_many[:MAX_BOXES])
    assert not VALIDATOR.is_valid(too_many)
    with pytest.raises(InvalidParameterError, match="at most"):
        parse_boxes(json.dumps(too_many), MAX_BOXES)
    beyond = [[0, 0, 1, MAX_COORDINATE * 2]]
    assert not VALIDATOR.is_valid(beyond)
    with pytest.raises(InvalidParameterError, match="beyond"):
        parse_boxes(json.dumps(beyond), MAX_BOXES)
    with pytest.raises(InvalidParameterError, match="finite"):
        parse_boxes('{"boxes": [[0, 0, 1, 1]], "scores": [1e400]}', MAX_BOXES)


# --- the query parameters, through the app --------------------------------------------------


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((20, 14)).save(buffer, "PNG")
    return buffer.getvalue()


PNG = _png()


@pytest.fixture(scope="module")
def client(tiny_checkpoints: Path) -> Iterator[TestClient]:
    app = create_app(service_settings(tiny_checkpoints, max_boxes=MAX_BOXES))
    with TestClient(app) as test_client:
        deadline = time.monotonic() + 60
        while test_client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the app did not become ready"
            time.sleep(0.05)
        yield test_client


def declared_query(client: TestClient) -> dict[str, dict[str, Any]]:
    """The declared query parameters of POST /colorize and their served schemas."""
    operation = client.app.openapi()["paths"]["/colorize"]["post"]  # type: ignore[attr-defined]
    return {p["name"]: p["schema"] for p in operation["parameters"] if p["in"] == "query"}


def valid_value(name: str, schema: dict[str, Any]) -> st.SearchStrategy[str]:
    """Values the served schema allows, as they travel in a query string."""
    schema = next((s for s in schema.get("anyOf", []) if s.get("type") != "null"), schema)
    if "enum" in schema:
        return st.sampled_from([str(v) for v in schema["enum"]])
    if name == "hints":  # this app's instcolor (released checkpoints) takes no hints: only []
        return st.just("[]")
    if "contentSchema" in schema:  # boxes: the rule JSON Schema cannot state is kept here
        return valid_boxes_value().map(json.dumps)
    low, high = schema.get("minimum"), schema.get("maximum")
    if schema.get("type") == "integer":
        return st.integers(low, high).map(str)
    assert schema.get("type") == "number", schema
    return st.floats(low, high, allow_nan=False).map(repr)


REFUSED_BY_THIS_MODEL = frozenset({"temperature"})
"""Declared parameters this app's model (instcolor) refuses whatever the value: the temperature is
for the annealed-mean models only (tests/test_temperature_serving.py checks the 422 and its text)."""

any_value = st.one_of(
    st.text(max_size=12),
    st.integers(-1000, 1000).map(str),
    st.floats().map(repr),
    st.sampled_from(["jpeg", "png", "webp", "original", "network", "", "nan", "inf", "1e999"]),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_random_query_values_are_answered_200_or_problem_422_never_500(
    client: TestClient, data: st.DataObject
) -> None:
    """Any value for any declared parameter: 200, or 422 problem+json; all valid: 200."""
    declared = declared_query(client)
    chosen = data.draw(st.lists(st.sampled_from(sorted(declared)), unique=True))
    query, all_valid = {}, True
    for name in chosen:
        if name in REFUSED_BY_THIS_MODEL:  # in range or not: a 422 problem, never a 200
            all_valid = False
            strategy = st.one_of(valid_value(name, declared[name]), any_value)
            query[name] = data.draw(strategy, label=name)
            continue
        valid = data.draw(st.booleans(), label=f"{name} valid")
        all_valid &= valid
        query[name] = data.draw(
            valid_value(name, declared[name]) if valid else any_value, label=name
        )
    response = client.post(
        "/colorize", params=query, content=PNG, headers={"content-type": "image/png"}
    )
    assert response.status_code in (200, 422), (query, response.status_code, response.text)
    if all_valid:
        assert response.status_code == 200, (query, response.text)
    if response.status_code == 422:
        assert response.headers["content-type"] == PROBLEM_JSON
        problem = response.json()
        assert problem["type"].endswith("/invalid-parameter") and problem["status"] == 422
    else:
        assert response.headers["content-type"].startswith("image/")


# --- the document under other settings ------------------------------------------------------


def test_the_document_follows_the_settings(tiny_checkpoints: Path) -> None:
    """401 (and the security schemes) appear where API keys guard a route; limits follow."""
    open_doc = create_app(service_settings(tiny_checkpoints)).openapi()
    assert "401" not in open_doc["paths"]["/info"]["get"]["responses"]
    assert "securitySchemes" not in open_doc["components"]
    guarded = create_app(
        service_settings(
            tiny_checkpoints,
            api_keys="ci:a-long-enough-test-key-0123456789",
            auth_open_probes=False,
            max_boxes=5,
        )
    ).openapi()
    schemes = guarded["components"]["securitySchemes"]
    assert schemes["apiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    for path in ("/colorize", "/info", "/healthz", "/readyz"):
        operation = next(iter(guarded["paths"][path].values()))
        assert PROBLEM_JSON in operation["responses"]["401"]["content"], path
        assert operation["security"] == [{"bearer": []}, {"apiKey": []}]
    assert "401" not in guarded["paths"]["/metrics"]["get"]["responses"]  # open by default
    boxes = next(
        p for p in guarded["paths"]["/colorize"]["post"]["parameters"] if p["name"] == "boxes"
    )
    assert boxes["schema"]["contentSchema"]["anyOf"][0]["maxItems"] == 5
    assert boxes["schema"]["maxLength"] == boxes_max_chars(5)
    for path, item in guarded["paths"].items():
        for operation in item.values():
            for status in ("408", "431", "422", "500"):
                assert status in operation["responses"], (path, status)
