"""Optional API keys (``COLORIZE_API_KEYS`` / ``COLORIZE_API_KEY_FILE``) as an ASGI middleware.

A key comes as ``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` and is compared with every
configured key in constant time (``hmac.compare_digest``), so the answer's timing says nothing
about how much of a guess was right. A request without a valid key gets 401 problem+json with
``WWW-Authenticate: Bearer``. The key's *name* goes into the request state (``api_key_name``) for
metrics and logs; the key itself is never stored anywhere else.

Always open: the web page (``/``, ``/static/*``: no data, and it asks the user for a key on 401)
and the API description (``/docs``, ``/redoc``, ``/openapi.json``); health probes and ``/metrics``
stay open unless ``auth_open_probes`` / ``auth_open_metrics`` are false.
"""

from __future__ import annotations

import hmac
import json
import logging
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from service.core.api_keys import ANONYMOUS
from service.core.errors import PROBLEM_BASE
from service.core.metrics import METRICS

log = logging.getLogger(__name__)

DOC_PATHS = frozenset({"/", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
PROBE_PATHS = frozenset({"/healthz", "/readyz"})


@dataclass(frozen=True)
class AuthPolicy:
    keys: dict[str, str]
    open_probes: bool = True
    open_metrics: bool = True

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def is_open(self, path: str) -> bool:
        if path in DOC_PATHS or path.startswith("/static/"):
            return True
        if path in PROBE_PATHS:
            return self.open_probes
        return path == "/metrics" and self.open_metrics

    def key_name(self, presented: str) -> str | None:
        """The name of the key ``presented`` matches; every key is compared, in constant time."""
        found = None
        candidate = presented.encode("utf-8", "surrogateescape")
        for name, key in self.keys.items():
            if hmac.compare_digest(candidate, key.encode("utf-8")):
                found = name
        return found


def presented_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"x-api-key":
            return value.decode("latin-1").strip()
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class ApiKeyMiddleware:
    """401 for requests without a valid key (when keys are configured); records the key name."""

    def __init__(self, app: ASGIApp, policy: AuthPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        if not self.policy.enabled:
            state["api_key_name"] = ANONYMOUS
            await self.app(scope, receive, send)
            return
        key = presented_key(scope.get("headers", []))
        name = self.policy.key_name(key) if key is not None else None
        if name is not None:
            state["api_key_name"] = name
            await self.app(scope, receive, send)
            return
        if self.policy.is_open(scope["path"]) or scope["method"] == "OPTIONS":
            state["api_key_name"] = ANONYMOUS
            await self.app(scope, receive, send)
            return
        detail = (
            "this API key is not valid"
            if key is not None
            else "an API key is required: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
        )
        METRICS.unauthorized.inc()
        log.info("request %s to %s refused: %s", state.get("request_id"), scope["path"], detail)
        body = {
            "type": PROBLEM_BASE + "unauthorized",
            "title": "API key required",
            "status": 401,
            "detail": detail,
            "request_id": state.get("request_id"),
        }
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/problem+json"),
                    (b"www-authenticate", b'Bearer realm="instcolor"'),
                ],
            }
        )
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})


__all__ = ["ApiKeyMiddleware", "AuthPolicy"]
