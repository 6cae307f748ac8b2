"""The middleware stack: request IDs, API keys, CORS, and the 500 answer for a bug.

From the outside in: CORS (preflights are answered before the key check), request IDs (a 401
has one too), API keys, then the unhandled-error guard, so the 500 problem of an unexpected
exception still carries its ``X-Request-ID`` and CORS headers and is counted.
"""

from __future__ import annotations

import re
import uuid

from fastapi import FastAPI, Request
from starlette.datastructures import MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.router.auth import ApiKeyMiddleware, AuthPolicy
from service.router.responses import internal_error_response
from service.settings import ServiceSettings

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class RequestIdMiddleware:
    """Echo a sane ``X-Request-ID`` or generate one; store it in the request state."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = ""
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
        request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)


def request_id_of(request: Request) -> str:
    return str(getattr(request.state, "request_id", "") or uuid.uuid4().hex)


class UnhandledErrorMiddleware:
    """An exception no handler took (a bug) becomes the 500 problem, logged and counted.

    Starlette answers such exceptions outside every middleware (no request ID, no CORS headers);
    this one sits inside them. An exception after the response started is left to the server.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise
            request = Request(scope)
            response = internal_error_response(request, request_id_of(request), exc)
            await response(scope, receive, send)


CORS_HEADERS = ["Authorization", "X-API-Key", "X-Request-ID", "Content-Type"]
CORS_EXPOSED = [
    "X-Request-ID", "X-Instances", "X-Model-Version", "Server-Timing", "Retry-After",
    "X-Image-Truncated",
]  # fmt: skip


def install_middleware(app: FastAPI, settings: ServiceSettings, policy: AuthPolicy) -> None:
    """Added from the inside out (Starlette wraps each new middleware around the previous)."""
    app.add_middleware(UnhandledErrorMiddleware)
    app.add_middleware(ApiKeyMiddleware, policy=policy)
    app.add_middleware(RequestIdMiddleware)  # outside the key check: a 401 has its request ID
    origins = settings.cors_origin_list()
    if origins:  # outermost: preflights are answered before the key check
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=CORS_HEADERS,
            expose_headers=CORS_EXPOSED,
        )
