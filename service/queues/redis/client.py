"""The API side of Redis mode: ``RedisJobQueue`` admits jobs into the stream and waits for answers.

The key layout, wire format and scripts it shares with the workers are in ``protocol``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from service.core.admission import CostModel, refusal
from service.core.errors import (
    DeadlineExceededError,
    NoWorkersError,
    OverloadedError,
    ServiceError,
    UnavailableError,
)
from service.core.jobs import Job, JobResult
from service.core.metrics import Metrics
from service.core.offload import off_loop_if_large
from service.core.tracing import carried, stage_span
from service.queues.redis.protocol import (
    ADMIT_SCRIPT,
    LIVE_SCRIPT,
    REDIS_ERRORS,
    QueueStats,
    RedisClock,
    RedisLayout,
    cache_digest,
    connect,
    decode_answer,
    ensure_group,
    job_fields,
    parse_worker_costs,
    publish_stats,
    read_model_info,
    read_stats,
    wait_or_timeout,
)
from service.settings import BatchingSettings, RedisSettings, default_of, values_for

if TYPE_CHECKING:
    from service.settings import ServiceSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RedisQueueConfig:
    """The API side's knobs: named and defaulted as in ``service.settings`` (``from_settings``)."""

    redis_url: str = default_of(RedisSettings, "redis_url")
    layout: RedisLayout = field(default_factory=RedisLayout)  # redis_prefix, redis_group
    queue_size: int = default_of(BatchingSettings, "queue_size")  # stream length refused at
    result_ttl_s: float = default_of(RedisSettings, "result_ttl_s")
    cache_enabled: bool = default_of(RedisSettings, "cache_enabled")
    cache_ttl_s: int = default_of(RedisSettings, "cache_ttl_s")
    cache_redis_url: str | None = default_of(RedisSettings, "cache_redis_url")  # None: the queue's
    retry_after_s: float = default_of(BatchingSettings, "retry_after_s")
    worker_alive_s: float = default_of(RedisSettings, "worker_alive_s")
    # Not settings: how often the stats (and the Redis clock) are refreshed, Redis connect
    # timeout, and whether admission needs a live worker (tests of the protocol alone: no).
    stats_interval_s: float = 1.0
    connect_timeout_s: float = 2.0
    require_live_worker: bool = True  # no live worker: not ready, and 503 no-workers at once

    @staticmethod
    def from_settings(settings: ServiceSettings, model: str | None = None) -> RedisQueueConfig:
        """``model``'s stream (default: the settings' default model)."""
        values = values_for(RedisQueueConfig, settings)  # every field named as its setting
        layout = RedisLayout.from_settings(settings, model or settings.default_model)
        return RedisQueueConfig(layout=layout, **values)


