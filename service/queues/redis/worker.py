"""The GPU worker of Redis mode: read batches from the job stream, run them, answer, acknowledge.

One worker process per GPU. Each loop turn: reclaim jobs that a dead worker left pending for longer
than ``claim_idle_ms`` (XAUTOCLAIM; a job handed out more than ``max_deliveries`` times goes to the
dead-letter stream instead), read up to ``max_batch_size`` new jobs (XREADGROUP, blocking at most
until the oldest job in hand has waited the batch delay since its admission: the rule of
``service.core.batching``, on Redis server time), skip withdrawn and expired jobs (504), run the rest
through the same ``BatchEngine`` as the in-process mode, and answer each job with XACK, the entry's
removal and RPUSH in one script (``protocol.RELEASE_LUA``: never a removal that hides the lag).
While a batch runs, a heartbeat keeps its entries' idle time low so that live
workers never reclaim each other's jobs, whatever the batch takes.

Deadlines are on Redis server time (``RedisClock``, refreshed by the stats loop): the API replica
stamped them so, and this host's own clock never decides whether a job expired.

Delivery is at least once (a job whose worker died is run again); answers are exactly once (only
the XACK that acknowledged the entry pushes one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from service.core.admission import CostModel
from service.core.batching import fill_wait
from service.core.errors import DeadlineExceededError, ProcessingFailedError
from service.core.jobs import Job, JobResult
from service.core.metrics import Metrics
from service.core.queue import BatchRunner
from service.queues.redis.protocol import (
    BEAT_SCRIPT,
    DEAD_LETTER_SCRIPT,
    FINISH_SCRIPT,
    REDIS_ERRORS,
    RELEASE_SCRIPT,
    TOUCH_SCRIPT,
    RedisClock,
    RedisLayout,
    as_text,
    cache_digest,
    encode_answer,
    ensure_group,
    job_from_fields,
    publish_stats,
    read_stats,
    wait_or_timeout,
)
from service.settings import (
    BatchingSettings,
    RedisSettings,
    auto_batch_size,
    default_of,
    values_for,
)

if TYPE_CHECKING:
    from service.settings import ServiceSettings

log = logging.getLogger(__name__)

Entry = tuple[bytes, dict[bytes, bytes]]


def _redis(name: str) -> Any:
    return default_of(RedisSettings, name)


def _batching(name: str) -> Any:
    return default_of(BatchingSettings, name)


@dataclass(frozen=True)
class WorkerConfig:
    """The worker's knobs: named and defaulted as in ``service.settings`` (``from_settings``)."""

    layout: RedisLayout = field(default_factory=RedisLayout)  # redis_prefix, redis_group
    max_batch_size: int = auto_batch_size("cuda")  # from_settings: resolved for the device
    max_batch_delay_ms: float = _batching("max_batch_delay_ms")  # from the oldest job's admission
    max_concurrent_batches: int = _batching("max_concurrent_batches")  # next batch read meanwhile
    claim_idle_ms: int = _redis("claim_idle_ms")
    max_deliveries: int = _redis("max_deliveries")
    result_ttl_s: float = _redis("result_ttl_s")
    cache_enabled: bool = _redis("cache_enabled")
    cache_ttl_s: int = _redis("cache_ttl_s")
    dead_letter_maxlen: int = _redis("dead_letter_maxlen")
    worker_heartbeat_s: float = _redis("worker_heartbeat_s")  # also the stats and clock refresh
    poll_ms: int = 1000  # not a setting: longest idle block, how soon an idle worker sees SIGTERM

    @staticmethod
    def from_settings(settings: ServiceSettings, model: str | None = None) -> WorkerConfig:
        """``model``'s stream (default: the settings' default model)."""
        values = values_for(WorkerConfig, settings)  # every field named as its setting
        values["max_batch_size"] = settings.resolved_max_batch_size()  # unset: per device
        layout = RedisLayout.from_settings(settings, model or settings.default_model)
        return WorkerConfig(layout=layout, **values)


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def parse_entries(response: Any) -> list[Entry]:
    """Entries of an XREADGROUP reply ([[stream, [(id, fields), ...]]])."""
    entries: list[Entry] = []
    for _stream, items in response or []:
        entries.extend((entry_id, fields) for entry_id, fields in items)
    return entries


