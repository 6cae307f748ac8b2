"""``python -m service serve``: the HTTP service (uvicorn), with graceful drain on SIGTERM.

Equivalent uvicorn command (settings from COLORIZE_* variables only)::

    uvicorn --factory service.app:app_from_env --host 0.0.0.0 --port 8000 \\
        --timeout-graceful-shutdown 35

(plain uvicorn lacks the connection limits of ``service.http_limits``: 431 for oversized headers,
the header deadline and the connection cap; ``serve`` has them).

On SIGTERM (or Ctrl-C) readiness turns 503 and /colorize refuses new work at once, the listening
socket closes, requests in flight (queued or on the device) finish, then the queue drains and the
process exits 0. A second Ctrl-C forces the exit.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from service.commands.model_flags import add_model_arguments, settings_from_args
from service.http_limits import ConnectionLimits, uvicorn_limit_options

if TYPE_CHECKING:
    from service.app import ServiceState

log = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the HTTP service",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    group = parser.add_argument_group("server (each overrides its COLORIZE_* variable)")
    group.add_argument("--host", help="address to bind [COLORIZE_HOST, default 0.0.0.0]")
    group.add_argument("--port", type=int, help="TCP port [COLORIZE_PORT, default 8000]")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from service.app import create_app

    settings = settings_from_args(args, ("host", "port"))
    if settings is None:
        return 2
    if settings.queue == "memory":
        # imports torch (models.pipeline): only the memory mode, which loads the model, needs it
        from service.engine_factory import MissingWeightsError, check_weight_files

        try:
            check_weight_files(settings)
        except MissingWeightsError as exc:
            sys.stderr.write(f"error: refusing to start: {exc}\n")
            return 2

    holder: dict[str, Any] = {}

    def on_fatal(reason: str) -> None:
        sys.stderr.write(f"error: {reason}\n")
        holder["exit_code"] = 1
        server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal)
    limits = ConnectionLimits(
        max_header_bytes=settings.max_header_bytes,
        header_timeout_s=settings.header_timeout_s,
        max_connections=settings.max_connections,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        lifespan="on",
        timeout_graceful_shutdown=math.ceil(settings.request_timeout_s) + 5,
        log_config=None,  # the root logger set up by the CLI
        # header size (431), header deadline (408), idle timeout, connection cap: docs/security.md
        **uvicorn_limit_options(limits, settings.keep_alive_timeout_s),
    )
    server = DrainingServer(config, app.state.service)
    server.run()
    if not server.started and "exit_code" not in holder:
        return 1  # start-up failed (the reason was logged)
    return int(holder.get("exit_code", 0))


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
