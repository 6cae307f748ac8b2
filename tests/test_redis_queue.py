"""The Redis queue protocol against a real Redis, in one process: API-side ``RedisJobQueue`` and
``RedisWorker`` running the real ``BatchEngine`` on the tiny checkpoints.

Dead workers are simulated by consumers that read from the group and never answer, which is what a
SIGKILLed worker leaves behind (tests/test_redis_e2e.py kills real worker processes).
"""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from PIL import Image
from prometheus_client import CollectorRegistry
from redis_fixtures import OwnRedis, free_port, redis_prefix, redis_url

from models.pipeline import Colorizer
from service.core.errors import (
    DeadlineExceededError,
    OverloadedError,
    ProcessingFailedError,
    ServiceError,
    UnavailableError,
)
from service.core.jobs import Job, JobOptions, JobResult
from service.core.metrics import Metrics
from service.engine.batch import BatchEngine
from service.queues.redis.client import RedisJobQueue, RedisQueueConfig
from service.queues.redis.protocol import (
    FINISH_SCRIPT,
    RedisLayout,
    connect,
    decode_answer,
    encode_answer,
    job_fields,
)
from service.queues.redis.worker import RedisWorker, WorkerConfig

__all__ = ["redis_prefix", "redis_url"]  # fixtures

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


