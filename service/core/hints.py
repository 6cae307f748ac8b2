"""Colour hints as the API carries them: the JSON shape, its bounds, and its parsing (no torch).

The same shape is taken by ``POST /colorize?hints=``, the batch API's per-item ``hints`` and
``colorize --hints FILE.json``. What needs the image (points inside it) and the model (whether it
takes hints) is checked by the model when the image is prepared (``models.hints.check_hints``),
also as 422.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from models.constants import DEFAULT_HINT_SIZE, HINT_SIZE_RANGE, MAX_HINTS
from service.core.errors import InvalidParameterError, parse_json_query

HEX_PATTERN = r"^#[0-9a-fA-F]{6}$"
MAX_HINTS_CHARS = 160 * (MAX_HINTS + 1)  # room for MAX_HINTS hints written at length


class HintPoint(BaseModel):
    """One colour hint: a point in input pixels and the colour the network should give it there.

    Exactly one of ``color`` (sRGB; only its Lab a and b are used, the image keeps its own
    lightness) and ``ab`` (a Lab pair) is given.
    """

    model_config = ConfigDict(extra="forbid")

    x: float = Field(ge=0, allow_inf_nan=False, description="Column in input pixels (after EXIF "
                     "rotation), 0 <= x < image width.")  # fmt: skip
    y: float = Field(ge=0, allow_inf_nan=False, description="Row in input pixels (after EXIF "
                     "rotation), 0 <= y < image height.")  # fmt: skip
    color: str | None = Field(
        default=None, pattern=HEX_PATTERN, description="sRGB colour '#rrggbb' (its Lab ab is used)."
    )
    ab: list[float] | None = Field(
        default=None,
        min_length=2,
        max_length=2,
        description="Lab [a, b], each in [-110, 110], instead of color.",
    )
    size: int = Field(
        default=DEFAULT_HINT_SIZE,
        ge=HINT_SIZE_RANGE[0],
        le=HINT_SIZE_RANGE[1],
        description="Side of the square patch the hint covers in the network's 256x256 input "
        "(the authors' patch sizes 1-9), centred on the point.",
    )

    @model_validator(mode="after")
    def _one_colour(self) -> HintPoint:
        if (self.color is None) == (self.ab is None):
            raise ValueError('give exactly one of "color": "#rrggbb" and "ab": [a, b]')
        if self.ab is not None and not all(
            math.isfinite(v) and -110.0 <= v <= 110.0 for v in self.ab
        ):
            raise ValueError("ab values must be finite and within [-110, 110]")
        return self


HINT_LIST = TypeAdapter(list[HintPoint])


def hints_schema() -> dict[str, Any]:
    """The JSON Schema of a hints list (for OpenAPI's ``contentSchema``)."""
    schema = HINT_LIST.json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    return {**schema, "maxItems": MAX_HINTS}


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        message = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"hint {where}: {message}" if where else message)
    return "; ".join(parts)


def validate_hints(value: Any) -> list[dict[str, Any]]:
    """A parsed JSON value as checked hints (plain dicts, ``None`` fields left out); else 422."""
    if not isinstance(value, list):
        raise InvalidParameterError(
            'hints must be a JSON list of {"x", "y", "color": "#rrggbb" or "ab": [a, b], "size"}'
        )
    if len(value) > MAX_HINTS:
        raise InvalidParameterError(f"{len(value)} hints given; at most {MAX_HINTS} are accepted")
    try:
        points = HINT_LIST.validate_python(value)
    except ValidationError as exc:
        raise InvalidParameterError(f"hints: {_describe(exc)}") from None
    return [p.model_dump(exclude_none=True) for p in points]


def parse_hints(text: str | None) -> list[dict[str, Any]] | None:
    """The ``hints`` query value (JSON text) as checked hints; None when left out."""
    if text is None:
        return None
    value = parse_json_query(
        "hints",
        text,
        MAX_HINTS_CHARS,
        f"at most {MAX_HINTS} hints are accepted",
        "send a flat list",
    )
    return validate_hints(value) or None