class RedisJobQueue:
    """``JobQueue`` over Redis: submit admits into the stream and blocks on the job's reply list.

    Each ``submit`` answers exactly once: the worker's answer, ``DeadlineExceededError`` when the
    deadline passes first (the job is then withdrawn), ``OverloadedError`` when the stream is full,
    ``UnavailableError`` when Redis cannot be reached. Nothing here loads the model or torch.
    """

    def __init__(
        self,
        config: RedisQueueConfig,
        metrics: Metrics | None = None,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``wall_clock``: what submitted jobs were stamped with (the router uses time.time());
        they are moved onto Redis server time (``self.clock``) before anything is compared."""
        self.config = config
        self.wall_clock = wall_clock
        self.layout = config.layout
        self.metrics = metrics
        self._client = connect(config.redis_url, config.connect_timeout_s)
        self._cache = (
            connect(config.cache_redis_url, config.connect_timeout_s)
            if config.cache_redis_url
            else self._client
        )
        self.clock = RedisClock()  # deadlines travel on Redis server time
        self._admit = self._client.register_script(ADMIT_SCRIPT)
        self._live_script = self._client.register_script(LIVE_SCRIPT)
        self._workers: list[CostModel] = []  # live workers' cost models, refreshed with the stats
        self._stats = QueueStats()
        self._model_info: dict[str, Any] | None = None  # refreshed by the stats task
        self._stats_task: asyncio.Task[None] | None = None
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._stop = asyncio.Event()

    async def start(self) -> None:
        """Never fails on an unreachable Redis: readiness stays false until it answers."""
        with contextlib.suppress(*REDIS_ERRORS):
            await self.clock.sync(self._client)
            await ensure_group(self._client, self.layout)
        self._stats_task = asyncio.create_task(self._refresh_stats(), name="redis-queue-stats")

    def depth(self) -> int:
        """Jobs in the shared stream not yet delivered to a worker, as last read from Redis."""
        return self._stats.waiting

    async def ready(self) -> bool:
        if self._closing:
            return False
        try:
            if not await asyncio.wait_for(self._client.ping(), self.config.connect_timeout_s):
                return False
            if self.config.require_live_worker:
                self._workers = await self._read_workers()
                return bool(self._workers)
            return True
        except REDIS_ERRORS:
            return False

    def describe(self) -> dict[str, Any]:
        """The model the workers serve, as they last published it, and the queue's state."""
        s = self._stats
        return {
            **(self._model_info or {}),
            "queue": "redis",
            "redis": {
                "stream": self.layout.stream,
                "group": self.layout.group,
                "stream_length": s.stream_length,
                "pending": s.pending,
                "consumers": s.consumers,
                "live_workers": len(self._workers),
                "max_queue": self.config.queue_size,
                "cache": self.config.cache_enabled,
            },
        }

    def failure(self) -> str | None:
        """Never permanent: an unreachable Redis is retried (``ready()`` says false meanwhile)."""
        return None

    async def submit(self, job: Job) -> JobResult:
        if self._closing:
            raise UnavailableError("the server is shutting down", retry_after=1)
        self._in_flight += 1
        self._idle.clear()
        try:
            # the job carries this span's context (traceparent in its stream entry's meta): the
            # worker's spans join the request's trace
            with stage_span("redis submit", kind="producer", **{"messaging.system": "redis",
                            "messaging.destination.name": self.layout.stream}):  # fmt: skip
                return await self._submit(carried(job))
        except REDIS_ERRORS as exc:
            log.warning("redis unavailable for %s: %s", job.request_id, exc)
            raise UnavailableError(
                "the job queue (Redis) is unreachable; retry shortly",
                retry_after=self.config.retry_after_s,
            ) from exc
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _submit(self, job: Job) -> JobResult:
        job = self.clock.to_redis(
            job, self.wall_clock
        )  # from here on, deadlines are on Redis server time
        cache_key = await self._cached_key(job)
        if cache_key is not None:
            frame = await self._cache.get(cache_key)
            if self.metrics is not None:
                result = "miss" if frame is None else "hit"
                self.metrics.cache_requests.labels(result=result).inc()
            if frame is not None:
                answer = decode_answer(frame)
                if isinstance(answer, JobResult):
                    return replace(answer, timings={}, cached=True)
        if job.deadline <= self.clock.now():
            raise DeadlineExceededError("the request deadline passed before it was queued")
        backlog_s = await self._admit_by_cost(job)
        token = uuid.uuid4().hex
        fields = job_fields(job, token)
        args: list[Any] = [self.config.queue_size]
        for name, value in fields.items():
            args += [name, value]
        admitted, value = await self._admit(keys=[self.layout.stream], args=args)
        if not admitted:
            raise OverloadedError(
                f"the job queue is full ({int(value)} jobs, limit {self.config.queue_size}); "
                "retry later",
                retry_after=max(self.config.retry_after_s, backlog_s),
            )
        entry_id = value
        reply = self.layout.reply(token)
        try:
            remaining = job.deadline - self.clock.now()
            popped = None
            if remaining > 0:
                # BLPOP's timeout is in seconds (fractions allowed); 0 would mean forever. The
                # outer bound covers a Redis that stops answering without closing the connection.
                popped = await asyncio.wait_for(
                    self._client.blpop([reply], timeout=max(remaining, 0.01)),
                    remaining + self.config.connect_timeout_s + 1.0,
                )
        except asyncio.CancelledError:  # the client went away: withdraw the job
            await asyncio.shield(self._withdraw(entry_id, token, job))
            raise
        if popped is None:
            await self._withdraw(entry_id, token, job)
            raise DeadlineExceededError(
                f"no worker answered within the deadline ({job.deadline - job.enqueued_at:.1f} s)"
            )
        answer = decode_answer(popped[1])
        if isinstance(answer, ServiceError):
            raise answer
        return answer

    async def _read_workers(self) -> list[CostModel]:
        reply = await self._live_script(
            keys=[self.layout.workers, self.layout.worker_costs],
            args=[self.config.worker_alive_s],
        )
        return parse_worker_costs(reply)

    async def _admit_by_cost(self, job: Job) -> float:
        """The backlog's estimated seconds; raises ``NoWorkersError`` with no live worker and
        ``OverloadedError`` when backlog plus this job cannot finish before its deadline.

        The backlog is the stream's length times the average job cost the workers measured,
        shared among the live workers (stream length as of the last stats read, <= 1 s old).
        """
        if not self.config.require_live_worker:
            return 0.0
        if not self._workers:  # none at the last look: ask Redis now before refusing
            self._workers = await self._read_workers()
        if not self._workers:
            raise NoWorkersError(
                f"no worker is alive (none sent a heartbeat in the last "
                f"{self.config.worker_alive_s:g} s); retry later",
                retry_after=max(self.config.retry_after_s, self.config.worker_alive_s),
            )
        cost = CostModel.mean(self._workers)
        if not cost.measured:
            return 0.0
        backlog_s = self._stats.stream_length * cost.seconds_per_job / len(self._workers)
        own_s = cost.estimate(job)
        retry_after = refusal(
            backlog_s, own_s, job.deadline - self.clock.now(), self.config.retry_after_s
        )
        if retry_after is not None:
            if self.metrics is not None:
                self.metrics.refused_by_cost.inc()
            raise OverloadedError(
                f"the work queued ahead ({backlog_s:.1f} s estimated over "
                f"{len(self._workers)} workers) and this request ({own_s:.1f} s) would not "
                "finish before its deadline; retry later",
                retry_after=retry_after,
            )
        return backlog_s

    async def _withdraw(self, entry_id: bytes, token: str, job: Job) -> None:
        """Mark a job nobody waits for: the worker that reads it skips it (and removes it).

        The entry itself stays: deleting an entry not yet delivered makes the group's lag unknown,
        which KEDA reads as 0 (protocol.RELEASE_LUA)."""
        ttl_ms = max(1000, int((job.deadline - self.clock.now()) * 1000) + 60_000)
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.set(self.layout.cancel(token), b"1", px=ttl_ms)
            pipe.delete(self.layout.reply(token))
            await pipe.execute()
        except REDIS_ERRORS as exc:
            log.warning("could not withdraw %s: %s", job.request_id, exc)

    async def _cached_key(self, job: Job) -> str | None:
        if not self.config.cache_enabled:
            return None
        version = await self._current_model_version()
        if version is None:
            return None
        # the sha256 of a large upload runs on a worker thread, not on the event loop
        digest = await off_loop_if_large(
            len(job.image), cache_digest, job.image, job.options, version
        )
        return self.layout.cache(digest)

    async def _current_model_version(self) -> str | None:
        """As the stats task last read it; asked of Redis only while no worker has published."""
        if self._model_info is None:
            self._model_info = await read_model_info(self._client, self.layout)
        return None if self._model_info is None else str(self._model_info.get("model_version"))

    async def _refresh_stats(self) -> None:
        while not self._stop.is_set():
            try:
                await self.clock.sync(self._client)
                self._stats = await read_stats(self._client, self.layout)
                self._model_info = await read_model_info(self._client, self.layout)
                if self.config.require_live_worker:
                    self._workers = await self._read_workers()
                if self.metrics is not None:
                    publish_stats(self.metrics, self._stats, self.layout)
            except REDIS_ERRORS as exc:
                log.debug("redis stats unavailable: %s", exc)
            await wait_or_timeout(self._stop, self.config.stats_interval_s)

    async def drain(self) -> None:
        """Stop admitting; wait for the answers of the jobs this replica already admitted."""
        self._closing = True
        await self._idle.wait()

    async def close(self) -> None:
        self._closing = True
        self._stop.set()
        if self._stats_task is not None:  # ends at its next tick (not cancelled mid-command)
            await self._stats_task
        if self._cache is not self._client:
            await self._cache.aclose()
        await self._client.aclose()