def png(size: tuple[int, int], shade: int = 0) -> bytes:
    image = Image.linear_gradient("L").resize(size)
    image.paste(shade, (0, 0, size[0] // 3, size[1] // 3))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def make_job(image: bytes, timeout: float = 10.0, **options: Any) -> Job:
    now = time.time()
    return Job(
        request_id=uuid.uuid4().hex, image=image, options=JobOptions(**options),
        deadline=now + timeout, enqueued_at=now,
    )  # fmt: skip


class RecordingEngine:
    """The real BatchEngine; records the batch sizes it was given, optionally slowed down
    (a slow device) before running."""

    def __init__(self, engine: BatchEngine, delay_s: float = 0.0) -> None:
        self.engine = engine
        self.delay_s = delay_s
        self.batches: list[int] = []

    async def run_batch(self, jobs: Sequence[Job]) -> list[JobResult | ServiceError]:
        self.batches.append(len(jobs))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return await self.engine.run_batch(jobs)


class Harness:
    def __init__(self, url: str, prefix: str, colorizer: Colorizer) -> None:
        self.url = url
        self.layout = RedisLayout(prefix, "workers")
        self.colorizer = colorizer
        self.metrics = Metrics(CollectorRegistry())
        self.pool = ThreadPoolExecutor(2)
        self.engines: list[BatchEngine] = []
        self.queues: list[RedisJobQueue] = []
        self.workers: list[tuple[RedisWorker, asyncio.Task[None], aioredis.Redis]] = []
        self.client = connect(url)

    def queue(self, **config: Any) -> RedisJobQueue:
        # Liveness is tested in test_redis_edge.py; here jobs may be submitted before a worker
        # task has sent its first heartbeat.
        base = RedisQueueConfig(
            url=self.url, layout=self.layout, stats_interval_s=0.1, require_live_worker=False
        )
        queue = RedisJobQueue(replace(base, **config), self.metrics)
        self.queues.append(queue)
        return queue

    def engine(self, delay_s: float = 0.0) -> RecordingEngine:
        engine = BatchEngine(self.colorizer, self.pool, self.metrics, max_pixels=40_000_000)
        self.engines.append(engine)
        return RecordingEngine(engine, delay_s)

    def worker(self, engine: RecordingEngine | None = None, **config: Any) -> RedisWorker:
        base = WorkerConfig(layout=self.layout, batch_delay_ms=50, poll_ms=100,
                            claim_idle_ms=5000, stats_interval_s=0.1)  # fmt: skip
        client = connect(config.pop("url", self.url), socket_timeout_s=10.0)
        worker = RedisWorker(
            client, engine or self.engine(), replace(base, **config),
            model_info=self.colorizer.describe(), metrics=self.metrics,
        )  # fmt: skip
        task = asyncio.create_task(worker.run())
        self.workers.append((worker, task, client))
        return worker

    async def stop_worker(self, worker: RedisWorker) -> None:
        for w, task, client in self.workers:
            if w is worker:
                w.stop()
                await asyncio.wait_for(task, 10)
                await client.aclose()
        self.workers = [entry for entry in self.workers if entry[0] is not worker]

    def dropped(self, reason: str) -> float:
        return self.metrics.dropped.labels(reason=reason)._value.get()

    def cache_count(self, result: str) -> float:
        return self.metrics.cache_requests.labels(result=result)._value.get()

    async def close(self) -> None:
        for worker, _, _ in list(self.workers):
            await self.stop_worker(worker)
        for queue in self.queues:
            await queue.close()
        for engine in self.engines:
            engine.close()
        self.pool.shutdown()
        await self.client.aclose()


@pytest.fixture
async def harness(
    redis_url: str, redis_prefix: str, tiny_colorizer: Colorizer
) -> AsyncIterator[Harness]:
    h = Harness(redis_url, redis_prefix, tiny_colorizer)
    yield h
    await h.close()


async def dead_consumer_takes(
    h: Harness, count: int = 10, name: str = "dead-worker"
) -> list[bytes]:
    """What a worker does before it is killed: read jobs from the group and never answer."""
    reply = await h.client.xreadgroup(
        h.layout.group, name, {h.layout.stream: ">"}, count=count, block=2000
    )
    return [entry_id for _, items in reply for entry_id, _ in items]


async def wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_jobs_are_batched_and_each_gets_its_own_answer(harness: Harness) -> None:
    queue = harness.queue()
    await queue.start()
    engine = harness.engine()
    harness.worker(engine, batch_delay_ms=300, max_batch_size=8)
    sizes = [(40 + 8 * i, 30 + 4 * i) for i in range(6)]
    results = await asyncio.gather(*(queue.submit(make_job(png(s))) for s in sizes))
    for size, result in zip(sizes, results, strict=True):
        assert isinstance(result, JobResult)
        assert not result.cached
        assert Image.open(io.BytesIO(result.body)).size == size  # its own image came back
        assert result.model_version == harness.colorizer.version
        assert {"queue", "decode", "encode"} <= set(result.timings)
    assert sum(engine.batches) == 6
    assert max(engine.batches) > 1  # the fill window gathered concurrent submits
    assert await harness.client.xlen(harness.layout.stream) == 0  # answered entries are deleted
    groups = await harness.client.xinfo_groups(harness.layout.stream)
    assert groups[0]["pending"] == 0


async def test_a_bad_image_fails_only_its_own_job(harness: Harness) -> None:
    queue = harness.queue()
    await queue.start()
    harness.worker(batch_delay_ms=300)
    good, bad = make_job(png((32, 32))), make_job(b"\x89PNG\r\n\x1a\n truncated")
    outcomes = await asyncio.gather(queue.submit(good), queue.submit(bad), return_exceptions=True)
    assert isinstance(outcomes[0], JobResult)
    assert isinstance(outcomes[1], ServiceError)
    assert outcomes[1].status == 400


async def test_full_stream_refuses_admission_with_retry_after(harness: Harness) -> None:
    queue = harness.queue(max_queue=2)
    await queue.start()
    waiting = [asyncio.create_task(queue.submit(make_job(png((16, 16))))) for _ in range(2)]
    await wait_for(lambda: _xlen_is(harness, 2))
    with pytest.raises(OverloadedError) as info:
        await queue.submit(make_job(png((16, 16))))
    assert info.value.retry_after == 1.0
    for task in waiting:  # clients going away withdraw their jobs
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    # Withdrawn entries stay until a worker skips them (deleting an undelivered entry would hide
    # the group's lag from KEDA, tests/test_keda_lag.py); the stream then empties without the model.
    assert await harness.client.xlen(harness.layout.stream) == 2
    assert len(await harness.client.keys(f"{harness.layout.prefix}:cancel:*")) == 2
    engine = harness.engine()
    harness.worker(engine)
    await wait_for(lambda: _xlen_is(harness, 0))
    assert engine.batches == []
    assert harness.dropped("disconnected") == 2


async def _xlen_is(h: Harness, n: int) -> bool:
    return int(await h.client.xlen(h.layout.stream)) == n


async def test_deadline_without_worker_is_504_and_withdraws_the_job(harness: Harness) -> None:
    queue = harness.queue()
    await queue.start()
    start = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        await queue.submit(make_job(png((16, 16)), timeout=0.3))
    assert 0.25 < time.monotonic() - start < 2.0
    # Withdrawn: marked cancelled, the undelivered entry kept for the lag (a worker skips it).
    assert await harness.client.xlen(harness.layout.stream) == 1
    assert await harness.client.keys(f"{harness.layout.prefix}:cancel:*")


async def test_withdrawn_job_held_by_a_worker_never_reaches_the_model(harness: Harness) -> None:
    queue = harness.queue()
    await queue.start()
    engine = harness.engine()
    harness.worker(engine, batch_delay_ms=1500)  # the worker holds the job while its batch fills
    task = asyncio.create_task(queue.submit(make_job(png((16, 16)))))

    async def held() -> bool:
        groups = await harness.client.xinfo_groups(harness.layout.stream)
        return bool(groups) and groups[0]["pending"] == 1

    await wait_for(held)
    task.cancel()  # the client disconnects
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for(lambda: _pending_is(harness, 0))
    assert engine.batches == []
    assert harness.dropped("disconnected") == 1


async def _pending_is(h: Harness, n: int) -> bool:
    groups = await h.client.xinfo_groups(h.layout.stream)
    return bool(groups) and int(groups[0]["pending"]) == n


async def test_expired_job_is_answered_504_without_the_model(harness: Harness) -> None:
    queue = harness.queue()
    await queue.start()  # creates the group
    job = replace(make_job(png((16, 16))), deadline=time.time() - 1)
    token = uuid.uuid4().hex
    await harness.client.xadd(harness.layout.stream, job_fields(job, token))  # type: ignore[arg-type]
    engine = harness.engine()
    harness.worker(engine)
    popped = await harness.client.blpop([harness.layout.reply(token)], timeout=10)
    assert popped is not None
    answer = decode_answer(popped[1])
    assert isinstance(answer, DeadlineExceededError)
    assert engine.batches == []
    assert harness.dropped("deadline") == 1


async def test_jobs_of_a_dead_worker_are_reclaimed_and_answered(harness: Harness) -> None:
    queue = harness.queue()
    await queue.start()
    tasks = [
        asyncio.create_task(queue.submit(make_job(png((24, 24)), timeout=20))) for _ in range(3)
    ]
    await wait_for(lambda: _xlen_is(harness, 3))
    taken = await dead_consumer_takes(harness)
    assert len(taken) == 3
    engine = harness.engine()
    harness.worker(engine, claim_idle_ms=300)
    results = await asyncio.wait_for(asyncio.gather(*tasks), 15)
    assert all(isinstance(r, JobResult) for r in results)
    assert sum(engine.batches) == 3  # each job ran once more, on the live worker
    assert await _pending_is(harness, 0)


async def test_job_handed_out_too_often_goes_to_dead_letter(harness: Harness) -> None:
    queue = harness.queue()
    await queue.start()
    job = make_job(png((24, 24)), timeout=20)
    task = asyncio.create_task(queue.submit(job))
    await wait_for(lambda: _xlen_is(harness, 1))
    # Two workers took the job and died with it: deliveries 1 and 2.
    [entry_id] = await dead_consumer_takes(harness, name="dead-1")
    await asyncio.sleep(0.05)
    await harness.client.xclaim(
        harness.layout.stream, harness.layout.group, "dead-2", 0, [entry_id]
    )
    engine = harness.engine()
    harness.worker(engine, claim_idle_ms=200, max_deliveries=2)
    with pytest.raises(ProcessingFailedError) as info:
        await asyncio.wait_for(task, 10)
    assert "dead-letter" in info.value.detail
    assert info.value.status == 500
    assert engine.batches == []  # the poison job never reached the model a third time
    dead = await harness.client.xrange(harness.layout.dead)
    assert len(dead) == 1
    fields = dead[0][1]
    assert fields[b"request_id"].decode() == job.request_id
    assert int(fields[b"deliveries"]) == 3
    assert fields[b"image"] == job.image  # kept for inspection / replay
    assert harness.dropped("dead_letter") == 1
    assert await harness.client.xlen(harness.layout.stream) == 0


async def test_malformed_entry_goes_to_dead_letter_with_an_answer(harness: Harness) -> None:
    queue = harness.queue()
    await queue.start()
    token = uuid.uuid4().hex
    await harness.client.xadd(harness.layout.stream, {"token": token, "meta": "{not json"})
    harness.worker()
    popped = await harness.client.blpop([harness.layout.reply(token)], timeout=10)
    assert popped is not None
    assert isinstance(decode_answer(popped[1]), ProcessingFailedError)
    assert await harness.client.xlen(harness.layout.dead) == 1


async def test_a_job_processed_twice_is_answered_once(harness: Harness) -> None:
    """Two workers finishing the same reclaimed entry: only the XACK that counts pushes."""
    queue = harness.queue()
    await queue.start()
    token = uuid.uuid4().hex
    await harness.client.xadd(harness.layout.stream, job_fields(make_job(b"x"), token))  # type: ignore[arg-type]
    [entry_id] = await dead_consumer_takes(harness)
    finish = harness.client.register_script(FINISH_SCRIPT)
    frame = encode_answer(DeadlineExceededError("x"))
    keys = [harness.layout.stream, harness.layout.reply(token), harness.layout.cancel(token)]
    args = [harness.layout.group, entry_id, frame, 10_000]
    assert await finish(keys=keys, args=args) == 1
    assert await finish(keys=keys, args=args) == 0
    assert await harness.client.llen(harness.layout.reply(token)) == 1
    assert 0 < await harness.client.pttl(harness.layout.reply(token)) <= 10_000


async def test_live_worker_keeps_a_slow_batch(harness: Harness) -> None:
    """A batch slower than claim_idle_ms is not taken over by the other live worker."""
    queue = harness.queue()
    await queue.start()
    slow, other = harness.engine(delay_s=1.2), harness.engine()
    harness.worker(slow, claim_idle_ms=300)
    task = asyncio.create_task(queue.submit(make_job(png((24, 24)), timeout=20)))
    await wait_for(lambda: _pending_is(harness, 1))
    harness.worker(other, claim_idle_ms=300)
    result = await asyncio.wait_for(task, 10)
    assert isinstance(result, JobResult)
    assert slow.batches == [1]
    assert other.batches == []


async def test_cache_hit_skips_the_model(harness: Harness) -> None:
    queue = harness.queue()
    await queue.start()
    engine = harness.engine()
    harness.worker(engine)
    image = png((40, 30))
    first = await queue.submit(make_job(image))
    assert not first.cached
    assert harness.cache_count("miss") == 0  # no worker had published the model version yet
    await wait_for(lambda: _has_model(harness))
    second = await queue.submit(make_job(image))
    assert second.cached
    assert second.body == first.body
    assert engine.batches == [1]  # the hit never touched the engine
    assert harness.cache_count("hit") == 1
    other_options = await queue.submit(make_job(image, resolution="network"))
    assert not other_options.cached
    assert harness.cache_count("miss") == 1
    assert engine.batches == [1, 1]
    ttls = [await harness.client.ttl(k) async for k in harness.client.scan_iter(
        f"{harness.layout.prefix}:cache:*")]  # fmt: skip
    assert len(ttls) == 2
    assert all(0 < t <= 3600 for t in ttls)


async def _has_model(h: Harness) -> bool:
    return bool(await h.client.exists(h.layout.model))


async def test_cache_off(harness: Harness) -> None:
    queue = harness.queue(cache_enabled=False)
    await queue.start()
    engine = harness.engine()
    harness.worker(engine, cache_enabled=False)
    image = png((40, 30))
    for _ in range(2):
        assert not (await queue.submit(make_job(image))).cached
    assert engine.batches == [1, 1]
    assert harness.cache_count("hit") + harness.cache_count("miss") == 0


async def test_unreachable_redis_is_unavailable_not_a_crash(harness: Harness) -> None:
    queue = harness.queue(url=f"redis://127.0.0.1:{free_port()}/0")
    await queue.start()  # does not raise
    assert not await queue.ready()
    start = time.monotonic()
    with pytest.raises(UnavailableError) as info:
        await queue.submit(make_job(png((16, 16))))
    assert time.monotonic() - start < 3
    assert info.value.status == 503
    assert "Redis" in info.value.detail


async def test_queue_and_worker_recover_when_redis_returns(
    harness: Harness, tmp_path: Path
) -> None:
    server = OwnRedis(tmp_path)
    server.start()
    try:
        queue = harness.queue(url=server.url)
        await queue.start()
        harness.worker(url=server.url)
        assert isinstance(await queue.submit(make_job(png((16, 16)))), JobResult)
        server.stop()
        assert not await queue.ready()
        with pytest.raises(UnavailableError):
            await queue.submit(make_job(png((16, 16))))
        server.start()  # empty: no stream, no group; the worker recreates them
        deadline = time.monotonic() + 15
        while not await queue.ready():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        result = await queue.submit(make_job(png((16, 16)), timeout=15))
        assert isinstance(result, JobResult)
    finally:
        await harness.close()
        server.stop()


async def test_sigterm_finishes_the_batch_being_filled(harness: Harness) -> None:
    """stop() (the SIGTERM handler) reads nothing more but answers the jobs already read."""
    queue = harness.queue()
    await queue.start()
    engine = harness.engine()
    worker = harness.worker(engine, batch_delay_ms=800)
    task = asyncio.create_task(queue.submit(make_job(png((24, 24)))))
    await wait_for(lambda: _pending_is(harness, 1))
    await harness.stop_worker(worker)
    result = await asyncio.wait_for(task, 5)
    assert isinstance(result, JobResult)
    assert engine.batches == [1]
    assert await _pending_is(harness, 0)


def test_settings_refuse_a_claim_timeout_that_would_steal_filling_batches() -> None:
    from pydantic import ValidationError

    from service.settings import ServiceSettings

    with pytest.raises(ValidationError, match="COLORIZE_CLAIM_IDLE_MS"):
        ServiceSettings(queue="redis", claim_idle_ms=500, max_batch_delay_ms=800)
    with pytest.raises(ValidationError, match="COLORIZE_CLAIM_IDLE_MS"):
        ServiceSettings(queue="redis", claim_idle_ms=40_000, request_timeout_s=30)
    # A Redis-only knob does not constrain the memory mode.
    assert ServiceSettings(claim_idle_ms=500, max_batch_delay_ms=800).queue == "memory"
