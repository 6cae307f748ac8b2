"""GET /metrics: the colorize_* metrics, process metrics and this app's generic http_* metrics."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_fastapi_instrumentator import Instrumentator


def install_metrics(app: FastAPI) -> None:
    """Instrument ``app`` and serve /metrics.

    The generic HTTP metrics go to a registry of this app's own (the instrumentator silently
    skips a second app on a shared registry); /metrics serves it with the default registry.
    """
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
