"""The composition root of the HTTP process: settings, a queue, the router, into one FastAPI app.

``create_app(settings)`` builds everything (nothing happens at import). This module never imports
torch: in Redis mode the API process has no model; in memory mode the queue factory loads it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from importlib import metadata

from fastapi import Depends, FastAPI
from fastapi_offline import FastAPIOffline

from service.batches.runner import BatchScheduler
from service.batches.store import SQLiteStore, Store
from service.batches.webhooks import WebhookSender
from service.core.metrics import METRICS
from service.core.queue import BatchRunner, JobQueue
from service.core.tracing import instrument_app
from service.router.auth import AuthPolicy
from service.router.batches import install_batches
from service.router.handlers import install_error_handlers
from service.router.inputs import reject_unknown_query
from service.router.metrics_route import install_metrics
from service.router.middleware import install_middleware
from service.router.openapi import install_openapi
from service.router.routes import install_routes
from service.router.state import ServiceState
from service.router.web import install_web_page
from service.settings import ServiceSettings

log = logging.getLogger(__name__)


QueueFactory = Callable[[ServiceSettings], JobQueue]


def service_version() -> str:
    try:
        return metadata.version("instcolor-service")
    except metadata.PackageNotFoundError:
        return "0+unknown"


# -- the app ------------------------------------------------------------------------------------


def default_queue_factory(settings: ServiceSettings) -> JobQueue:
    """memory: the in-process batcher (loads the models); redis: jobs go to GPU workers.

    One queue per model of ``settings.models`` (``ModelQueues``): batches never mix models.
    """
    from service.queues.models import ModelQueues

    if settings.queue == "redis":
        from service.queues.redis.client import RedisJobQueue, RedisQueueConfig

        return ModelQueues(
            {
                name: RedisJobQueue(RedisQueueConfig.from_settings(settings, name), METRICS)
                for name in settings.model_list()
            }
        )
    return build_memory_queue(settings)


def build_memory_queue(settings: ServiceSettings) -> JobQueue:
    """The memory-mode queue: loads each model's weights, warms up each batch-size bucket, then
    serves; one batcher per model, all models' predicts on one device thread.

    Missing weight files or an unknown model raise ``ModelSetupError`` here, before the server
    starts.
    """
    from concurrent.futures import ThreadPoolExecutor

    from service.engine.batch import BatchEngine  # imports torch: memory mode only
    from service.engine.loading import check_weight_files
    from service.queues.memory import InProcessQueue
    from service.queues.models import ModelQueues

    check_weight_files(settings)
    names = settings.model_list()
    shared = (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="device") if len(names) > 1 else None
    )

    def loader(name: str) -> Callable[[], Awaitable[BatchRunner]]:
        async def load() -> BatchRunner:
            return await BatchEngine.start(settings, model=name, device_thread=shared)

        return load

    queues: dict[str, JobQueue] = {
        name: InProcessQueue.from_settings(loader(name), settings, name) for name in names
    }

    def close_device_thread() -> None:
        if shared is not None:
            shared.shutdown(wait=True, cancel_futures=True)

    return ModelQueues(queues, on_close=close_device_thread)


def create_app(
    settings: ServiceSettings,
    queue_factory: QueueFactory = default_queue_factory,
    *,
    on_fatal: Callable[[str], None] | None = None,
) -> FastAPI:
    """The FastAPI app. ``on_fatal`` is told when the queue can never become ready."""
    METRICS.register("api" if settings.queue == "redis" else "memory")
    state = ServiceState(settings)
    # FastAPIOffline: /docs (Swagger UI) and /redoc served from files installed with the package,
    # not from a CDN, so the pages work on an offline host.
    app = FastAPIOffline(
        title="InstColor Service",
        version=service_version(),
        description="Instance-aware colorization of grayscale photos (Su, Chu, Huang, CVPR 2020) "
        "with dynamic batching. Errors are application/problem+json.",
        lifespan=_lifespan(state, queue_factory, on_fatal),
        dependencies=[Depends(reject_unknown_query)],
    )
    app.state.service = state
    install_metrics(app)
    policy = AuthPolicy(
        settings.api_key_table(),
        open_probes=settings.auth_open_probes,
        open_metrics=settings.auth_open_metrics,
    )
    install_middleware(app, settings, policy)
    install_error_handlers(app, state)
    install_routes(app, state)
    install_batches(app, state)
    install_openapi(app)
    install_web_page(app)
    instrument_app(app)  # a server span per request, when tracing is on (service.core.tracing)
    return app


def app_from_env() -> FastAPI:
    """For ``uvicorn --factory service.app:app_from_env``: settings from COLORIZE_* variables,
    tracing from the OTEL_* ones."""
    import os

    from service.core import tracing

    tracing.setup(
        tracing.TracingConfig.from_env(os.environ, default_service_name="instcolor-serve")
    )
    return create_app(ServiceSettings())


def _lifespan(
    state: ServiceState, queue_factory: QueueFactory, on_fatal: Callable[[str], None] | None
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Start the queue (``MissingWeightsError`` refuses the start); on shutdown drain it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        queue = queue_factory(state.settings)
        state.queue = queue
        await queue.start()
        watcher = asyncio.create_task(_watch_failure(queue, on_fatal))
        state.batches = await start_batches(state)
        try:
            yield
        finally:
            state.begin_drain()
            watcher.cancel()
            await state.batches.stop()  # unfinished items stay pending: resumed on the next start
            await queue.drain()
            await queue.close()
            log.info("drained and closed")

    return lifespan


async def start_batches(state: ServiceState) -> BatchScheduler:
    """The batch API's store and scheduler; open batches resume here. Redis mode: the state is
    in Redis, shared by every API replica (each runs a scheduler; a lease decides which one runs
    a batch); memory mode: an SQLite file under COLORIZE_STATE_DIR."""
    settings = state.settings
    store: Store
    if settings.queue == "redis":
        from service.batches.redis_store import RedisStore

        store = RedisStore(settings.redis_url, settings.redis_prefix)
    else:
        store = SQLiteStore(settings.state_dir / "batches.sqlite3")
    sender = WebhookSender(
        settings.webhook_secret,
        settings.webhook_hosts(),
        max_attempts=settings.webhook_max_attempts,
        backoff_base_s=settings.webhook_backoff_s,
        timeout_s=settings.webhook_timeout_s,
    )
    scheduler = BatchScheduler(store, settings, lambda: state.queue, sender)
    await scheduler.start()
    return scheduler


async def _watch_failure(queue: JobQueue, on_fatal: Callable[[str], None] | None) -> None:
    wait_loaded = getattr(queue, "wait_loaded", None)  # the memory queue loads in the background
    if wait_loaded is None:
        return
    await wait_loaded()
    reason = queue.failure()
    if reason and on_fatal is not None:
        on_fatal(reason)
