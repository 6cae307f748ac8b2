"""``python -m service worker``: a GPU worker of Redis mode (one per GPU).

It loads the model like ``serve`` does (same flags), then consumes the Redis job stream that the
API replicas (``COLORIZE_QUEUE=redis python -m service serve``) fill. SIGTERM finishes the batches
already read, then exits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
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

SERVICE_NAME = "instcolor-worker"  # the spans' service.name unless OTEL_SERVICE_NAME says otherwise

HELP_TEXT = """\
Run a GPU worker of Redis mode (one per GPU). It loads the models like `serve` does (same flags,
--models a,b; default instcolor), then consumes each model's Redis job stream that the API
replicas (COLORIZE_QUEUE=redis python -m service serve) fill: it only ever receives jobs of the
models it loaded. SIGTERM finishes the batches already read, then exits.
"""


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="run a GPU worker for Redis mode (COLORIZE_QUEUE=redis)",
        description=HELP_TEXT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_models_argument(parser)
    add_model_arguments(parser)
    group = parser.add_argument_group("redis worker (each overrides its COLORIZE_* variable)")
    group.add_argument("--redis-url", help="[COLORIZE_REDIS_URL, default redis://127.0.0.1:6379/0]")
    group.add_argument("--metrics-port", type=int, dest="worker_metrics_port",
                       help="port of this worker's /metrics, 0: none "
                       "[COLORIZE_WORKER_METRICS_PORT, default 9100]")  # fmt: skip
    group.add_argument("--consumer", help="consumer name in the group "
                       "(default: host-pid-random, unique per process)")  # fmt: skip
    add_tracing_arguments(parser, SERVICE_NAME)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from service.engine.loading import ModelSetupError

    settings = settings_from_args(args, ("redis_url", "worker_metrics_port"), queue="redis")
    if settings is None:
        return 2
    from service.core import tracing

    try:
        traced = tracing.setup(tracing_config(args, SERVICE_NAME))
    except tracing.TracingConfigError as exc:
        sys.stderr.write(f"error: refusing to start: {exc}\n")
        return 2
    try:
        return asyncio.run(run_worker(settings, consumer=args.consumer))
    except ModelSetupError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    finally:
        if traced:
            tracing.shutdown()  # export the spans still buffered


async def run_worker(settings: ServiceSettings, *, consumer: str | None = None) -> int:
    """The worker process's composition: load the model, warm up, serve /metrics (the worker
    role's metrics only), consume until SIGTERM/SIGINT; the exit status."""
    from prometheus_client import start_http_server

    from service.core.metrics import METRICS
    from service.engine.batch import BatchEngine  # imports torch: only the worker process needs it
    from service.engine.loading import check_weight_files
    from service.queues.redis.protocol import connect
    from service.queues.redis.worker import RedisWorker, WorkerConfig, consumer_name

    METRICS.register("worker")
    check_weight_files(settings)  # every model's files, before any loads
    names = settings.model_list()
    shared = ThreadPoolExecutor(1, thread_name_prefix="device") if len(names) > 1 else None
    engines = []
    try:
        for name in names:  # one at a time: loading and warm-up share the device
            engines.append(
                await BatchEngine.start(settings, METRICS, model=name, device_thread=shared)
            )
        if settings.worker_metrics_port:
            start_http_server(settings.worker_metrics_port)
            log.info("worker metrics on :%d/metrics", settings.worker_metrics_port)
        configs = [WorkerConfig.from_settings(settings, name) for name in names]
        read_timeout_s = max(configs[0].poll_ms, configs[0].max_batch_delay_ms) / 1000 + 10.0
        client = connect(settings.redis_url, socket_timeout_s=read_timeout_s)
        cache_client = (
            connect(settings.cache_redis_url, socket_timeout_s=10.0)
            if settings.cache_redis_url
            else None
        )
        # one consumer per model's stream; the same consumer name in each stream's group
        consumer = consumer or consumer_name()
        workers = [
            RedisWorker(
                client,
                engine,
                config,
                model_info=engine.describe(),
                metrics=METRICS,
                cache_client=cache_client,
                consumer=consumer,
            )
            for engine, config in zip(engines, configs, strict=True)
        ]
        loop = asyncio.get_running_loop()

        def stop_all() -> None:
            for worker in workers:
                worker.stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_all)
        try:
            await asyncio.gather(*(worker.run() for worker in workers))
        finally:
            if cache_client is not None:
                await cache_client.aclose()
            await client.aclose()
    finally:
        for engine in engines:
            engine.close()
        if shared is not None:
            shared.shutdown(wait=True, cancel_futures=True)
    return 0