class RedisWorker:
    def __init__(
        self,
        client: aioredis.Redis,
        engine: BatchRunner,
        config: WorkerConfig,
        *,
        model_info: dict[str, Any],
        metrics: Metrics | None = None,
        cache_client: aioredis.Redis | None = None,
        consumer: str | None = None,
        clock: RedisClock | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock``: Redis server time, what deadlines are compared with; ``wall_clock``: this
        host's clock, the one the engine measures with (jobs are moved onto it for the engine)."""
        self.client = client
        self.cache_client = cache_client or client
        self.engine = engine
        self.config = config
        self.layout = config.layout
        self.metrics = metrics
        self.model_info = model_info
        self.model_version = str(model_info["model_version"])
        self.consumer = consumer or consumer_name()
        self.clock = clock or RedisClock()
        self.wall_clock = wall_clock
        self._finish = client.register_script(FINISH_SCRIPT)
        self._release = client.register_script(RELEASE_SCRIPT)
        self._dead_letter = client.register_script(DEAD_LETTER_SCRIPT)
        self._touch = client.register_script(TOUCH_SCRIPT)
        self._beat = client.register_script(BEAT_SCRIPT)
        self.cost = CostModel()  # measured here, published with every heartbeat
        self._stopping = asyncio.Event()
        self._slots = asyncio.Semaphore(config.max_concurrent_batches)
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_claim = 0.0
        self._claim_cursor = "0-0"
        self._ready = False
        self.batches = 0  # batches handed to the engine (for tests and logs)

    def stop(self) -> None:
        """Graceful stop: read nothing more, finish the batches already read."""
        self._stopping.set()

    async def run(self) -> None:
        log.info("worker %s consuming %s (group %s)", self.consumer, self.layout.stream,
                 self.layout.group)  # fmt: skip
        stats = asyncio.create_task(self._stats_loop(), name="worker-stats")
        backoff = 0.1
        try:
            while not self._stopping.is_set():
                await self._slots.acquire()
                try:
                    if not self._ready:
                        await self._prepare()
                    entries = await self._collect()
                except REDIS_ERRORS as exc:
                    self._slots.release()
                    self._ready = False
                    if "NOGROUP" in str(exc):  # Redis restarted empty (or the group was deleted)
                        log.warning("consumer group missing (Redis restarted?): recreating")
                        continue
                    log.warning("redis unavailable, retrying in %.1f s: %s", backoff, exc)
                    await wait_or_timeout(self._stopping, backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                backoff = 0.1
                if not entries:
                    self._slots.release()
                    continue
                task = asyncio.create_task(self._process(entries), name="worker-batch")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            self._stopping.set()  # also when run() itself is cancelled: ends the stats loop
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await stats  # ends at its next tick: cancelling a task inside a redis-py call can
            # leave the cancellation swallowed by the client's own read timeout handling
            await self._leave()
            log.info("worker %s stopped after %d batches", self.consumer, self.batches)

    async def _prepare(self) -> None:
        await self.clock.sync(self.client)
        await ensure_group(self.client, self.layout)
        # Register at once (XREADGROUP only registers a consumer once it delivers something), so
        # the consumer count shows idle workers too.
        await self.client.xgroup_createconsumer(
            self.layout.stream, self.layout.group, self.consumer
        )
        await self._publish_model()
        await self._send_heartbeat()
        self._ready = True

    async def _send_heartbeat(self) -> None:
        """Tell the API replicas this worker is alive, with the costs it has measured."""
        await self._beat(
            keys=[self.layout.workers, self.layout.worker_costs],
            args=[self.consumer, json.dumps(self.cost.as_dict())],
        )

    async def _leave(self) -> None:
        """Graceful stop: at once no longer counted as a live worker."""
        with contextlib.suppress(*REDIS_ERRORS):
            pipe = self.client.pipeline(transaction=False)
            pipe.zrem(self.layout.workers, self.consumer)
            pipe.hdel(self.layout.worker_costs, self.consumer)
            await pipe.execute()

    async def _publish_model(self) -> None:
        await self.client.set(self.layout.model, json.dumps(self.model_info), px=60_000)

    # -- reading ------------------------------------------------------------------------------

    async def _collect(self) -> list[Entry]:
        """Up to max_batch_size entries: reclaimed ones first, then new ones."""
        cfg = self.config
        entries: list[Entry] = []
        if time.monotonic() >= self._next_claim:
            self._next_claim = time.monotonic() + max(0.05, cfg.claim_idle_ms / 2000)
            entries += await self._reclaim(cfg.max_batch_size)
        if len(entries) < cfg.max_batch_size:
            wait = None if entries else cfg.poll_ms
            entries += await self._read(cfg.max_batch_size - len(entries), wait)
        if not entries:
            return entries
        # A job is in: wait for more at most until the oldest has waited the batch delay.
        delay_s = cfg.max_batch_delay_ms / 1000
        oldest = min(self._admitted(fields) for _, fields in entries)
        while len(entries) < cfg.max_batch_size and not self._stopping.is_set():
            remaining_ms = int(fill_wait(oldest, delay_s, self.clock.now()) * 1000)
            if remaining_ms < 1:  # BLOCK 0 would wait forever
                break
            entries += await self._read(cfg.max_batch_size - len(entries), remaining_ms)
        return entries

    def _admitted(self, fields: dict[bytes, bytes]) -> float:
        """When the entry's job was admitted, on the Redis clock (now if it cannot be read:
        such an entry goes to dead-letter once the batch is processed)."""
        try:
            return float(json.loads(fields[b"meta"])["enqueued_at"])
        except (ValueError, KeyError, TypeError):
            return self.clock.now()

    async def _read(self, count: int, block_ms: int | None) -> list[Entry]:
        response = await self.client.xreadgroup(
            self.layout.group, self.consumer, {self.layout.stream: ">"}, count=count,
            block=block_ms,
        )  # fmt: skip
        return parse_entries(response)

    async def _reclaim(self, count: int) -> list[Entry]:
        """Take over jobs idle in a dead worker's hands; dead-letter those handed out too often."""
        layout = self.layout
        reply = await self.client.xautoclaim(
            layout.stream, layout.group, self.consumer, self.config.claim_idle_ms,
            start_id=self._claim_cursor, count=count,
        )  # fmt: skip
        cursor, claimed = reply[0], reply[1]
        self._claim_cursor = as_text(cursor)
        gone = [entry_id for entry_id, fields in claimed if not fields]
        if gone:  # withdrawn (XDEL) while pending; Redis 7 drops those itself, 6.2 returns them
            await self.client.xack(layout.stream, layout.group, *gone)
        claimed = [(entry_id, fields) for entry_id, fields in claimed if fields]
        if not claimed:
            return []
        pipe = self.client.pipeline(transaction=False)
        for entry_id, _ in claimed:
            pipe.xpending_range(layout.stream, layout.group, entry_id, entry_id, 1)
        pending = await pipe.execute()
        keep: list[Entry] = []
        for (entry_id, fields), info in zip(claimed, pending, strict=True):
            deliveries = int(info[0]["times_delivered"]) if info else 1
            log.warning("reclaimed %s (delivery %d)", entry_id.decode(), deliveries)
            if deliveries > self.config.max_deliveries:
                await self._send_to_dead_letter(
                    entry_id, fields, deliveries,
                    f"handed to a worker {deliveries} times without an answer "
                    f"(max_deliveries={self.config.max_deliveries}); the workers holding it died",
                )  # fmt: skip
            else:
                keep.append((entry_id, fields))
        return keep

    async def _send_to_dead_letter(
        self, entry_id: bytes, fields: dict[bytes, bytes], deliveries: int, reason: str
    ) -> None:
        token = fields.get(b"token", b"").decode(errors="replace")
        request_id = ""
        with contextlib.suppress(ValueError, KeyError, TypeError):
            request_id = str(json.loads(fields[b"meta"])["request_id"])
        error = ProcessingFailedError(
            f"the job failed repeatedly and was moved to the dead-letter stream: {reason}"
        )
        dead_fields: list[Any] = [
            "entry_id", entry_id, "request_id", request_id, "token", token,
            "deliveries", deliveries, "reason", reason, "consumer", self.consumer,
            "failed_at", self.clock.now(), "meta", fields.get(b"meta", b""),
            "image", fields.get(b"image", b""),
        ]  # fmt: skip
        layout = self.layout
        self._drop("dead_letter")
        await self._dead_letter(
            keys=[layout.stream, layout.reply(token), layout.dead],
            args=[layout.group, entry_id, encode_answer(error),
                  int(self.config.result_ttl_s * 1000), self.config.dead_letter_maxlen,
                  *dead_fields],
        )  # fmt: skip
        log.error("dead-lettered %s (request %s): %s", entry_id.decode(), request_id, reason)

    # -- processing ---------------------------------------------------------------------------

    async def _process(self, entries: list[Entry]) -> None:
        try:
            await self._process_batch(entries)
        except REDIS_ERRORS as exc:
            # Unanswered entries stay pending and are reclaimed (and run again) once Redis is back.
            log.warning("redis failed during a batch of %d: %s", len(entries), exc)
        except Exception:
            # An engine bug: leave the entries pending; a live worker reclaims them after
            # claim_idle_ms, and max_deliveries sends a job that keeps failing to dead-letter.
            log.exception("batch of %d failed; its jobs stay pending", len(entries))
        finally:
            self._slots.release()

    async def _process_batch(self, entries: list[Entry]) -> None:
        layout = self.layout
        parsed: list[tuple[bytes, str, Job]] = []
        for entry_id, fields in entries:
            try:
                token, job = job_from_fields(fields)
            except (ValueError, KeyError, TypeError) as exc:
                await self._send_to_dead_letter(entry_id, fields, 0, f"malformed job: {exc!r}")
                continue
            parsed.append((entry_id, token, job))
        if not parsed:
            return
        pipe = self.client.pipeline(transaction=False)
        for _, token, _ in parsed:
            pipe.exists(layout.cancel(token))
        cancelled = await pipe.execute()
        now = self.clock.now()
        live: list[tuple[bytes, str, Job]] = []
        skipped: list[tuple[bytes, str, bytes | None]] = []
        for (entry_id, token, job), withdrawn in zip(parsed, cancelled, strict=True):
            if withdrawn:
                self._drop("disconnected")
                skipped.append((entry_id, token, None))
            elif job.deadline <= now:
                waited = now - job.enqueued_at
                error = DeadlineExceededError(f"the job waited {waited:.1f} s, past its deadline")
                self._drop("deadline")
                skipped.append((entry_id, token, encode_answer(error)))
            else:
                live.append((entry_id, token, job))
        await self._answer(skipped)
        if not live:
            return
        self.batches += 1
        async with self._heartbeat([entry_id for entry_id, _, _ in live]):
            answers = await self.engine.run_batch(
                [self.clock.from_redis(job, self.wall_clock) for _, _, job in live]
            )
        self.cost.observe_batch(
            [(job, answer) for (_, _, job), answer in zip(live, answers, strict=True)
             if isinstance(answer, JobResult)]
        )  # fmt: skip
        frames = [encode_answer(answer) for answer in answers]
        if self.config.cache_enabled:
            # Before the answers, so that a client's next identical request hits.
            cache = self.cache_client.pipeline(transaction=False)
            for (_, _, job), answer, frame in zip(live, answers, frames, strict=True):
                if isinstance(answer, JobResult):
                    digest = cache_digest(job.image, job.options, self.model_version)
                    cache.set(layout.cache(digest), frame, ex=self.config.cache_ttl_s)
            with contextlib.suppress(*REDIS_ERRORS):  # a cache write failing loses nothing
                await cache.execute()
        await self._answer(
            [
                (entry_id, token, frame)
                for (entry_id, token, _), frame in zip(live, frames, strict=True)
            ]
        )

    async def _answer(self, answers: Sequence[tuple[bytes, str, bytes | None]]) -> None:
        """Acknowledge each entry and push its answer frame (None: acknowledge only), in one
        round trip; each push is gated by its own XACK (``FINISH_SCRIPT``)."""
        if not answers:
            return
        layout = self.layout
        ttl_ms = int(self.config.result_ttl_s * 1000)
        pipe = self.client.pipeline(transaction=False)
        for entry_id, token, frame in answers:
            if frame is None:
                await self._release(
                    keys=[layout.stream], args=[layout.group, entry_id], client=pipe
                )
            else:
                await self._finish(
                    keys=[layout.stream, layout.reply(token), layout.cancel(token)],
                    args=[layout.group, entry_id, frame, ttl_ms],
                    client=pipe,
                )
        await pipe.execute()

    @contextlib.asynccontextmanager
    async def _heartbeat(self, entry_ids: Sequence[bytes]) -> AsyncIterator[None]:
        """While the block runs, keep the entries' idle time low so nobody reclaims them."""

        done = asyncio.Event()

        async def beat() -> None:
            interval = max(0.05, self.config.claim_idle_ms / 3000)
            while not await wait_or_timeout(done, interval):
                with contextlib.suppress(*REDIS_ERRORS):
                    await self._touch(
                        keys=[self.layout.stream],
                        args=[self.layout.group, self.consumer, *entry_ids],
                    )

        task = asyncio.create_task(beat(), name="worker-heartbeat")
        try:
            yield
        finally:
            done.set()  # not cancel(): see run()
            await task

    def _drop(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.dropped.labels(reason=reason).inc()

    # -- housekeeping -------------------------------------------------------------------------

    async def _stats_loop(self) -> None:
        last_publish = last_cleanup = 0.0
        while not self._stopping.is_set():
            try:
                await self.clock.sync(self.client)
                stats = await read_stats(self.client, self.layout)
                if self.metrics is not None:
                    publish_stats(self.metrics, stats, self.layout)
                now = time.monotonic()
                if self._ready:
                    await self._send_heartbeat()
                if self._ready and now - last_publish > 10:
                    await self._publish_model()
                    last_publish = now
                if self._ready and now - last_cleanup > 30:
                    await self._forget_dead_consumers()
                    last_cleanup = now
            except REDIS_ERRORS as exc:
                log.debug("redis stats unavailable: %s", exc)
            await wait_or_timeout(self._stopping, self.config.worker_heartbeat_s)

    async def _forget_dead_consumers(self) -> None:
        """Drop consumers that hold nothing and were not seen for a long time (dead workers)."""
        idle_limit = max(60_000, 10 * self.config.claim_idle_ms)
        try:
            consumers = await self.client.xinfo_consumers(self.layout.stream, self.layout.group)
        except ResponseError:
            return
        for consumer in consumers:
            name = as_text(consumer["name"])
            if name != self.consumer and consumer["pending"] == 0 and consumer["idle"] > idle_limit:
                await self.client.xgroup_delconsumer(self.layout.stream, self.layout.group, name)
