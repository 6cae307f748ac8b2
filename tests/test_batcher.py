"""The engine and the in-process batcher, without HTTP.

The real ``BatchEngine`` runs the tiny random-weight colorizer. Faults the CPU cannot produce (a
CUDA out-of-memory error, a model failure on one image) are injected by a ``Colorizer`` subclass
that raises before delegating to the real ``predict``. The hypothesis property drives the batcher
with a recording engine, so it can try hundreds of arrival patterns in seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import image_corpus as corpus
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from service_helpers import FaultyColorizer, GatedEngine, make_job, sample, size_of

from models.pipeline import Colorizer
from service.core.errors import (
    DeadlineExceededError,
    InternalError,
    InvalidImageError,
    InvalidParameterError,
    OverloadedError,
    ServiceError,
    UnavailableError,
)
from service.core.jobs import Job, JobResult
from service.engine.batch import BatchEngine
from service.queues.memory import InProcessQueue

LIMIT = 40_000_000


@pytest.fixture
async def pool() -> AsyncIterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(2)
    yield executor
    executor.shutdown(wait=True)


async def test_engine_answers_each_job_with_its_own_image(
    tiny_colorizer: Colorizer, pool: ThreadPoolExecutor
) -> None:
    engine = BatchEngine(tiny_colorizer, pool, max_pixels=LIMIT)
    try:
        sizes = [(40, 30), (64, 48), (33, 77), (90, 20)]
        jobs = [
            make_job(
                corpus.png(w, h, seed=i), f"job{i}", boxes=[[1, 1, w - 1, h - 1]] if i % 2 else None
            )
            for i, (w, h) in enumerate(sizes)
        ]
        results = await engine.run_batch(jobs)
        for (w, h), job, result in zip(sizes, jobs, results, strict=True):
            assert isinstance(result, JobResult), result
            assert result.media_type == "image/png"
            assert size_of(result) == (w, h)
            assert len(result.boxes) == (1 if job.options.boxes else 0)
            assert set(result.timings) >= {
                "decode",
                "queue",
                "detect",
                "instance",
                "fusion",
                "merge",
                "encode",
            }
            assert result.model_version == tiny_colorizer.version
    finally:
        engine.close()


async def test_bad_image_fails_only_its_own_job(
    tiny_colorizer: Colorizer, pool: ThreadPoolExecutor
) -> None:
    engine = BatchEngine(tiny_colorizer, pool, max_pixels=LIMIT)
    try:
        jobs = [
            make_job(corpus.jpeg(), "good1"),
            make_job(corpus.jpeg()[:200], "truncated"),
            make_job(corpus.png(), "bad-boxes", boxes=[[1, 2, 3]]),
            make_job(corpus.png(), "good2", format="webp"),
        ]
        results = await engine.run_batch(jobs)
        assert isinstance(results[0], JobResult)
        assert results[0].media_type == "image/jpeg"
        assert isinstance(results[1], InvalidImageError)
        assert isinstance(results[2], InvalidParameterError)
        assert isinstance(results[3], JobResult)
        assert results[3].media_type == "image/webp"
    finally:
        engine.close()


async def test_out_of_memory_splits_the_batch(
    tiny_colorizer: Colorizer, pool: ThreadPoolExecutor
) -> None:
    faulty = FaultyColorizer(tiny_colorizer, oom_above=1)
    engine = BatchEngine(faulty, pool, max_pixels=LIMIT)
    try:
        jobs = [make_job(corpus.png(20 + i, 20, seed=i), f"j{i}") for i in range(4)]
        results = await engine.run_batch(jobs)
        assert all(isinstance(r, JobResult) for r in results)
        assert [size_of(r) for r in results if isinstance(r, JobResult)] == [
            (20 + i, 20) for i in range(4)
        ]
        assert faulty.calls == [4, 2, 1, 1, 2, 1, 1]  # halves, then quarters, in order
    finally:
        engine.close()


async def test_model_failure_on_one_image_spares_its_batch_mates(
    tiny_colorizer: Colorizer, pool: ThreadPoolExecutor
) -> None:
    faulty = FaultyColorizer(tiny_colorizer, poison_size=(33, 33))
    engine = BatchEngine(faulty, pool, max_pixels=LIMIT)
    try:
        jobs = [make_job(corpus.png(w, w), str(w)) for w in (30, 33, 36)]
        results = await engine.run_batch(jobs)
        assert isinstance(results[0], JobResult)
        assert isinstance(results[1], InternalError)
        assert "Traceback" not in results[1].detail
        assert isinstance(results[2], JobResult)
        assert faulty.calls == [3, 1, 1, 1]  # the batch, then each image alone
    finally:
        engine.close()


async def test_expired_jobs_never_reach_the_model(
    tiny_colorizer: Colorizer, pool: ThreadPoolExecutor
) -> None:
    faulty = FaultyColorizer(tiny_colorizer)
    engine = BatchEngine(faulty, pool, max_pixels=LIMIT)
    before = sample("colorize_dropped_requests_total", reason="deadline")
    try:
        results = await engine.run_batch(
            [make_job(corpus.png(), "late", timeout=-1.0), make_job(corpus.png(), "ok")]
        )
        assert isinstance(results[0], DeadlineExceededError)
        assert isinstance(results[1], JobResult)
        assert faulty.calls == [1]
        assert sample("colorize_dropped_requests_total", reason="deadline") == before + 1
    finally:
        engine.close()


# -- the queue with the real engine -------------------------------------------------------------


async def started_queue(engine: Any, **options: Any) -> InProcessQueue:
    async def load() -> Any:
        return engine

    config: dict[str, Any] = {"max_batch_size": 4, "max_batch_delay_ms": 50.0, "queue_size": 16}
    queue = InProcessQueue(load, **{**config, **options})
    await queue.start()
    await queue.wait_loaded()
    assert await queue.ready()
    return queue


async def test_queue_batches_concurrent_jobs_and_answers_each(
    tiny_colorizer: Colorizer, pool: ThreadPoolExecutor
) -> None:
    gated = GatedEngine(BatchEngine(tiny_colorizer, pool, max_pixels=LIMIT))
    queue = await started_queue(gated, max_concurrent_batches=1)
    try:
        sizes = [(20 + 3 * i, 25 + i) for i in range(8)]
        tasks = [
            asyncio.create_task(queue.submit(make_job(corpus.png(w, h, i), f"r{i}")))
            for i, (w, h) in enumerate(sizes)
        ]
        await asyncio.sleep(0.2)
        gated.gate.set()
        results = await asyncio.gather(*tasks)
        assert [size_of(r) for r in results] == sizes
        assert max(gated.batches) > 1
        assert all(b <= 4 for b in gated.batches)
        assert sum(gated.batches) == 8
    finally:
        await queue.drain()
        await queue.close()


async def test_full_queue_refuses_at_once_with_retry_after(
    tiny_colorizer: Colorizer, pool: ThreadPoolExecutor
) -> None:
    gated = GatedEngine(BatchEngine(tiny_colorizer, pool, max_pixels=LIMIT))
    queue = await started_queue(
        gated, max_batch_size=1, queue_size=2, max_concurrent_batches=1, retry_after_s=2.0
    )
    try:
        held = [asyncio.create_task(queue.submit(make_job(corpus.png(), "h0")))]
        await asyncio.sleep(0.05)  # h0 is on the (gated) engine
        held += [asyncio.create_task(queue.submit(make_job(corpus.png(), f"h{i}"))) for i in (1, 2)]
        await asyncio.sleep(0.05)  # h1 and h2 wait: the queue is full
        assert queue.depth() == 2
        start = time.monotonic()
        with pytest.raises(OverloadedError) as refused:
            await queue.submit(make_job(corpus.png(), "extra"))
        assert time.monotonic() - start < 0.1
        assert refused.value.retry_after is not None
        assert refused.value.retry_after >= 2.0
        gated.gate.set()
        assert all(isinstance(r, JobResult) for r in await asyncio.gather(*held))
    finally:
        await queue.close()


async def test_deadline_gives_504_and_frees_the_slot(
    tiny_colorizer: Colorizer, pool: ThreadPoolExecutor
) -> None:
    gated = GatedEngine(BatchEngine(tiny_colorizer, pool, max_pixels=LIMIT))
    queue = await started_queue(gated, max_batch_size=1, max_concurrent_batches=1)
    before = sample("colorize_dropped_requests_total", reason="deadline")
    try:
        first = asyncio.create_task(queue.submit(make_job(corpus.png(), "first")))
        await asyncio.sleep(0.05)
        with pytest.raises(DeadlineExceededError):
            await queue.submit(make_job(corpus.png(), "late", timeout=0.2))
        assert queue.depth() == 0
        assert sample("colorize_dropped_requests_total", reason="deadline") == before + 1
        gated.gate.set()
        assert isinstance(await first, JobResult)
        assert gated.batches == [1]  # the expired job never reached the engine
    finally:
        await queue.close()


async def test_cancelled_caller_frees_its_slot(
    tiny_colorizer: Colorizer, pool: ThreadPoolExecutor
) -> None:
    gated = GatedEngine(BatchEngine(tiny_colorizer, pool, max_pixels=LIMIT))
    queue = await started_queue(gated, max_batch_size=1, max_concurrent_batches=1)
    before = sample("colorize_dropped_requests_total", reason="disconnected")
    try:
        first = asyncio.create_task(queue.submit(make_job(corpus.png(), "first")))
        gone = asyncio.create_task(queue.submit(make_job(corpus.png(), "gone")))
        await asyncio.sleep(0.05)
        assert queue.depth() == 1
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert queue.depth() == 0
        assert sample("colorize_dropped_requests_total", reason="disconnected") == before + 1
        gated.gate.set()
        assert isinstance(await first, JobResult)
        await asyncio.sleep(0.1)
        assert gated.batches == [1]
    finally:
        await queue.close()


async def test_drain_finishes_everything_then_refuses(
    tiny_colorizer: Colorizer, pool: ThreadPoolExecutor
) -> None:
    gated = GatedEngine(BatchEngine(tiny_colorizer, pool, max_pixels=LIMIT))
    queue = await started_queue(gated, max_batch_size=2)
    tasks = [
        asyncio.create_task(queue.submit(make_job(corpus.png(30 + i, 30), f"d{i}")))
        for i in range(6)
    ]
    await asyncio.sleep(0.1)
    drain = asyncio.create_task(queue.drain())
    await asyncio.sleep(0.05)
    assert not await queue.ready()
    with pytest.raises(UnavailableError):
        await queue.submit(make_job(corpus.png(), "late"))
    gated.gate.set()
    await drain
    results = await asyncio.gather(*tasks)
    assert [size_of(r) for r in results] == [(30 + i, 30) for i in range(6)]
    await queue.close()


async def test_failed_load_is_reported_not_hung() -> None:
    async def load() -> Any:
        raise RuntimeError("latest_net_G.pth: unexpected keys")

    queue = InProcessQueue(load, max_batch_size=1, max_batch_delay_ms=0, queue_size=1)
    await queue.start()
    await queue.wait_loaded()
    assert not await queue.ready()
    assert "unexpected keys" in (queue.failure() or "")
    with pytest.raises(UnavailableError, match="unexpected keys"):
        await queue.submit(make_job(b"x"))
    await queue.close()


# -- property: every accepted job resolved exactly once, no batch over its limit ----------------


class RecordingEngine:
    """Answers each job with its own request id after a short, variable delay."""

    def __init__(self, delays: list[float]) -> None:
        self.delays = delays
        self.batches: list[list[str]] = []

    async def run_batch(
        self, jobs: Sequence[Job], abandoned: Callable[[Job], bool] | None = None
    ) -> list[JobResult | ServiceError]:
        self.batches.append([j.request_id for j in jobs])
        await asyncio.sleep(self.delays[len(self.batches) % len(self.delays)])
        return [
            InvalidImageError(j.request_id)
            if j.request_id.endswith("bad")
            else JobResult(j.request_id.encode(), "image/png", [], [], {}, "v")
            for j in jobs
        ]

    def describe(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    max_batch_size=st.integers(1, 6),
    queue_size=st.integers(6, 12),
    concurrent=st.integers(1, 3),
    delays=st.lists(st.floats(0.0, 0.004), min_size=1, max_size=4),
    arrivals=st.lists(
        st.tuples(
            st.floats(0.0, 0.003), st.booleans(), st.sampled_from(["ok", "bad", "cancel", "late"])
        ),
        min_size=1,
        max_size=30,
    ),
)
def test_every_accepted_job_resolved_exactly_once(
    max_batch_size: int,
    queue_size: int,
    concurrent: int,
    delays: list[float],
    arrivals: list[tuple[float, bool, str]],
) -> None:
    asyncio.run(_property(max_batch_size, queue_size, concurrent, delays, arrivals))


async def _property(
    max_batch_size: int,
    queue_size: int,
    concurrent: int,
    delays: list[float],
    arrivals: list[tuple[float, bool, str]],
) -> None:
    engine = RecordingEngine(delays)
    queue = await started_queue(
        engine,
        max_batch_size=max_batch_size,
        max_batch_delay_ms=2.0,
        queue_size=max(queue_size, max_batch_size),
        max_concurrent_batches=concurrent,
    )
    tasks: dict[str, asyncio.Task[JobResult]] = {}
    for i, (gap, wait, kind) in enumerate(arrivals):
        rid = f"{i}-{kind}"
        timeout = 0.001 if kind == "late" else 30.0
        tasks[rid] = asyncio.create_task(queue.submit(make_job(b"img", rid, timeout=timeout)))
        if kind == "cancel":
            await asyncio.sleep(0)
            tasks[rid].cancel()
        if wait:
            await asyncio.sleep(gap)
    outcomes = await asyncio.wait_for(asyncio.gather(*tasks.values(), return_exceptions=True), 10)
    await queue.drain()
    await queue.close()

    seen = [rid for batch in engine.batches for rid in batch]
    assert len(seen) == len(set(seen)), "a job reached the engine twice"
    assert all(len(batch) <= max_batch_size for batch in engine.batches)
    for (rid, _), outcome in zip(tasks.items(), outcomes, strict=True):
        if isinstance(outcome, JobResult):
            assert outcome.body == rid.encode()  # its own answer
            assert rid in seen
        elif isinstance(outcome, InvalidImageError):
            assert outcome.detail == rid
        elif isinstance(outcome, OverloadedError):
            assert rid not in seen
        elif isinstance(outcome, DeadlineExceededError):
            assert rid.endswith("late")
        else:
            assert isinstance(outcome, asyncio.CancelledError), outcome
            assert rid.endswith("cancel")
        if rid.endswith(("ok", "bad")):
            assert isinstance(outcome, JobResult | InvalidImageError | OverloadedError), outcome
    assert queue.depth() == 0


@pytest.mark.cuda
async def test_engine_on_cuda_reports_gpu_memory(
    tiny_checkpoints: Any, pool: ThreadPoolExecutor
) -> None:
    colorizer = Colorizer.load(tiny_checkpoints, device="cuda", precision="fp16")
    engine = BatchEngine(colorizer, pool, max_pixels=LIMIT)
    try:
        await engine.warmup([1, 2])
        jobs = [make_job(corpus.png(64, 48, i), f"g{i}", boxes=[[2, 2, 40, 40]]) for i in range(4)]
        results = await engine.run_batch(jobs)
        assert all(isinstance(r, JobResult) for r in results)
        assert sample("colorize_gpu_memory_allocated_bytes") > 0
    finally:
        engine.close()
