"""The backlog KEDA scales the GPU workers on (deploy/kubernetes/keda/scaledobject.yaml) is exact.

KEDA's ``redis-streams`` scaler with ``lagCount`` reads the consumer group's ``lag`` from XINFO
GROUPS (Redis 7+). Redis reports it as nil (unknown) once an entry at or after the group's
last-delivered id was deleted while an older entry remains, and KEDA's client reads nil as 0: the
workers would not wake, or would scale in under load. These tests run the real ``RedisJobQueue``
and ``RedisWorker`` against a real Redis, with an engine that returns a fixed ``JobResult`` (the
model plays no part in the stream's bookkeeping) and holds each batch until the test lets it go,
and check the lag at each step: admissions, a withdrawal, reads, a worker crash, a reclaim.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from redis.exceptions import ResponseError
from redis_fixtures import redis_prefix, redis_url

from service.core.errors import ServiceError
from service.core.jobs import Job, JobOptions, JobResult
from service.core.metrics import Metrics
from service.queues.redis.client import RedisJobQueue, RedisQueueConfig
from service.queues.redis.protocol import RedisLayout, as_text, connect
from service.queues.redis.worker import RedisWorker, WorkerConfig

__all__ = ["redis_prefix", "redis_url"]  # fixtures

pytestmark = [pytest.mark.redis, pytest.mark.timeout(90)]


def make_job(timeout: float = 60.0) -> Job:
    now = time.time()
    return Job(
        request_id=uuid.uuid4().hex, image=b"not decoded by the fake engine",
        options=JobOptions(), deadline=now + timeout, enqueued_at=now,
    )  # fmt: skip


class GatedEngine:
    """Answers every job with a fixed result, each batch only once the test opens its gate."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []  # request ids, per batch
        self.gates: list[asyncio.Event] = []
        self.open = False

    async def run_batch(self, jobs: Sequence[Job]) -> list[JobResult | ServiceError]:
        self.batches.append([job.request_id for job in jobs])
        gate = asyncio.Event()
        self.gates.append(gate)
        if not self.open:
            await gate.wait()
        return [
            JobResult(body=b"ok", media_type="image/png", boxes=[], scores=[], timings={},
                      model_version="fake")
            for _ in jobs
        ]  # fmt: skip

    def release(self, index: int) -> None:
        self.gates[index].set()

    def open_all(self) -> None:
        self.open = True
        for gate in self.gates:
            gate.set()


async def keda_lag(client: aioredis.Redis, layout: RedisLayout) -> int:
    """The metric as KEDA's redis-streams scaler computes it for ``lagCount`` (KEDA v2.20,
    pkg/scalers/redis_streams_scaler.go): no stream -> 0; the group's XINFO GROUPS ``lag``, nil
    read as 0 (go-redis); no such group -> XLEN."""
    try:
        groups = await client.xinfo_groups(layout.stream)
    except ResponseError as exc:
        if "no such key" in str(exc):
            return 0
        raise
    for group in groups:
        if as_text(group["name"]) == layout.group:
            return int(group["lag"] or 0)
    return int(await client.xlen(layout.stream))


async def group_info(client: aioredis.Redis, layout: RedisLayout) -> dict[str, Any]:
    groups = await client.xinfo_groups(layout.stream)
    return next(g for g in groups if as_text(g["name"]) == layout.group)


async def undelivered(client: aioredis.Redis, layout: RedisLayout) -> int:
    """Entries after the group's last-delivered id, counted directly (XRANGE)."""
    last = as_text((await group_info(client, layout))["last-delivered-id"])
    return len(await client.xrange(layout.stream, f"({last}", "+"))


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


