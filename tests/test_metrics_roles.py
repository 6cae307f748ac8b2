"""Each process role registers the metrics that can move there (names and labels unchanged)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from service.core.metrics import ROLE_METRICS, Metrics

REQUEST_METRICS = {
    "colorize_requests",
    "colorize_requests_by_key",
    "colorize_unauthorized_requests",
    "colorize_in_flight_requests",
    "colorize_refused_by_cost",
    "colorize_cache_requests",
}
ENGINE_METRICS = {
    "colorize_batch_size",
    "colorize_instances_per_image",
    "colorize_model_info",
    "colorize_gpu_memory_allocated_bytes",
    "colorize_dropped_requests",
}


def families(role: str) -> set[str]:
    registry = CollectorRegistry()
    Metrics(registry, role=role)  # type: ignore[arg-type]
    return {family.name for family in registry.collect()}


def test_a_worker_exports_no_request_metrics() -> None:
    worker = families("worker")
    assert worker.isdisjoint(REQUEST_METRICS)
    assert worker >= ENGINE_METRICS
    assert {"colorize_stage_duration_seconds", "colorize_queue_depth",
            "colorize_redis_pending_jobs", "colorize_redis_consumers"} <= worker  # fmt: skip


def test_an_api_replica_exports_no_engine_metrics() -> None:
    api = families("api")
    assert api.isdisjoint(ENGINE_METRICS)
    assert api >= REQUEST_METRICS
    # the API observes each request's total, the workers the stages: one family for both
    assert "colorize_stage_duration_seconds" in api


def test_the_memory_server_exports_every_metric() -> None:
    memory = families("memory")
    assert memory >= REQUEST_METRICS | ENGINE_METRICS
    every = {family.name for m in [Metrics(None)] for family in _all_families(m)}
    assert memory == every


def _all_families(metrics: Metrics) -> list[Metric]:
    return [family for value in vars(metrics).values() if hasattr(value, "collect")
            for family in value.collect()]  # fmt: skip


def test_labels_are_the_same_in_every_role() -> None:
    texts = {}
    for role in ROLE_METRICS:
        registry = CollectorRegistry()
        Metrics(registry, role=role)  # type: ignore[arg-type]
        texts[role] = generate_latest(registry).decode()
    line = 'colorize_stage_duration_seconds_count{stage="detect"} 0.0'
    assert all(line in text for text in texts.values())
    assert 'colorize_dropped_requests_total{reason="dead_letter"} 0.0' in texts["worker"]
    assert 'colorize_cache_requests_total{result="hit"} 0.0' in texts["api"]


def test_registering_a_second_role_adds_to_the_first() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, role="worker")
    metrics.register("api", registry)  # e.g. tests building both kinds of process
    names = {family.name for family in registry.collect()}
    assert names >= REQUEST_METRICS | ENGINE_METRICS
    with pytest.raises(ValueError, match="another registry"):
        metrics.register("api", CollectorRegistry())
