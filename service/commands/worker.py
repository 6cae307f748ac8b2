"""``python -m service worker``: a GPU worker of Redis mode (one per GPU).

It loads the model like ``serve`` does (same flags), then consumes the Redis job stream that the
API replicas (``COLORIZE_QUEUE=redis python -m service serve``) fill. SIGTERM finishes the batches
already read, then exits.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from service.commands.model_flags import add_model_arguments, settings_from_args

HELP_TEXT = """\
Run a GPU worker of Redis mode (one per GPU). It loads the model like `serve` does (same flags),
then consumes the Redis job stream that the API replicas (COLORIZE_QUEUE=redis python -m service
serve) fill. SIGTERM finishes the batches already read, then exits.
"""


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="run a GPU worker for Redis mode (COLORIZE_QUEUE=redis)",
        description=HELP_TEXT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    group = parser.add_argument_group("redis worker (each overrides its COLORIZE_* variable)")
    group.add_argument("--redis-url", help="[COLORIZE_REDIS_URL, default redis://127.0.0.1:6379/0]")
    group.add_argument("--metrics-port", type=int, dest="worker_metrics_port",
                       help="port of this worker's /metrics, 0: none "
                       "[COLORIZE_WORKER_METRICS_PORT, default 9100]")  # fmt: skip
    group.add_argument("--consumer", help="consumer name in the group "
                       "(default: host-pid-random, unique per process)")  # fmt: skip
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from service.engine.loading import MissingWeightsError
    from service.queues.redis.worker import run_worker

    settings = settings_from_args(args, ("redis_url", "worker_metrics_port"), queue="redis")
    if settings is None:
        return 2
    try:
        return asyncio.run(run_worker(settings, consumer=args.consumer))
    except MissingWeightsError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
