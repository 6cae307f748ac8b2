"""``python -m service serve``: the HTTP service (uvicorn), with graceful drain on SIGTERM.

What it does is told by ``HELP_TEXT`` (``serve --help``). uvicorn and the app are imported only
when the command runs, so other commands work without them.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import TYPE_CHECKING, Any

from service.commands.model_flags import (
    add_model_arguments,
    add_models_argument,
    add_tracing_arguments,
    settings_from_args,
    tracing_config,
)

if TYPE_CHECKING:
    from service.settings import ServiceSettings

log = logging.getLogger(__name__)

SERVICE_NAME = "instcolor-serve"  # the spans' service.name unless OTEL_SERVICE_NAME says otherwise

HELP_TEXT = """\
Run the HTTP service: the API, the batcher and (COLORIZE_QUEUE=memory, the default) the model in
this process. --models a,b loads several models (default: instcolor only), each batched on its
own; POST /colorize?model=NAME chooses one and GET /models lists them. The socket opens at once; the weights load and one warm-up batch runs per batch-size
bucket, then GET /readyz answers 200 (until then /colorize answers 503 with Retry-After).

Equivalent uvicorn command (settings from COLORIZE_* variables only):

  uvicorn --factory service.app:app_from_env --host 0.0.0.0 --port 8000 \\
      --timeout-graceful-shutdown 35

(plain uvicorn lacks the connection limits that serve adds: 431 for oversized headers, the
header deadline and the connection cap.)

On SIGTERM (or Ctrl-C) readiness turns 503 and /colorize refuses new work at once, the listening
socket closes, requests in flight finish, then the queue drains and the process exits 0. A second
Ctrl-C forces the exit.
"""


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the HTTP service",
        description=HELP_TEXT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_models_argument(parser)
    add_model_arguments(parser)
    group = parser.add_argument_group("server (each overrides its COLORIZE_* variable)")
    group.add_argument("--host", help="address to bind [COLORIZE_HOST, default 0.0.0.0]")
    group.add_argument("--port", type=int, help="TCP port [COLORIZE_PORT, default 8000]")
    add_tracing_arguments(parser, SERVICE_NAME)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, ("host", "port"))
    if settings is None:
        return 2
    if settings.queue == "memory":
        # imports torch (models.pipeline): only the memory mode, which loads the model, needs it
        from service.engine.loading import ModelSetupError, check_weight_files

        try:
            check_weight_files(settings)
        except ModelSetupError as exc:
            sys.stderr.write(f"error: refusing to start: {exc}\n")
            return 2

    from service.core import tracing

    try:
        traced = tracing.setup(tracing_config(args, SERVICE_NAME))
    except tracing.TracingConfigError as exc:
        sys.stderr.write(f"error: refusing to start: {exc}\n")
        return 2
    try:
        return _serve(settings)
    finally:
        if traced:
            tracing.shutdown()  # export the spans still buffered


def _serve(settings: ServiceSettings) -> int:
    import uvicorn  # the server's dependencies are imported only when it runs

    from service.app import create_app
    from service.router.server import ConnectionLimits, DrainingServer, uvicorn_limit_options

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
        body_timeout_s=settings.body_timeout_s,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        lifespan="on",
        timeout_graceful_shutdown=math.ceil(settings.request_timeout_s) + 5,
        log_config=None,  # the root logger set up by the CLI
        # header size (431), header and body deadlines (408), idle timeout, connection cap:
        # docs/security.md
        **uvicorn_limit_options(limits, settings.keep_alive_timeout_s),
    )
    server = DrainingServer(config, app.state.service)
    server.run()
    if not server.started and "exit_code" not in holder:
        return 1  # start-up failed (the reason was logged)
    return int(holder.get("exit_code", 0))
