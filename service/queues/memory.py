"""The in-process dynamic batcher (modelled on Triton's dynamic batcher and TEI's queue).

Requests wait in a bounded queue. The batch loop takes up to ``max_batch_size`` of them, waiting
at most ``max_batch_delay_ms`` after the oldest one arrived for the batch to fill, and hands the
batch to the engine. Up to ``max_concurrent_batches`` batches are in progress at once: while one
is on the device, the next one decodes on the CPU pool (the engine's device thread keeps predicts
in order). Entries whose caller went away or whose deadline passed never reach the engine.

``service.core.queue.JobQueue`` is the interface the router uses; the Redis client implements it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from service.core.admission import CostModel, refusal
from service.core.batching import fill_wait
from service.core.errors import (
    DeadlineExceededError,
    InternalError,
    OverloadedError,
    ServiceError,
    UnavailableError,
)
from service.core.jobs import DEFAULT_MODEL, Job, JobResult
from service.core.metrics import METRICS, Metrics
from service.core.queue import BatchRunner
from service.core.tracing import carried
from service.settings import BatchingSettings, default_of

if TYPE_CHECKING:
    from service.settings import ServiceSettings

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    job: Job
    future: asyncio.Future[JobResult]
    admitted: float = field(default_factory=time.monotonic)
    dropped: str | None = None  # why the caller gave up: deadline or disconnected
    cost: float = 0.0  # estimated seconds of work (service.core.admission)


class InProcessQueue:
    """Bounded queue plus batch loop in this process; ``load`` builds (and warms up) the engine."""

    def __init__(
        self,
        load: Callable[[], Awaitable[BatchRunner]],
        *,
        max_batch_size: int,
        max_batch_delay_ms: float,
        queue_size: int,
        max_concurrent_batches: int = default_of(BatchingSettings, "max_concurrent_batches"),
        retry_after_s: float = default_of(BatchingSettings, "retry_after_s"),
        drain_timeout_s: float = default_of(BatchingSettings, "drain_timeout_s"),
        metrics: Metrics = METRICS,
        model: str = DEFAULT_MODEL,
    ) -> None:
        self._load = load
        self.model = model  # the label of its queue-depth gauge
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_ms / 1000.0
        self.queue_size = queue_size
        self.max_concurrent_batches = max_concurrent_batches
        self.retry_after_s = retry_after_s
        self.drain_timeout_s = drain_timeout_s
        self.metrics = metrics
        self.engine: BatchRunner | None = None
        self._entries: deque[_Entry] = deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._slots = asyncio.Semaphore(max_concurrent_batches)
        self._running: set[asyncio.Task[None]] = set()
        self._held = 0  # entries taken off the queue and not yet resolved
        self._loader: asyncio.Task[None] | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._draining = False
        self._closed = False
        self._failure: str | None = None
        self._batch_seconds = 0.0  # moving average, for Retry-After
        self.cost = CostModel()  # learnt from the engine's stage timings
        self._backlog_s = 0.0  # estimated seconds of the admitted, unfinished entries

    # -- JobQueue -------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loader = asyncio.create_task(self._load_engine(), name="load-engine")

    async def wait_loaded(self) -> None:
        """Wait for the background load to end (successfully or not)."""
        if self._loader is not None:
            await asyncio.shield(self._loader)

    async def ready(self) -> bool:
        return self.engine is not None and not self._draining and not self._closed

    @classmethod
    def from_settings(
        cls,
        load: Callable[[], Awaitable[BatchRunner]],
        settings: ServiceSettings,
        model: str | None = None,
    ) -> InProcessQueue:
        """A queue for ``model`` (default: the settings' default) with the knobs of ``settings``."""
        return cls(
            load,
            max_batch_size=settings.resolved_max_batch_size(),
            max_batch_delay_ms=settings.max_batch_delay_ms,
            queue_size=settings.queue_size,
            max_concurrent_batches=settings.max_concurrent_batches,
            retry_after_s=settings.retry_after_s,
            drain_timeout_s=settings.drain_timeout_s,
            model=model or settings.default_model,
        )

    def failure(self) -> str | None:
        """Why the queue can never become ready (the weights failed to load), else None."""
        return self._failure

    def depth(self) -> int:
        return len(self._entries)

    def describe(self) -> dict[str, Any]:
        return {} if self.engine is None else {**self.engine.describe(), "queue": "memory"}

    async def submit(self, job: Job) -> JobResult:
        if self._draining or self._closed:
            raise UnavailableError("the service is shutting down", retry_after=self.retry_after_s)
        if self.engine is None:
            detail = self._failure or "the model is still loading"
            raise UnavailableError(detail, retry_after=self.retry_after_s)
        if len(self._entries) >= self.queue_size:
            raise OverloadedError(
                f"the queue is full ({self.queue_size} requests waiting); retry later",
                retry_after=self._retry_after(),
            )
        job = carried(job)  # the request's trace context, for the engine's spans (tracing on)
        entry = _Entry(job, asyncio.get_running_loop().create_future(), cost=self._admit_cost(job))
        self._backlog_s += entry.cost
        entry.future.add_done_callback(lambda _: self._settle(entry))
        self._entries.append(entry)
        self._changed()
        try:
            timeout = max(0.0, job.deadline - time.time())
            return await asyncio.wait_for(asyncio.shield(entry.future), timeout)
        except TimeoutError:
            self._give_up(entry, "deadline")
            raise DeadlineExceededError("the request was not served before its deadline") from None
        except asyncio.CancelledError:  # the caller went away
            self._give_up(entry, "disconnected")
            raise

    async def drain(self) -> None:
        self._draining = True
        try:
            await asyncio.wait_for(self._wait_empty(), self.drain_timeout_s)
        except TimeoutError:
            log.warning("drain timed out after %.1f s", self.drain_timeout_s)
        self._fail_waiting(UnavailableError("the service shut down before serving the request"))

    async def close(self) -> None:
        self._closed = True
        self._fail_waiting(UnavailableError("the service shut down before serving the request"))
        for task in (self._loader, self._loop_task, *self._running):
            if task is not None and not task.done():
                task.cancel()
        for task in (self._loader, self._loop_task, *self._running):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.engine is not None:
            await asyncio.to_thread(self.engine.close)

    def backlog_seconds(self) -> float:
        """Estimated seconds of work admitted and not finished (for /info and tests)."""
        return self._backlog_s

    # -- internals ------------------------------------------------------------------------------

    def _admit_cost(self, job: Job) -> float:
        """The job's estimated cost; refuses it (503) if it cannot finish before its deadline."""
        if not self.cost.measured:
            return 0.0
        cost = self.cost.estimate(job)
        backlog = self._backlog_s
        retry_after = refusal(backlog, cost, job.deadline - time.time(), self.retry_after_s)
        if retry_after is not None:
            self.metrics.refused_by_cost.inc()
            raise OverloadedError(
                f"the work queued ahead ({backlog:.1f} s estimated) and this request "
                f"({cost:.1f} s) would not finish before its deadline; retry later",
                retry_after=retry_after,
            )
        return cost

    def _settle(self, entry: _Entry) -> None:
        self._backlog_s = max(0.0, self._backlog_s - entry.cost)

    async def _load_engine(self) -> None:
        try:
            engine = await self._load()
        except Exception as exc:
            self._failure = f"the model failed to load: {exc}"
            log.exception("the model failed to load")
            return
        self.engine = engine
        self._loop_task = asyncio.create_task(self._batch_loop(), name="batch-loop")
        log.info("ready: model %s", engine.describe().get("model_version"))

    def _changed(self) -> None:
        self.metrics.queue_depth.labels(model=self.model).set(len(self._entries))
        self._wakeup.set()
        if self._entries or self._held:
            self._idle.clear()
        else:
            self._idle.set()

    def _give_up(self, entry: _Entry, reason: str) -> None:
        """The caller stopped waiting: free its queue slot, keep it off the device if possible."""
        entry.dropped = reason
        entry.future.cancel()
        try:
            self._entries.remove(entry)
        except ValueError:
            return  # a batch holds it: dropped there if the batch has not started yet
        self.metrics.dropped.labels(reason=reason).inc()
        self._changed()

    def _fail_waiting(self, error: ServiceError) -> None:
        while self._entries:
            entry = self._entries.popleft()
            if not entry.future.done():
                self.metrics.dropped.labels(reason="shutdown").inc()
                entry.future.set_exception(error)
        self._changed()

    async def _wait_empty(self) -> None:
        while self._entries or self._held:
            self._idle.clear()
            await self._idle.wait()

    def _retry_after(self) -> float:
        batches_ahead = math.ceil(len(self._entries) / self.max_batch_size)
        estimate = batches_ahead * self._batch_seconds / self.max_concurrent_batches
        return max(self.retry_after_s, estimate)

    def _take(self) -> _Entry | None:
        """The oldest live entry, dropping expired ones (cancelled ones were already removed)."""
        while self._entries:
            entry = self._entries.popleft()
            if entry.future.done():
                continue
            if time.time() > entry.job.deadline:
                self.metrics.dropped.labels(reason="deadline").inc()
                entry.future.set_exception(
                    DeadlineExceededError("the request's deadline passed while it was queued")
                )
                continue
            self._held += 1
            return entry
        return None

    async def _collect(self) -> list[_Entry]:
        """The next batch: waits for a first entry, then at most the delay for more."""
        batch: list[_Entry] = []
        while not batch:
            first = self._take()
            if first is None:
                self._changed()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch.append(first)
        while len(batch) < self.max_batch_size:
            entry = self._take()
            if entry is not None:
                batch.append(entry)
                continue
            remaining = fill_wait(batch[0].admitted, self.max_batch_delay_s, time.monotonic())
            if remaining <= 0:
                break
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)
        return batch

    async def _batch_loop(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch = await self._collect()
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.create_task(self._run(batch))
            self._running.add(task)
            self._changed()

    async def _run(self, taken: list[_Entry]) -> None:
        start = time.monotonic()
        batch = []
        for entry in taken:  # callers that gave up while the batch was filling
            if entry.future.done():
                self.metrics.dropped.labels(reason=entry.dropped or "disconnected").inc()
            else:
                batch.append(entry)
        outcomes: list[JobResult | ServiceError] = []
        try:
            if batch:
                assert self.engine is not None
                waiting = {id(e.job): e for e in batch}
                outcomes = await self.engine.run_batch(
                    [e.job for e in batch], abandoned=lambda job: waiting[id(job)].future.done()
                )
                self.cost.observe_batch(
                    [(e.job, o) for e, o in zip(batch, outcomes, strict=False)
                     if isinstance(o, JobResult)]
                )  # fmt: skip
        except Exception:
            log.exception("a batch of %d failed", len(batch))
            outcomes = [InternalError("the batch failed") for _ in batch]
        finally:  # also on cancellation (close): nobody is left waiting forever
            self._slots.release()
            for i, entry in enumerate(batch):
                if entry.future.done():
                    continue
                outcome = outcomes[i] if i < len(outcomes) else None
                if isinstance(outcome, JobResult):
                    entry.future.set_result(outcome)
                else:
                    entry.future.set_exception(
                        outcome or UnavailableError("the service shut down during the request")
                    )
            self._held -= len(taken)
            task = asyncio.current_task()
            if task is not None:
                self._running.discard(task)
            self._changed()
        elapsed = time.monotonic() - start
        self._batch_seconds = (
            elapsed if not self._batch_seconds else 0.8 * self._batch_seconds + 0.2 * elapsed
        )
