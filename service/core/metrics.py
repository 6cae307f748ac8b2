"""Every ``colorize_*`` Prometheus metric, defined once (the dashboard's contract).

Each process registers the metrics of its role, so that its ``/metrics`` shows only series that
can move there (names and labels are the same in every role):

- ``memory``: the memory-mode server (HTTP edge, queue and engine in one process): all of them;
- ``api``: a Redis-mode API replica: requests, admission, the result cache, the Redis stream;
  no engine metrics (batch size, instances, model info, GPU memory, drops: the workers have them);
- ``worker``: a Redis worker: the engine's metrics, drops and the Redis stream; no request
  counters (it never sees an HTTP request).

``METRICS`` is created unregistered (its objects work, unseen); the composition root registers
its role in prometheus-client's default registry (``METRICS.register(role)``: ``service.app``
for the server, ``service.commands.worker`` for a worker), beside the generic ``http_*`` metrics
of prometheus-fastapi-instrumentator. Import ``METRICS``; do not create metrics elsewhere.
This module must not import torch: the HTTP process in Redis mode has no model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Literal

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.registry import Collector

Role = Literal["memory", "api", "worker"]

STAGES: tuple[str, ...] = (
    "decode", "queue", "detect", "instance", "fusion", "merge", "encode", "total",
)  # fmt: skip
"""Stage labels of ``colorize_stage_duration_seconds`` (decode includes the model's preprocess)."""

OUTCOMES: tuple[str, ...] = (
    "ok", "client_error", "client_closed", "unauthorized", "overloaded", "unavailable", "timeout",
    "error",
)  # fmt: skip
DROP_REASONS: tuple[str, ...] = ("deadline", "disconnected", "shutdown", "dead_letter")

DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
INSTANCE_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 16, 32)


# Which metrics each role registers (attribute names of ``Metrics``).
_EDGE = ("requests", "requests_by_key", "unauthorized", "in_flight", "refused_by_cost")
_ENGINE = (
    "batch_size",
    "instances_per_image",
    "model_info",
    "gpu_memory",
    "dropped",
    "precision_fallbacks",
)
_REDIS = ("redis_pending", "redis_stream_length", "redis_consumers")
_SHARED = ("stage_duration", "model_stage_duration", "model_batch_size", "queue_depth")
_BATCH_API = (
    "batches_open",
    "batch_items",
    "batch_webhooks",
)  # the API observes the total, the engine the stages
ROLE_METRICS: dict[str, tuple[str, ...]] = {
    "memory": (*_SHARED, *_EDGE, *_ENGINE, *_REDIS, *_BATCH_API, "cache_requests"),
    "api": (*_SHARED, *_EDGE, *_REDIS, *_BATCH_API, "cache_requests"),
    "worker": (*_SHARED, *_ENGINE, *_REDIS),
}


