"""The Redis queue protocol against a real Redis, in one process: API-side ``RedisJobQueue`` and
``RedisWorker`` running the real ``BatchEngine`` on the tiny checkpoints.

Dead workers are simulated by consumers that read from the group and never answer, which is what a
SIGKILLed worker leaves behind (tests/test_redis_e2e.py kills real worker processes).
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import image_corpus as corpus
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
from service.core.offload import OFFLOAD_BYTES
from service.engine.batch import BatchEngine
from service.queues.redis.client import RedisJobQueue, RedisQueueConfig
from service.queues.redis.protocol import (
    FINISH_SCRIPT,
    RedisClock,
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

    async def run_batch(
        self, jobs: Sequence[Job], abandoned: Callable[[Job], bool] | None = None
    ) -> list[JobResult | ServiceError]:
        self.batches.append(len(jobs))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return await self.engine.run_batch(jobs, abandoned)

    def describe(self) -> dict[str, Any]:
        return self.engine.describe()

    def close(self) -> None:
        self.engine.close()


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
            redis_url=self.url, layout=self.layout, stats_interval_s=0.1, require_live_worker=False
        )
        queue = RedisJobQueue(replace(base, **config), self.metrics)
        self.queues.append(queue)
        return queue

    def engine(
        self, delay_s: float = 0.0, clock: Callable[[], float] = time.time
    ) -> RecordingEngine:
        engine = BatchEngine(
            self.colorizer, self.pool, self.metrics, max_pixels=40_000_000, clock=clock
        )
        self.engines.append(engine)
        return RecordingEngine(engine, delay_s)

    def worker(
        self,
        engine: RecordingEngine | None = None,
        *,
        wall_clock: Callable[[], float] = time.time,
        **config: Any,
    ) -> RedisWorker:
        base = WorkerConfig(layout=self.layout, max_batch_delay_ms=50, poll_ms=100,
                            claim_idle_ms=5000, worker_heartbeat_s=0.1)  # fmt: skip
        client = connect(config.pop("url", self.url), socket_timeout_s=10.0)
        worker = RedisWorker(
            client, engine or self.engine(), replace(base, **config),
            model_info=self.colorizer.describe(), metrics=self.metrics,
            clock=RedisClock(local=wall_clock), wall_clock=wall_clock,
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
    harness.worker(engine, max_batch_delay_ms=300, max_batch_size=8)
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
    harness.worker(max_batch_delay_ms=300)
    good, bad = make_job(png((32, 32))), make_job(b"\x89PNG\r\n\x1a\n truncated")
    outcomes = await asyncio.gather(queue.submit(good), queue.submit(bad), return_exceptions=True)
    assert isinstance(outcomes[0], JobResult)
    assert isinstance(outcomes[1], ServiceError)
    assert outcomes[1].status == 400


async def test_full_stream_refuses_admission_with_retry_after(harness: Harness) -> None:
    queue = harness.queue(queue_size=2)
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
    harness.worker(
        engine, max_batch_delay_ms=1500
    )  # the worker holds the job while its batch fills
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


async def redis_time(client: aioredis.Redis) -> float:
    seconds, micros = await client.time()
    return int(seconds) + int(micros) / 1e6


async def test_the_api_stamps_deadlines_on_redis_time(harness: Harness) -> None:
    """The API replica's wall clock runs 10 minutes late; the job in the stream is on Redis time."""
    queue = harness.queue()
    queue.wall_clock = lambda: time.time() - 600  # what the router stamped the job with
    await queue.start()
    late = make_job(png((16, 16)), timeout=5.0)
    task = asyncio.create_task(
        queue.submit(
            replace(late, enqueued_at=late.enqueued_at - 600, deadline=late.deadline - 600)
        )
    )  # stamped by a host whose wall clock is 600 s behind: ...
    await wait_for(lambda: _xlen_is(harness, 1))
    ((_, fields),) = await harness.client.xrange(harness.layout.stream)
    meta = json.loads(fields[b"meta"])
    now = await redis_time(harness.client)
    assert set(meta) == {"request_id", "options", "deadline", "enqueued_at", "pixels", "model"}
    assert abs(meta["enqueued_at"] - now) < 2.0  # ... but the stream holds Redis time
    assert meta["deadline"] - meta["enqueued_at"] == pytest.approx(5.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("skew_s", [600.0, -600.0])
async def test_a_worker_with_a_skewed_clock_drops_expired_jobs_and_serves_live_ones(
    harness: Harness, skew_s: float
) -> None:
    """The worker host's clock is 10 minutes off: deadlines are still judged on Redis time.

    Ahead, its own clock would call every live job expired; behind, it would run expired ones.
    """

    def skewed() -> float:
        return time.time() + skew_s

    queue = harness.queue()
    await queue.start()
    expired = replace(make_job(png((16, 16))), deadline=await redis_time(harness.client) - 1)
    token = uuid.uuid4().hex
    await harness.client.xadd(harness.layout.stream, job_fields(expired, token))  # type: ignore[arg-type]
    engine = harness.engine(clock=skewed)  # the engine measures on the host's clock too
    harness.worker(engine, wall_clock=skewed)
    popped = await harness.client.blpop([harness.layout.reply(token)], timeout=10)
    assert popped is not None
    assert isinstance(decode_answer(popped[1]), DeadlineExceededError)
    assert engine.batches == []
    assert harness.dropped("deadline") == 1
    result = await asyncio.wait_for(queue.submit(make_job(png((20, 20)), timeout=10.0)), 15)
    assert isinstance(result, JobResult)
    assert engine.batches == [1]
    assert 0.0 <= result.timings["queue"] < 5.0  # measured on one clock, not 600 s off
    assert harness.dropped("deadline") == 1


async def test_the_batch_delay_counts_from_the_oldest_admission(harness: Harness) -> None:
    """A job that already waited in the stream longer than the batch delay is not held again
    (memory mode's rule); before, the worker started the delay at its first read."""
    queue = harness.queue()
    await queue.start()  # creates the group
    admitted = await redis_time(harness.client) - 10.0  # waited 10 s for a worker
    job = replace(make_job(png((16, 16)), timeout=60.0), enqueued_at=admitted)
    token = uuid.uuid4().hex
    await harness.client.xadd(harness.layout.stream, job_fields(job, token))  # type: ignore[arg-type]
    engine = harness.engine()
    harness.worker(engine, max_batch_delay_ms=8000, max_batch_size=8)
    started = time.monotonic()
    popped = await harness.client.blpop([harness.layout.reply(token)], timeout=20)
    assert popped is not None
    assert isinstance(decode_answer(popped[1]), JobResult)
    assert time.monotonic() - started < 6.0  # not the 8 s a delay from the read would hold it
    assert engine.batches == [1]


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


async def test_cache_hit_for_a_large_upload(harness: Harness) -> None:
    """Over OFFLOAD_BYTES the API hashes on a worker thread: its key still is the worker's."""
    queue = harness.queue()
    await queue.start()
    engine = harness.engine()
    harness.worker(engine)
    await queue.submit(make_job(png((40, 30))))  # the worker publishes its model version
    await wait_for(lambda: _has_model(harness))
    image = corpus.png(720, 540, seed=5)
    assert len(image) > OFFLOAD_BYTES
    first = await queue.submit(make_job(image))
    second = await queue.submit(make_job(image))
    assert not first.cached and second.cached
    assert second.body == first.body
    assert engine.batches == [1, 1]  # the hit never touched the engine


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
    queue = harness.queue(redis_url=f"redis://127.0.0.1:{free_port()}/0")
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
        queue = harness.queue(redis_url=server.url)
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
    worker = harness.worker(engine, max_batch_delay_ms=800)
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


def test_answer_frames_carry_truncated_only_when_true() -> None:
    whole = JobResult(body=b"img", media_type="image/png", boxes=[], scores=[], timings={},
                      model_version="v", input_size=[4, 3])  # fmt: skip
    frame = encode_answer(whole)
    assert b"truncated" not in frame.partition(b"\n")[0]  # the frame of whole images unchanged
    assert decode_answer(frame) == whole
    cut = replace(whole, truncated=True)
    assert decode_answer(encode_answer(cut)) == cut


async def test_stats_gauges_are_labelled_per_model(redis_url: str, redis_prefix: str) -> None:
    """Two models' queues in one process (``serve --models a,b`` in Redis mode) publish their own
    streams' state into the same gauges, each under its ``model`` label: neither overwrites the
    other. The streams are filled and read here with plain Redis commands."""
    import redis as sync_redis

    from service.queues.redis.protocol import RedisLayout

    registry = CollectorRegistry()
    metrics = Metrics(registry, role="api")
    models = ("instcolor", "zhang-eccv16")
    layouts = {m: RedisLayout(redis_prefix, "workers", m) for m in models}
    configs = [
        RedisQueueConfig(redis_url, layouts[m], stats_interval_s=0.05, require_live_worker=False)
        for m in models
    ]
    queues = [RedisJobQueue(config, metrics) for config in configs]
    for queue in queues:
        await queue.start()
    keys = sync_redis.Redis.from_url(redis_url)
    try:
        for model, count in (("instcolor", 3), ("zhang-eccv16", 5)):
            for i in range(count):
                keys.xadd(layouts[model].stream, {"n": i})
        other = layouts["zhang-eccv16"]
        keys.xreadgroup(other.group, "reader", {other.stream: ">"}, count=2)
        want = {
            ("colorize_redis_stream_length", "instcolor"): 3,
            ("colorize_redis_stream_length", "zhang-eccv16"): 5,
            ("colorize_redis_pending_jobs", "instcolor"): 0,
            ("colorize_redis_pending_jobs", "zhang-eccv16"): 2,
            ("colorize_redis_consumers", "instcolor"): 0,
            ("colorize_redis_consumers", "zhang-eccv16"): 1,
            ("colorize_queue_depth", "instcolor"): 3,
            ("colorize_queue_depth", "zhang-eccv16"): 3,
        }

        def seen() -> dict[tuple[str, str], float | None]:
            return {(n, m): registry.get_sample_value(n, {"model": m}) for n, m in want}

        for _ in range(200):
            if seen() == want:
                break
            await asyncio.sleep(0.05)
        assert seen() == want
        assert registry.get_sample_value("colorize_redis_stream_length") is None  # no unlabelled
    finally:
        keys.close()
        for queue in queues:
            await queue.close()
