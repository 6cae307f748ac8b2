"""The OpenAPI shapes of the API: response models, the problem responses, request bodies."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from service.core.errors import (
    PROBLEM_BASE,
)

PROBLEM_JSON = "application/problem+json"


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str = Field(examples=[PROBLEM_BASE + "invalid-image"])
    title: str
    status: int
    detail: str
    request_id: str | None = None


class SampleJSON(BaseModel):
    """One colouring drawn by a sampling model (zhao-pixelated)."""

    index: int = Field(description="0 to samples - 1; sample 0 is also image_base64.")
    image_base64: str = Field(description="The colorized image, base64-encoded (media_type).")


class ColorizeJSON(BaseModel):
    """The ``Accept: application/json`` answer of POST /colorize."""

    request_id: str
    model: str = Field(default="instcolor", description="The model that ran (?model=).")
    model_version: str
    media_type: str = Field(description="Media type of the encoded image.")
    image_base64: str = Field(description="The colorized image, base64-encoded.")
    instances: int = Field(description="Number of instance boxes used.")
    boxes: list[list[int]] = Field(description="Boxes used, [x1, y1, x2, y2] in input pixels.")
    scores: list[float]
    input_size: list[int] | None = Field(
        default=None, description="[width, height] of the upright input: the frame of the boxes."
    )
    saturation: float = Field(description="The colour strength applied.")
    timings_ms: dict[str, float] = Field(description="Milliseconds per stage, and total.")
    cached: bool = False
    seed: int | None = Field(
        default=None, description="A sampling model's seed (?seed=, or the one drawn); else null."
    )
    samples: list[SampleJSON] | None = Field(
        default=None,
        description="A sampling model's colourings (?samples=N), sample 0 first; else null.",
    )
    truncated: bool = Field(
        default=False,
        description="The input was cut short and decoded as far as its data went (only with "
        "COLORIZE_ALLOW_TRUNCATED_IMAGES; otherwise truncated data gets 400 truncated-image).",
    )


class WeightFileInfo(BaseModel):
    name: str = Field(description="File name (no folders).")
    sha256: str


class ModelInfo(BaseModel):
    """One model this server serves."""

    name: str = Field(description="The value of POST /colorize?model=.")
    default: bool = Field(description="Used when ?model= is left out.")
    loaded: bool = Field(
        description="Ready here (memory mode) or published by a live worker (Redis mode)."
    )
    title: str | None = None
    paper: str | None = None
    model_version: str | None = None
    input_size: int | None = Field(
        default=None, description="Side of the square L the network sees (px)."
    )
    uses_boxes: bool | None = Field(
        default=None, description="Whether the model uses instance boxes (detector or ?boxes=)."
    )
    max_samples: int | None = Field(
        default=None,
        description="Most ?samples= per image (1: one colouring; > 1: a sampling model).",
    )
    takes_hints: bool | None = Field(
        default=None, description="Whether the model follows colour hints (?hints=)."
    )
    temperature: float | None = Field(
        default=None,
        description="A model that decodes by the annealed mean: its default ?temperature= "
        "(zhang-eccv16 1, li-dcnn 0.38); null for the others (they refuse the option).",
    )
    files: list[WeightFileInfo] = Field(default_factory=list, description="Weight files loaded.")
    detector: str | None = None
    device: str | None = None
    precision: str | None = None


class ModelList(BaseModel):
    default: str
    models: list[ModelInfo]


class Status(BaseModel):
    status: str
    detail: str | None = None


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    when = {
        400: "The image could not be decoded (corrupt, not an image: invalid-image) or its data "
        "is cut short (truncated-image).",
        401: "API keys are on (COLORIZE_API_KEYS) and the request has no valid key; see "
        "WWW-Authenticate.",
        413: "Body over max_body_bytes, or image over max_pixels (checked before decoding).",
        415: "Not an image content type, an unsupported image format, or an animated image.",
        422: "A parameter is out of range or malformed, a model that is not loaded here "
        "(?model=), boxes for a model that does not use them, or hints that are malformed, "
        "too many, outside the image, or for a model that takes none.",
        429: "Queue full (when COLORIZE_OVERLOAD_STATUS=429); see Retry-After.",
        500: "Internal error; the body carries the request ID, never a stack trace.",
        503: "Queue full, estimated work past the deadline, no live worker, model loading or "
        "server draining; see Retry-After.",
        504: "The request's deadline passed before it was served.",
    }
    return {status: {"model": Problem, "description": when[status]} for status in statuses}


def boxes_content_schema(max_boxes: int, max_coordinate: float) -> dict[str, Any]:
    """The JSON a ``boxes`` parameter holds: a list of boxes, or boxes with their scores."""
    number = {"type": "number", "minimum": -max_coordinate, "maximum": max_coordinate}
    box_list = {
        "type": "array",
        "maxItems": max_boxes,
        "items": {"type": "array", "minItems": 4, "maxItems": 4, "items": number},
        "description": "[x1, y1, x2, y2] per box, x2 > x1 and y2 > y1; list order is priority.",
    }
    scored = {
        "type": "object",
        "required": ["boxes"],
        "properties": {
            "boxes": box_list,
            "scores": {
                "type": ["array", "null"],  # null: as if left out
                "maxItems": max_boxes,
                "items": {"type": "number"},
                "description": "One finite score per box (the order of use: highest first).",
            },
        },
    }
    return {"anyOf": [box_list, scored]}


COLORIZE_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"image": {"type": "string", "format": "binary"}},
                "required": ["image"],
            },
            # the part's own content type is checked as the raw body's is (else 415)
            "encoding": {"image": {"contentType": "image/*, application/octet-stream"}},
        },
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}

IMAGE_CONTENT = {
    media: {"schema": {"type": "string", "format": "binary"}}
    for media in ("image/jpeg", "image/png", "image/webp")
}
