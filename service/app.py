"""The composition root of the HTTP process: settings, a queue, the router, into one FastAPI app.

``create_app(settings)`` builds everything (nothing happens at import). This module never imports
torch: in Redis mode the API process has no model; in memory mode the queue factory loads it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import metadata

from fastapi import Depends, FastAPI
from fastapi.responses import Response
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_fastapi_instrumentator import Instrumentator
from starlette.middleware.cors import CORSMiddleware

from service.core.api_keys import load_api_keys
from service.core.metrics import METRICS
from service.core.queue import BatchRunner, JobQueue
from service.router.auth import ApiKeyMiddleware, AuthPolicy
from service.router.handlers import install_error_handlers
from service.router.inputs import reject_unknown_query
from service.router.middleware import RequestIdMiddleware
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
    """memory: the in-process batcher (loads the model); redis: jobs go to GPU workers."""
    if settings.queue == "redis":
        from service.queues.redis.client import RedisJobQueue, RedisQueueConfig

        return RedisJobQueue(RedisQueueConfig.from_settings(settings), METRICS)
    return build_memory_queue(settings)


def build_memory_queue(settings: ServiceSettings) -> JobQueue:
    """The memory-mode queue: loads the weights, warms up each batch-size bucket, then serves.

    Missing weight files raise ``MissingWeightsError`` here, before the server starts.
    """
    from service.engine.batch import BatchEngine  # imports torch: memory mode only
    from service.engine.loading import check_weight_files
    from service.queues.memory import InProcessQueue

    check_weight_files(settings)

    async def load() -> BatchRunner:
        return await BatchEngine.start(settings)

    return InProcessQueue.from_settings(load, settings)


def create_app(
    settings: ServiceSettings,
    queue_factory: QueueFactory = default_queue_factory,
    *,
    on_fatal: Callable[[str], None] | None = None,
) -> FastAPI:
    """The FastAPI app. ``on_fatal`` is told when the queue can never become ready."""
    METRICS.register("api" if settings.queue == "redis" else "memory")
    state = ServiceState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        queue = queue_factory(settings)  # MissingWeightsError here refuses the start
        state.queue = queue
        await queue.start()
        watcher = asyncio.create_task(_watch_failure(queue, on_fatal))
        try:
            yield
        finally:
            state.begin_drain()
            watcher.cancel()
            await queue.drain()
            await queue.close()
            log.info("drained and closed")

    # FastAPIOffline: /docs (Swagger UI) and /redoc served from files installed with the package,
    # not from a CDN, so the pages work on an offline host.
    app = FastAPIOffline(
        title="InstColor Service",
        version=service_version(),
        description="Instance-aware colorization of grayscale photos (Su, Chu, Huang, CVPR 2020) "
        "with dynamic batching. Errors are application/problem+json.",
        lifespan=lifespan,
        dependencies=[Depends(reject_unknown_query)],
    )
    app.state.service = state
    # Generic HTTP metrics in a registry of this app's own (the instrumentator silently skips a
    # second app on a shared registry); /metrics serves it together with the colorize_* metrics.
    http_registry = CollectorRegistry(auto_describe=True)
    Instrumentator(
        should_group_status_codes=False,
        excluded_handlers=["/metrics"],
        registry=http_registry,
    ).instrument(app)

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus exposition: colorize_* metrics, process metrics and http_* metrics."""
        body = generate_latest(REGISTRY) + generate_latest(http_registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    policy = AuthPolicy(
        load_api_keys(settings.api_keys, settings.api_key_file),
        open_probes=settings.auth_open_probes,
        open_metrics=settings.auth_open_metrics,
    )
    app.add_middleware(ApiKeyMiddleware, policy=policy)
    app.add_middleware(RequestIdMiddleware)  # outside the key check: a 401 has its request ID
    origins = settings.cors_origin_list()
    if origins:  # outermost: preflights are answered before the key check
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "X-Request-ID", "Content-Type"],
            expose_headers=["X-Request-ID", "X-Instances", "X-Model-Version", "Server-Timing",
                            "Retry-After"],
        )  # fmt: skip
    install_error_handlers(app, state)
    install_routes(app, state)
    install_openapi(app)
    install_web_page(app)
    return app


def app_from_env() -> FastAPI:
    """For ``uvicorn --factory service.app:app_from_env``: settings from COLORIZE_* variables."""
    return create_app(ServiceSettings())


async def _watch_failure(queue: JobQueue, on_fatal: Callable[[str], None] | None) -> None:
    wait_loaded = getattr(queue, "wait_loaded", None)  # the memory queue loads in the background
    if wait_loaded is None:
        return
    await wait_loaded()
    reason = queue.failure()
    if reason and on_fatal is not None:
        on_fatal(reason)
