"""Batch webhooks per Standard Webhooks: signed thin payloads, retried with backoff and jitter.

A destination is checked when the batch is submitted and again before every attempt (DNS may
change): its host must be in COLORIZE_WEBHOOK_ALLOWED_HOSTS ('*' for any host), and an address
that is loopback, private, link-local, reserved or multicast is refused unless the host is named
in the list itself. Redirects are never followed (a 3xx is a failed attempt). Every attempt is
recorded on the batch (``webhook.deliveries``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import random
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from standardwebhooks import Webhook

from service.core.metrics import METRICS

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 300.0


class WebhookRefused(ValueError):
    """The destination is not allowed; the message says why and which setting decides."""


def _is_internal(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_reserved
        or ip.is_multicast
        or ip.is_unspecified
    )


def check_destination(url: str, allowed: list[str]) -> None:
    """Raise ``WebhookRefused`` unless ``url`` may receive webhooks."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused(f"webhook_url {url!r} must be an absolute http(s) URL")
    if parts.username or parts.password:
        raise WebhookRefused("webhook_url must not carry credentials")
    host = parts.hostname.lower()
    named = host in allowed
    if not named and "*" not in allowed:
        raise WebhookRefused(
            f"webhook host {host!r} is not in COLORIZE_WEBHOOK_ALLOWED_HOSTS "
            f"({', '.join(allowed) or 'empty: webhooks are off'})"
        )
    if named:
        return
    try:
        infos = socket.getaddrinfo(host, parts.port or 443, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise WebhookRefused(f"webhook host {host!r} does not resolve: {exc}") from None
    for info in infos:
        if _is_internal(str(info[4][0])):
            raise WebhookRefused(
                f"webhook host {host!r} resolves to the internal address {info[4][0]}; name the "
                "host in COLORIZE_WEBHOOK_ALLOWED_HOSTS to allow it"
            )


def backoff_s(attempt: int, base: float) -> float:
    """Full jitter: uniform in [0, base * 2**(attempt-1)], capped (attempt counts from 1)."""
    return random.uniform(0.0, min(MAX_BACKOFF_S, base * 2 ** (attempt - 1)))  # noqa: S311


def payload(event: str, batch: dict[str, Any]) -> bytes:
    """The thin payload: the event, the batch id, status and counts, never images."""
    return json.dumps(
        {
            "type": event,
            "timestamp": datetime.now(UTC).isoformat(),
            "data": {
                "id": batch["id"],
                "object": "batch",
                "status": batch["status"],
                "request_counts": batch["request_counts"],
                "metadata": batch.get("metadata", {}),
            },
        },
        separators=(",", ":"),
    ).encode()


Recorder = Callable[[str, dict[str, Any], bool], Awaitable[None]]
"""``record(batch_id, attempt, delivered)``: stores one attempt on the batch."""


class WebhookSender:
    def __init__(
        self,
        secret: str | None,
        allowed_hosts: list[str],
        *,
        max_attempts: int,
        backoff_base_s: float,
        timeout_s: float,
    ) -> None:
        self.signer = Webhook(secret) if secret else None
        self.allowed_hosts = allowed_hosts
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.timeout_s = timeout_s
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(follow_redirects=False, timeout=self.timeout_s)
        return self._client

    def send(
        self,
        batch_id: str,
        url: str,
        event: str,
        body: bytes,
        record: Recorder,
        *,
        message_id: str | None = None,
        resent: bool = False,
        on_done: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Deliver in the background (retries included). ``message_id``: the webhook-id (the
        same on a re-send, so a receiver can drop a duplicate); ``resent``: marks the attempts
        of a delivery re-sent after a restart; ``on_done``: awaited once the delivery is over
        (delivered, refused or out of attempts), never when the sender is stopped first."""
        task = asyncio.create_task(
            self._deliver(batch_id, url, event, body, record, message_id, resent, on_done)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(
        self,
        batch_id: str,
        url: str,
        event: str,
        body: bytes,
        record: Recorder,
        message_id: str | None,
        resent: bool,
        on_done: Callable[[], Awaitable[None]] | None,
    ) -> None:
        await self._attempts(batch_id, url, event, body, record, message_id, resent)
        if on_done is not None:
            await on_done()

    async def _attempts(
        self,
        batch_id: str,
        url: str,
        event: str,
        body: bytes,
        record: Recorder,
        message_id: str | None,
        resent: bool,
    ) -> None:
        assert self.signer is not None
        message_id = message_id or "msg_" + secrets.token_hex(12)
        for attempt in range(1, self.max_attempts + 1):
            started = time.time()
            outcome: dict[str, Any] = {
                "event": event,
                "webhook_id": message_id,
                "attempt": attempt,
                "at": int(started),
            }
            if resent:
                outcome["resent"] = True
            delivered = False
            try:
                check_destination(url, self.allowed_hosts)
                now = datetime.now(UTC)
                headers = {
                    "content-type": "application/json",
                    "webhook-id": message_id,
                    "webhook-timestamp": str(int(now.timestamp())),
                    "webhook-signature": self.signer.sign(message_id, now, body),
                }
                response = await self.client().post(url, content=body, headers=headers)
                outcome["status_code"] = response.status_code
                delivered = 200 <= response.status_code < 300
                if not delivered and 300 <= response.status_code < 400:
                    outcome["error"] = "redirects are not followed"
            except WebhookRefused as exc:
                outcome["error"] = str(exc)
            except httpx.HTTPError as exc:
                outcome["error"] = f"{type(exc).__name__}: {exc}"
            outcome["duration_ms"] = round((time.time() - started) * 1000, 1)
            METRICS.batch_webhooks.labels(result="delivered" if delivered else "failed").inc()
            await record(batch_id, outcome, delivered)
            if delivered:
                return
            if "error" in outcome and "COLORIZE_WEBHOOK_ALLOWED_HOSTS" in outcome["error"]:
                return  # refused by policy: retrying cannot help
            if attempt < self.max_attempts:
                await asyncio.sleep(backoff_s(attempt, self.backoff_base_s))
        log.warning(
            "webhook %s for %s not delivered after %d attempts", event, batch_id, self.max_attempts
        )

    async def close(self, wait_s: float = 5.0) -> None:
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=wait_s)
            for task in pending:
                task.cancel()
        if self._client is not None:
            await self._client.aclose()