class Metrics:
    """The service's metric objects; those of ``role`` registered on ``registry`` (None: none
    yet, see ``register``). Every attribute exists in every role."""

    def __init__(
        self, registry: CollectorRegistry | None = REGISTRY, role: Role = "memory"
    ) -> None:
        self._registered: set[str] = set()
        self._on: list[CollectorRegistry] = []  # (a list: vars() holds metric objects only)
        self._create()
        if registry is not None:
            self.register(role, registry)

    def register(self, role: Role, registry: CollectorRegistry = REGISTRY) -> None:
        """Show the metrics of ``role`` on ``registry`` (again for another role: the union;
        one registry per ``Metrics``)."""
        if self._on and registry is not self._on[0]:
            raise ValueError("these metrics are already registered on another registry")
        self._on[:] = [registry]
        for name in ROLE_METRICS[role]:
            if name not in self._registered:
                collector: Collector = getattr(self, name)
                registry.register(collector)
                self._registered.add(name)

    def _create(self) -> None:
        registry = None  # registered per role by register()
        self.stage_duration = Histogram(
            "colorize_stage_duration_seconds",
            "Time spent per request in each stage (detect/instance/fusion are per batch).",
            ["stage"], buckets=DURATION_BUCKETS, registry=registry,
        )  # fmt: skip
        self.model_stage_duration = Histogram(
            "colorize_model_stage_duration_seconds",
            "colorize_stage_duration_seconds per model (POST /colorize?model=...): the same "
            "observations, labelled by the model that ran them.",
            ["model", "stage"], buckets=DURATION_BUCKETS, registry=registry,
        )  # fmt: skip
        self.model_batch_size = Histogram(
            "colorize_model_batch_size", "Requests per batch handed to each model's engine.",
            ["model"], buckets=BATCH_BUCKETS, registry=registry,
        )  # fmt: skip
        self.batch_size = Histogram(
            "colorize_batch_size", "Requests per batch handed to the engine.",
            buckets=BATCH_BUCKETS, registry=registry,
        )  # fmt: skip
        self.instances_per_image = Histogram(
            "colorize_instances_per_image", "Instance boxes used per image.",
            buckets=INSTANCE_BUCKETS, registry=registry,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "colorize_queue_depth", "Requests waiting for a batch, per model (each model has "
            "its own queue).", ["model"], registry=registry,
        )  # fmt: skip
        self.in_flight = Gauge(
            "colorize_in_flight_requests",
            "Colorize requests admitted and not yet answered.",
            registry=registry,
        )
        self.requests = Counter(
            "colorize_requests",
            "Colorize requests by outcome and HTTP status.",
            ["outcome", "status"],
            registry=registry,
        )
        self.requests_by_key = Counter(
            "colorize_requests_by_key",
            "Colorize requests by API key name (never the key) and outcome; 'anonymous' when "
            "keys are off.",
            ["key", "outcome"],
            registry=registry,
        )
        self.unauthorized = Counter(
            "colorize_unauthorized_requests",
            "Requests refused with 401 (no key or an unknown key), any route.",
            registry=registry,
        )
        self.refused_by_cost = Counter(
            "colorize_refused_by_cost",
            "Requests refused at admission because their estimated finish is past their deadline.",
            registry=registry,
        )
        self.dropped = Counter(
            "colorize_dropped_requests",
            "Admitted requests dropped before inference, by reason.",
            ["reason"],
            registry=registry,
        )
        self.precision_fallbacks = Counter(
            "colorize_precision_fallbacks",
            "Images whose fp16/bf16 ab had a non-finite value (an overflow) and were re-run in "
            "fp32 within their batch.",
            registry=registry,
        )
        self.model_info = Gauge(
            "colorize_model_info",
            "The loaded model (value 1).",
            ["model_version", "device", "precision", "detector", "model"],
            registry=registry,
        )
        self._model_info_labels: dict[str, tuple[str, ...]] = {}
        self.gpu_memory = Gauge(
            "colorize_gpu_memory_allocated_bytes",
            "CUDA memory allocated by the engine (set only where CUDA is present).",
            registry=registry,
        )
        self.cache_requests = Counter(
            "colorize_cache_requests", "Result cache look-ups (Redis mode).", ["result"],
            registry=registry,
        )  # fmt: skip
        self.redis_pending = Gauge(
            "colorize_redis_pending_jobs", "Jobs delivered to workers, not yet acknowledged, "
            "per model's stream.", ["model"], registry=registry,
        )  # fmt: skip
        self.redis_stream_length = Gauge(
            "colorize_redis_stream_length", "Entries in the Redis job stream of each model.",
            ["model"], registry=registry,
        )  # fmt: skip
        self.redis_consumers = Gauge(
            "colorize_redis_consumers", "Workers in the consumer group of each model's stream.",
            ["model"], registry=registry,
        )  # fmt: skip
        self.batches_open = Gauge(
            "colorize_batches_open", "Batches not yet ended (validating, in progress, "
            "finalizing, cancelling); fleet-wide in Redis mode (every replica reports the "
            "shared store's count): aggregate with max, not sum.", registry=registry,
        )  # fmt: skip
        self.batch_items = Counter(
            "colorize_batch_items", "Batch items finished, by result (completed, failed); "
            "its rate is the batch throughput.", ["result"], registry=registry,
        )  # fmt: skip
        self.batch_webhooks = Counter(
            "colorize_batch_webhook_deliveries", "Webhook delivery attempts, by result "
            "(delivered, failed).", ["result"], registry=registry,
        )  # fmt: skip
        for result in ("completed", "failed"):
            self.batch_items.labels(result=result)
        for result in ("delivered", "failed"):
            self.batch_webhooks.labels(result=result)
        # Label sets exist from the start, so every series shows in /metrics before traffic.
        for stage in STAGES:
            self.stage_duration.labels(stage=stage)
        for reason in DROP_REASONS:
            self.dropped.labels(reason=reason)
        for result in ("hit", "miss"):
            self.cache_requests.labels(result=result)

    def observe_stages(self, timings: Mapping[str, float], model: str | None = None) -> None:
        """Record the stages of ``STAGES`` found in ``timings`` (seconds), also per ``model``."""
        for stage, seconds in timings.items():
            if stage in STAGES:
                self.stage_duration.labels(stage=stage).observe(max(0.0, seconds))
                if model is not None:
                    self.model_stage_duration.labels(model=model, stage=stage).observe(
                        max(0.0, seconds)
                    )

    def set_model_info(
        self, model_version: str, device: str, precision: str, detector: str, model: str = ""
    ) -> None:
        """One series per loaded model (a model loaded again replaces its own series)."""
        previous = self._model_info_labels.pop(model, None)
        if previous is not None:
            with contextlib.suppress(KeyError):
                self.model_info.remove(*previous)
        labels = (model_version, device, precision, detector, model)
        self.model_info.labels(*labels).set(1)
        self._model_info_labels[model] = labels


def outcome_for(status: int, kind: str | None = None) -> str:
    """The ``outcome`` label of ``colorize_requests_total`` for an HTTP status (and error kind).

    503 is "overloaded" only for a full queue or a refused cost; Redis down, no live worker,
    loading or draining are "unavailable".
    """
    if status < 400:
        return "ok"
    if status == 499:
        return "client_closed"
    if status == 401:
        return "unauthorized"
    if status == 429 or (status == 503 and kind in (None, "overloaded")):
        return "overloaded"
    if status == 503:
        return "unavailable"
    if status == 504:
        return "timeout"
    if status < 500:
        return "client_error"
    return "error"


METRICS = Metrics(registry=None)  # the process registers its role: METRICS.register(role)
