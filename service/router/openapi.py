"""The OpenAPI document as served: error responses as application/problem+json."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.router.schemas import PROBLEM_JSON


def install_openapi(app: FastAPI) -> None:
    """Error responses are documented as application/problem+json, not application/json."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                for status, response in operation.get("responses", {}).items():
                    content = response.get("content", {})
                    is_error = status.isdigit() and int(status) >= 400
                    problem = "Problem" in json.dumps(content.get("application/json", {}))
                    if is_error and problem:
                        content[PROBLEM_JSON] = content.pop("application/json")
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
