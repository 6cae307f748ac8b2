"""Exception handlers: every error leaves as problem+json and is counted."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.core.errors import (
    InvalidParameterError,
    OverloadedError,
    ServiceError,
)
from service.router.middleware import request_id_of
from service.router.responses import (
    PROBLEM_JSON,
    count_outcome,
    internal_error_response,
    problem_response,
)
from service.router.state import ServiceState


def install_error_handlers(app: FastAPI, state: ServiceState) -> None:
    async def service_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)
        status = state.settings.overload_status if isinstance(exc, OverloadedError) else None
        response = problem_response(exc, request_id_of(request), status)
        count_outcome(request, response.status_code, exc.kind)
        return response

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        details = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'][1:]) or 'request'}: {err['msg']}"
            for err in exc.errors()
        )
        response = problem_response(InvalidParameterError(details), request_id_of(request))
        count_outcome(request, response.status_code)
        return response

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        body = {
            "type": "about:blank",
            "title": str(exc.detail),
            "status": exc.status_code,
            "detail": str(exc.detail),
            "request_id": request_id_of(request),
        }
        return JSONResponse(
            body, status_code=exc.status_code, headers=exc.headers, media_type=PROBLEM_JSON
        )

    async def unhandled(request: Request, exc: Exception) -> Response:
        # the last resort (middleware.UnhandledErrorMiddleware answers first, inside the stack)
        return internal_error_response(request, request_id_of(request), exc)

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unhandled)
