"""The uvicorn server that ``serve`` starts: connection-level limits (docs/security.md) and a
first SIGTERM/SIGINT that also starts the app's drain.

uvicorn (with h11) already has an idle keep-alive timeout and a cap on buffered header bytes
(``h11_max_incomplete_event_size``), but it answers an oversized header with 400, has no deadline
for a client to finish sending its headers (a slowloris client, or a socket that never sends a
byte, is held forever), and its ``limit_concurrency`` still accepts and keeps every socket. This
protocol, a small subclass of uvicorn's own h11 protocol, adds exactly those three things:

- oversized request line plus headers: 431 and close (h11 flags this case with status hint 431);
- headers not complete within ``header_timeout_s`` of the connection's opening (or of the end of
  the previous response): 408 if the client had started a request, then close;
- more than ``max_connections`` open connections: the new one gets 503 and is closed at once;
- a request body not complete within ``body_timeout_s`` of the end of its headers (a slow
  upload): 408 and close, like the header deadline; the app's handler sees the request end
  (``BODY_TIMED_OUT`` in its scope says why) and drops what it had buffered.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import dataclass
from types import FrameType
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.router.inputs import BODY_TIMED_OUT
from service.router.state import ServiceState

log = logging.getLogger(__name__)

LINGER_S = 2.0
"""After a refusal (431, 408) the rest of what the client sends is read and dropped for this long
before the socket closes. Closing with unread data makes the kernel answer with a reset, which
can destroy the refusal before the client has read it."""


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int
    header_timeout_s: float
    max_connections: int
    body_timeout_s: float = 60.0


def _plain_response(status: int, reason: str, text: str) -> bytes:
    body = text.encode("ascii")
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode("ascii") + body


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline, a 431 answer and a connection cap."""

    limits: ConnectionLimits  # set by ``protocol_with_limits``

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._head = bytearray()  # bytes of the request line and headers being received
        self._lingering = False  # a refusal was sent: drop what still arrives, then close

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            log.warning(
                "refused a connection from %s: %d connections are open (max_connections)",
                self.client, len(self.connections) - 1,
            )  # fmt: skip
            transport.write(
                _plain_response(503, "Service Unavailable", "too many open connections\n")
            )
            transport.close()
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        self._disarm_body_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        if self.conn.their_state is h11.IDLE:  # h11 checks its limit only on an incomplete head
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if (end + 4 if end >= 0 else len(self._head)) > self.limits.max_header_bytes:
                self._refuse_headers()
                return
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the headers are in: the app has the request
            self._disarm_header_timer()
        if self.conn.their_state is h11.SEND_BODY:  # the body is on its way: it has a deadline
            if self._body_timer is None and not self._lingering:
                self._body_timer = self.loop.call_later(
                    self.limits.body_timeout_s, self._body_timeout
                )
        else:
            self._disarm_body_timer()

    def on_response_complete(self) -> None:
        self._disarm_body_timer()
        super().on_response_complete()
        if not self.transport.is_closing():
            self._head.clear()
            self._arm_header_timer()

    def send_400_response(self, msg: str) -> None:
        # Called by uvicorn while it handles h11's RemoteProtocolError; h11 gives the status.
        error = sys.exc_info()[1]
        if getattr(error, "error_status_hint", 400) == 431:
            self._refuse_headers()
            return
        super().send_400_response(msg)

    def _refuse_headers(self) -> None:
        log.warning(
            "refused a request from %s: headers over %d bytes (max_header_bytes)",
            self.client, self.limits.max_header_bytes,
        )  # fmt: skip
        self._disarm_header_timer()
        self._head.clear()
        text = f"request line and headers must fit in {self.limits.max_header_bytes} bytes\n"
        self._refuse(_plain_response(431, "Request Header Fields Too Large", text))

    def _refuse(self, response: bytes) -> None:
        """Send ``response``, end our side, and close after the client's remaining bytes."""
        self._disarm_header_timer()
        self._lingering = True
        self.transport.write(response)
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the client reads the answer, then end of stream
        self.loop.call_later(LINGER_S, self.transport.close)

    def eof_received(self) -> None:
        if self._lingering:  # the client has sent everything and read our answer
            self.transport.close()
            return
        super().eof_received()

    def _disarm_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_timeout(self) -> None:
        self._body_timer = None
        cycle = self.cycle
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        log.warning(
            "closed a connection from %s: request body not complete within %.1f s "
            "(body_timeout_s)",
            self.client, self.limits.body_timeout_s,
        )  # fmt: skip
        if cycle is not None:
            cycle.scope[BODY_TIMED_OUT] = True  # type: ignore[literal-required]
            started = cycle.response_started
            # The handler's next receive() ends the request; its own answer is not sent.
            cycle.disconnected = True
            cycle.body = bytearray()  # release what was buffered for the app
            cycle.message_event.set()
            if started:  # the app already answered: nothing more can be said on this socket
                self.transport.close()
                return
        self.flow.resume_reading()  # keep reading (and dropping) while lingering
        self._refuse(_plain_response(408, "Request Timeout", "request body too slow\n"))

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(
            self.limits.header_timeout_s, self._header_timeout
        )

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self._head:
            log.warning(
                "closed a connection from %s: headers not complete within %.1f s "
                "(header_timeout_s)",
                self.client, self.limits.header_timeout_s,
            )  # fmt: skip
            self._refuse(_plain_response(408, "Request Timeout", "headers too slow\n"))
            return
        self.transport.close()


def protocol_with_limits(limits: ConnectionLimits) -> type[LimitedH11Protocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` bound to ``limits``."""
    return type("LimitedH11Protocol", (LimitedH11Protocol,), {"limits": limits})


def uvicorn_limit_options(limits: ConnectionLimits, keep_alive_timeout_s: float) -> dict[str, Any]:
    """The ``uvicorn.Config`` options that enforce ``limits`` (with this module's protocol)."""
    return {
        "http": protocol_with_limits(limits),
        "h11_max_incomplete_event_size": limits.max_header_bytes,
        "timeout_keep_alive": keep_alive_timeout_s,
        "backlog": min(2048, limits.max_connections),
    }


__all__ = [
    "BODY_TIMED_OUT",
    "ConnectionLimits",
    "LimitedH11Protocol",
    "protocol_with_limits",
    "uvicorn_limit_options",
]


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose first SIGTERM/SIGINT also starts the app's drain."""

    def __init__(self, config: uvicorn.Config, state: ServiceState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.state.begin_drain()
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal once it has shut down; a drained exit is a clean 0.
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()
