"""The OpenAPI document as served: the exact contract of every operation.

FastAPI's generated document is completed here, with the running settings' limits:

- error responses are application/problem+json;
- every operation lists every status it can return (401 on the routes other than /colorize only
  where API keys guard them), the HTTP server's own refusals (408, 431, 503 as text/plain), and
  each response the ``X-Request-ID`` header it carries;
- ``boxes`` is described as what it is: a string holding JSON (OpenAPI 3.1 ``contentMediaType`` +
  ``contentSchema``) in one of the two accepted forms, within max_boxes and the coordinate bound;
- the request body names its media types and the max_body_bytes limit.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.core.api_keys import load_api_keys
from service.core.boxes import MAX_COORDINATE
from service.core.hints import MAX_HINTS, MAX_HINTS_CHARS, HintPoint, hints_schema
from service.core.image_header import ACCEPTED_FORMATS
from service.router.inputs import MAX_NUMBER_CHARS, boxes_max_chars
from service.router.schemas import (
    PROBLEM_JSON,
    Problem,
    boxes_content_schema,
    problem_responses,
)
from service.settings import ServiceSettings

REQUEST_ID_HEADER = {
    "description": "The request's ID (the caller's X-Request-ID when it sent a valid one).",
    "required": True,
    "schema": {"type": "string"},
}
PROBES = ("/healthz", "/readyz")
# Refusals by the HTTP server itself (service/router/server.py), before any route: plain text,
# then the connection is closed. Any operation can meet them.
TRANSPORT_REFUSALS = {
    "408": "The request line and headers did not arrive within COLORIZE_HEADER_TIMEOUT_S.",
    "431": "Request line plus headers over COLORIZE_MAX_HEADER_BYTES (a very long query).",
    "503": "Over COLORIZE_MAX_CONNECTIONS open connections.",
}
PLAIN_TEXT = {"text/plain": {"schema": {"type": "string"}}}


def _boxes_parameter(settings: ServiceSettings) -> dict[str, Any]:
    limit = settings.max_boxes
    return {
        "type": "string",
        "maxLength": boxes_max_chars(limit),
        "contentMediaType": "application/json",
        "contentSchema": boxes_content_schema(limit, MAX_COORDINATE),
        "description": (
            'JSON: [[x1,y1,x2,y2],...] or {"boxes":[...],"scores":[...]} (see contentSchema), '
            f"at most {limit} boxes (COLORIZE_MAX_BOXES), in input pixels after EXIF rotation. "
            "Constraints JSON Schema cannot state, also enforced (422): x2 > x1 and y2 > y1 in "
            "every box; as many scores as boxes; every number written with at most "
            f"{MAX_NUMBER_CHARS} characters. Skips the detector."
        ),
    }


def _hints_parameter() -> dict[str, Any]:
    return {
        "type": "string",
        "maxLength": MAX_HINTS_CHARS,
        "contentMediaType": "application/json",
        "contentSchema": hints_schema(),
        "description": (
            'JSON list of colour hints (see contentSchema and HintPoint): {"x", "y", "color": '
            '"#rrggbb" or "ab": [a, b], "size"}, at most '
            f"{MAX_HINTS} ([] = no hints), x and y in input pixels after EXIF rotation. Each "
            "hint's Lab ab / 110 "
            "is placed over a size x size patch around the point in the network's 256x256 input, "
            "with the hint mask set there. Also refused (422): a point outside the image, or "
            "hints for a model that takes none (only zhang-siggraph17 takes them)."
        ),
    }


def _operation_errors(path: str, settings: ServiceSettings, keys_on: bool) -> tuple[int, ...]:
    """Statuses (>= 400) ``path`` can answer under these settings."""
    guarded = keys_on and (
        path == "/colorize"
        or path == "/info"
        or (path in PROBES and not settings.auth_open_probes)
        or (path == "/metrics" and not settings.auth_open_metrics)
    )
    statuses = {422, 500}  # 422: an undeclared query parameter; 500: an internal error
    if guarded:
        statuses.add(401)
    if path == "/colorize":  # 401 and 429 are declared by the route itself, as possible ones
        statuses |= {400, 413, 415, 503, 504}
    return tuple(sorted(statuses))


def complete_schema(schema: dict[str, Any], settings: ServiceSettings) -> dict[str, Any]:
    """Add the running settings' limits and every possible response to FastAPI's document."""
    keys_on = bool(load_api_keys(settings.api_keys, settings.api_key_file))
    components = schema.setdefault("components", {})
    if keys_on:
        components.setdefault("securitySchemes", {}).update(
            {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            }
        )
    for path, item in schema.get("paths", {}).items():
        for operation in item.values():
            responses = operation.setdefault("responses", {})
            possible = _operation_errors(path, settings, keys_on)
            for code, declared in problem_responses(*possible).items():
                if str(code) not in responses:
                    responses[str(code)] = {
                        "description": declared["description"],
                        "content": {
                            PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}
                        },
                    }
            for status, description in TRANSPORT_REFUSALS.items():
                if status in responses:
                    responses[status]["description"] += f" Or, as text/plain: {description}"
                    responses[status].setdefault("content", {}).update(PLAIN_TEXT)
                else:
                    responses[status] = {"description": description, "content": dict(PLAIN_TEXT)}
            if "401" in responses:
                operation["security"] = [{"bearer": []}, {"apiKey": []}]
            for status, response in responses.items():
                content = response.get("content", {})
                is_error = status.isdigit() and int(status) >= 400
                problem = "Problem" in json.dumps(content.get("application/json", {}))
                if is_error and problem:
                    content[PROBLEM_JSON] = content.pop("application/json")
                # the HTTP server's own refusals are sent before the request has an ID
                request_id = {**REQUEST_ID_HEADER, "required": status not in TRANSPORT_REFUSALS}
                response.setdefault("headers", {})["X-Request-ID"] = request_id
            if path == "/colorize" and "requestBody" in operation:
                operation["requestBody"]["description"] = (
                    "The image (" + ", ".join(ACCEPTED_FORMATS) + "; a single frame), "
                    "as the raw body with an image/* or application/octet-stream content type, or "
                    "as the multipart file field 'image'. At most "
                    f"{settings.max_body_bytes} bytes (COLORIZE_MAX_BODY_BYTES, else 413), at "
                    f"most {settings.max_pixels} pixels (COLORIZE_MAX_PIXELS, else 413) and a "
                    f"side ratio of at most {settings.max_aspect_ratio:g} (else 422); another "
                    "content type gets 415, undecodable data 400."
                )
            for parameter in operation.get("parameters", []):
                if path == "/colorize" and parameter.get("name") == "boxes":
                    parameter["schema"] = _boxes_parameter(settings)
                    parameter["description"] = parameter["schema"].pop("description")
                if path == "/colorize" and parameter.get("name") == "hints":
                    parameter["schema"] = _hints_parameter()
                    parameter["description"] = parameter["schema"].pop("description")
                    components.setdefault("schemas", {})["HintPoint"] = (
                        HintPoint.model_json_schema()
                    )
    if "Problem" not in components.get("schemas", {}):
        components.setdefault("schemas", {})["Problem"] = Problem.model_json_schema()
    return schema


def install_openapi(app: FastAPI) -> None:
    """Serve the completed document (built once, from the app's settings)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        app.openapi_schema = complete_schema(schema, app.state.service.settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
