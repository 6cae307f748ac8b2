"""Redis mode at the edge: worker liveness by heartbeat (not ready and 503 ``no-workers`` at once
with none alive), admission by estimated cost with a Retry-After from the backlog, and the
outcome of a Redis-side 503. Real Redis, unique key prefixes."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import image_corpus as corpus
import pytest
import redis.asyncio as aioredis
from redis_fixtures import redis_prefix, redis_url
from service_helpers import running_app, sample, service_settings
from test_redis_queue import Harness, make_job, png

from models.pipeline import Colorizer
from service.core.errors import NoWorkersError, OverloadedError
from service.core.jobs import JobResult
from service.queues.redis.client import RedisJobQueue
from service.queues.redis.protocol import BEAT_SCRIPT, RedisLayout

__all__ = ["redis_prefix", "redis_url"]  # fixtures


@pytest.fixture
async def harness(
    redis_url: str, redis_prefix: str, tiny_colorizer: Colorizer
) -> AsyncIterator[Harness]:
    h = Harness(redis_url, redis_prefix, tiny_colorizer)
    yield h
    await h.close()


def live_queue(harness: Harness, **config: Any) -> RedisJobQueue:
    """A queue that requires a live worker (the default outside the harness)."""
    return harness.queue(require_live_worker=True, worker_alive_s=1.0, **config)


async def fake_heartbeat(url: str, layout: RedisLayout, name: str, cost: dict[str, float]) -> None:
    """What a worker's heartbeat writes (the same script), for a worker that is not running."""
    client = aioredis.Redis.from_url(url)
    try:
        beat = client.register_script(BEAT_SCRIPT)
        await beat(keys=[layout.workers, layout.worker_costs], args=[name, json.dumps(cost)])
    finally:
        await client.aclose()


async def test_no_live_worker_is_not_ready_and_fails_fast(harness: Harness) -> None:
    queue = live_queue(harness)
    await queue.start()
    assert not await queue.ready()
    start = time.monotonic()
    with pytest.raises(NoWorkersError) as info:
        await queue.submit(make_job(png((16, 16))))
    assert time.monotonic() - start < 0.5  # not the 30 s deadline
    assert info.value.status == 503
    assert info.value.kind == "no-workers"
    assert info.value.retry_after is not None and info.value.retry_after >= 1.0
    worker = harness.worker()
    deadline = time.monotonic() + 10
    while not await queue.ready():
        assert time.monotonic() < deadline, "the worker's heartbeat never made the queue ready"
        await asyncio.sleep(0.05)
    assert isinstance(await queue.submit(make_job(png((16, 16)))), JobResult)
    assert queue.describe()["redis"]["live_workers"] == 1
    await harness.stop_worker(worker)  # a graceful stop leaves the live set at once
    assert not await queue.ready()


async def test_a_silent_worker_counts_as_gone(harness: Harness) -> None:
    queue = live_queue(harness)
    await queue.start()
    await fake_heartbeat(harness.url, harness.layout, "ghost", {})
    assert await queue.ready()
    await asyncio.sleep(1.3)  # worker_alive_s = 1.0 without a heartbeat
    assert not await queue.ready()
    with pytest.raises(NoWorkersError):
        await queue.submit(make_job(png((16, 16))))


async def test_over_cost_refused_at_once_with_retry_after_from_the_backlog(
    harness: Harness,
) -> None:
    queue = live_queue(harness, queue_size=5)
    await queue.start()
    cost = {"seconds_per_megapixel": 1.0, "seconds_per_pass": 0.0, "seconds_per_job": 2.0,
            "instances_per_image": 0.0, "batches_seen": 3.0}  # fmt: skip
    await fake_heartbeat(harness.url, harness.layout, "busy", cost)
    for _ in range(4):  # four jobs waiting ahead: 4 x 2 s = 8 s for the one live worker
        await harness.client.xadd(harness.layout.stream, {"token": "x", "meta": "{}"})
    deadline = time.monotonic() + 5
    while queue.describe()["redis"]["stream_length"] < 4:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    fits = make_job(png((16, 16)), timeout=20.0)
    job = replace(make_job(png((1000, 1000)), timeout=5.0), pixels=1_000_000)
    start = time.monotonic()
    with pytest.raises(OverloadedError) as info:
        await queue.submit(job)  # 8 s ahead + 1 s own > 5 s
    assert time.monotonic() - start < 0.5
    assert info.value.retry_after is not None
    assert 4.0 <= info.value.retry_after < 4.5  # 8 + 1 - (5 less the time spent)
    assert "would not finish before its deadline" in info.value.detail
    await harness.client.xadd(harness.layout.stream, {"token": "y", "meta": "{}"})
    while queue.describe()["redis"]["stream_length"] < 5:
        await asyncio.sleep(0.05)
    with pytest.raises(OverloadedError) as full:  # fits its 20 s deadline, but the queue is full
        await queue.submit(fits)
    assert "queue is full" in full.value.detail
    assert full.value.retry_after == pytest.approx(10.0)  # the backlog, not a fixed 1 s


async def test_app_in_redis_mode_without_workers(
    tiny_checkpoints: Path, redis_url: str, redis_prefix: str
) -> None:
    settings = service_settings(
        tiny_checkpoints, queue="redis", redis_url=redis_url, redis_prefix=redis_prefix,
        worker_alive_s=2.0,
    )  # fmt: skip
    async with running_app(settings, ready=False) as (_, client):
        readyz = await client.get("/readyz")
        assert readyz.status_code == 503
        before = sample("colorize_requests_total", outcome="unavailable", status="503")
        start = time.monotonic()
        response = await client.post(
            "/colorize", content=corpus.png(), headers={"content-type": "image/png"}
        )
        assert time.monotonic() - start < 1.0
        assert response.status_code == 503
        assert response.json()["type"].endswith("/no-workers")
        assert int(response.headers["retry-after"]) >= 2
        assert sample("colorize_requests_total", outcome="unavailable", status="503") == before + 1