class Stack:
    """One API-side queue, workers on demand, and a sampler that records every nil lag."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.layout = RedisLayout(prefix, "workers")
        self.client = connect(url)
        self.queue = RedisJobQueue(
            RedisQueueConfig(redis_url=url, layout=self.layout, stats_interval_s=0.1,
                             cache_enabled=False, require_live_worker=False),
            Metrics(CollectorRegistry()),
        )  # fmt: skip
        self.submits: list[asyncio.Task[JobResult]] = []
        self.jobs: list[Job] = []
        self.workers: list[tuple[RedisWorker, asyncio.Task[None], aioredis.Redis]] = []
        self.nil_lags = 0
        self.samples = 0
        self._sampler: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.queue.start()
        self._sampler = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            with contextlib.suppress(ResponseError, StopIteration):
                if (await group_info(self.client, self.layout))["lag"] is None:
                    self.nil_lags += 1
                self.samples += 1
            await asyncio.sleep(0.005)

    async def admit(self, count: int) -> None:
        """Submit ``count`` jobs one after the other, so stream order is submission order."""
        for _ in range(count):
            before = int(await self.client.xlen(self.layout.stream))
            job = make_job()
            self.jobs.append(job)
            self.submits.append(asyncio.create_task(self.queue.submit(job)))

            async def admitted(n: int = before + 1) -> bool:
                return int(await self.client.xlen(self.layout.stream)) >= n

            await wait_for(admitted)

    def worker(self, engine: GatedEngine, name: str, claim_idle_ms: int) -> RedisWorker:
        config = WorkerConfig(
            layout=self.layout, max_batch_size=2, max_batch_delay_ms=20, max_concurrent_batches=1,
            claim_idle_ms=claim_idle_ms, poll_ms=100, worker_heartbeat_s=0.1, cache_enabled=False,
        )  # fmt: skip
        client = connect(self.url, socket_timeout_s=10.0)
        worker = RedisWorker(
            client, engine, config, model_info={"model_version": "fake"},
            metrics=Metrics(CollectorRegistry()), consumer=name,
        )  # fmt: skip
        self.workers.append((worker, asyncio.create_task(worker.run()), client))
        return worker

    async def expect(self, queued: int, pending: int) -> None:
        """The lag KEDA reads equals the queued (undelivered) jobs; pending as given."""
        info = await group_info(self.client, self.layout)
        assert info["lag"] is not None, f"lag unknown: {info}"
        assert int(info["lag"]) == queued, info
        assert await keda_lag(self.client, self.layout) == queued
        assert await undelivered(self.client, self.layout) == queued
        assert int(info["pending"]) == pending, info

    async def stop_workers(self) -> None:
        for worker, task, client in self.workers:
            worker.stop()
            await asyncio.wait_for(task, 15)
            await client.aclose()
        self.workers = []

    async def close(self) -> None:
        await self.stop_workers()
        for task in self.submits:
            task.cancel()
        await asyncio.gather(*self.submits, return_exceptions=True)
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
        await self.queue.close()
        await self.client.aclose()


@pytest.fixture
async def stack(redis_url: str, redis_prefix: str) -> AsyncIterator[Stack]:
    s = Stack(redis_url, redis_prefix)
    await s.start()
    yield s
    await s.close()


async def test_lag_counts_the_queued_jobs_through_withdrawal_crash_and_reclaim(
    stack: Stack,
) -> None:
    client, layout = stack.client, stack.layout
    await stack.expect(queued=0, pending=0)  # the API created the group: lag 0, not nil

    await stack.admit(6)  # entries 1..6
    await stack.expect(queued=6, pending=0)

    # A client goes away: its job is marked cancelled and its undelivered entry kept, so the lag
    # still counts it (a worker must read it to skip it); deleting it would make the lag nil.
    stack.submits[5].cancel()
    with pytest.raises(asyncio.CancelledError):
        await stack.submits[5]
    assert len(await client.keys(f"{layout.prefix}:cancel:*")) == 1
    await stack.expect(queued=6, pending=0)

    # A worker reads entries 1, 2 and crashes: they stay pending.
    crashed = await client.xreadgroup(layout.group, "crashed", {layout.stream: ">"}, count=2)
    assert len(crashed[0][1]) == 2
    await stack.expect(queued=4, pending=2)

    # Worker A reads 3, 4 and holds them in its engine: lag drops, pending rises.
    engine_a = GatedEngine()
    stack.worker(engine_a, "worker-a", claim_idle_ms=3000)
    await wait_for(lambda: _batches_are(engine_a, 1))
    await stack.expect(queued=2, pending=4)

    # A answers 3, 4 (the last-delivered entry among them) while 1, 2 are still pending: the case
    # where an XDEL of the answered entry makes Redis report the lag as unknown. Then A reads 5
    # and the withdrawn 6, skips 6 without the model, and holds 5.
    engine_a.release(0)
    await wait_for(lambda: _batches_are(engine_a, 2))
    assert engine_a.batches[1] == [stack.jobs[4].request_id]
    assert all(await asyncio.gather(*stack.submits[2:4])), "3 and 4 answered"
    await stack.expect(queued=0, pending=3)

    await stack.admit(2)  # entries 7, 8, behind the crashed worker's pending ones
    await stack.expect(queued=2, pending=3)

    # Worker B takes over the crashed worker's entries (XAUTOCLAIM once idle for 2 s) and holds
    # them; A's heartbeat keeps entry 5 its own. The lag is unchanged: reclaimed jobs were
    # delivered already, and the undelivered ones (7, 8) are still counted.
    async def crashed_idle_long_enough() -> bool:
        held = await client.xpending_range(layout.stream, layout.group, "-", "+", 10, "crashed")
        return len(held) == 2 and min(int(h["time_since_delivered"]) for h in held) > 2100

    await wait_for(crashed_idle_long_enough)
    engine_b = GatedEngine()
    stack.worker(engine_b, "worker-b", claim_idle_ms=2000)
    await wait_for(lambda: _batches_are(engine_b, 1))
    assert sorted(engine_b.batches[0]) == sorted(job.request_id for job in stack.jobs[:2])
    owners = {
        as_text(p["consumer"])
        for p in await client.xpending_range(layout.stream, layout.group, "-", "+", 10)
    }
    assert owners == {"worker-a", "worker-b"}
    await stack.expect(queued=2, pending=3)

    # Everything runs to the end: every live job answered once, the withdrawn one never run.
    engine_a.open_all()
    engine_b.open_all()
    live = [task for i, task in enumerate(stack.submits) if i != 5]
    results = await asyncio.wait_for(asyncio.gather(*live), 20)
    assert all(isinstance(r, JobResult) for r in results)
    ran = [rid for engine in (engine_a, engine_b) for batch in engine.batches for rid in batch]
    assert sorted(ran) == sorted(job.request_id for i, job in enumerate(stack.jobs) if i != 5)
    await stack.expect(queued=0, pending=0)

    async def stream_empty() -> bool:
        return int(await client.xlen(layout.stream)) == 0

    await wait_for(stream_empty)  # answered entries removed: XLEN is again the backlog

    # With the workers gone (scaled in), new jobs are counted from an exact lag again.
    await stack.stop_workers()
    await stack.admit(3)
    await stack.expect(queued=3, pending=0)
    info = await group_info(client, layout)
    stream = await client.xinfo_stream(layout.stream)
    assert int(info["entries-read"]) + int(info["lag"]) == int(stream["entries-added"])
    assert stack.samples > 50
    assert stack.nil_lags == 0, f"lag read as nil {stack.nil_lags} times of {stack.samples}"


async def _batches_are(engine: GatedEngine, n: int) -> bool:
    return len(engine.batches) == n


async def test_deleting_entries_makes_the_lag_unknown(redis_url: str, redis_prefix: str) -> None:
    """Why the service never deletes an undelivered entry, nor the last-delivered one while an
    older entry remains: Redis (7.0, 7.2, 7.4) then reports the lag as nil, which KEDA reads as 0.
    """
    client = connect(redis_url)
    layout = RedisLayout(redis_prefix, "workers")
    try:
        ids = [await client.xadd(layout.stream, {"f": "v"}) for _ in range(4)]
        await client.xgroup_create(layout.stream, layout.group, id="0")
        await client.xreadgroup(layout.group, "c", {layout.stream: ">"}, count=2)
        assert (await group_info(client, layout))["lag"] == 2

        await client.xack(layout.stream, layout.group, ids[1])
        await client.xdel(layout.stream, ids[1])  # the last-delivered entry; ids[0] still pending
        assert (await group_info(client, layout))["lag"] is None
        assert await keda_lag(client, layout) == 0  # while 2 jobs wait

        await client.xack(layout.stream, layout.group, ids[0])
        await client.xdel(layout.stream, ids[0])  # nothing older remains: known again
        assert (await group_info(client, layout))["lag"] == 2

        await client.xdel(layout.stream, ids[3])  # an undelivered entry (what withdrawal did)
        assert (await group_info(client, layout))["lag"] is None
        assert await keda_lag(client, layout) == 0  # while 1 job waits
    finally:
        await client.aclose()
