"""The Redis queue: API replicas admit jobs into a stream, GPU workers answer on per-job lists.

Layout, for a key prefix ``P`` (``COLORIZE_REDIS_PREFIX``, default ``colorize``) and consumer group
``G`` (``COLORIZE_REDIS_GROUP``):

- ``P:jobs``: stream of waiting and in-process jobs. Fields: ``token`` (the reply token, unique per
  admitted job), ``meta`` (the job as JSON, without the image), ``image`` (raw bytes). Workers read
  it through group ``G`` (created at id 0 with MKSTREAM, by whichever process comes first) and
  delete an entry once it is answered, so the stream length is the backlog: admission refuses a job
  when it has reached ``max_queue`` (atomically, in a Lua script).
- ``P:reply:<token>``: list holding the one answer for a job (a result or an error), pushed by the
  worker together with XACK and XDEL in one Lua script, only if the XACK acknowledged the entry: a
  job that two workers both processed (after a reclaim) is still answered once. The API replica that
  admitted the job blocks on it with BLPOP (no polling); the list expires after ``result_ttl_s``.
- ``P:cancel:<token>``: set by the API when its client went away or its deadline passed; workers
  skip such jobs. Expires with the deadline.
- ``P:dead``: dead-letter stream (capped). A job delivered more than ``max_deliveries`` times (its
  workers died holding it) or that cannot be parsed lands here, and its client gets a
  ``processing-failed`` error.
- ``P:cache:<sha256>``: encoded result keyed by image bytes, request options and model version,
  with a TTL (``cache_ttl_s``). May live in another Redis (``COLORIZE_CACHE_REDIS_URL``).
- ``P:workers``: sorted set of live workers, scored by their last heartbeat (Redis server time,
  so hosts' clocks do not matter); ``P:worker-costs``: hash worker -> its measured cost model
  (``service.admission``). A worker not heard from for ``worker_alive_s`` is dropped from both.
- ``P:model``: JSON description of the model the workers serve (``describe()``), refreshed by every
  worker; the API needs the model version for cache keys without loading the model.

Answers travel as one frame: a JSON header line, ``\\n``, then the raw image bytes (no base64).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError, ResponseError

from service.admission import CostModel, refusal
from service.errors import (
    DeadlineExceededError,
    NoWorkersError,
    OverloadedError,
    ServiceError,
    UnavailableError,
)
from service.jobs import Job, JobOptions, JobResult
from service.metrics import Metrics

if TYPE_CHECKING:
    from service.settings import ServiceSettings

log = logging.getLogger(__name__)

# OSError includes TimeoutError (what asyncio.wait_for raises): an unanswered command counts too.
REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, OSError)


# ---------------------------------------------------------------------------------------------
# Layout and wire format (shared by the API side and the worker)


@dataclass(frozen=True)
class RedisLayout:
    """Key names for one deployment (a prefix) and the consumer group name."""

    prefix: str = "colorize"
    group: str = "workers"

    @property
    def stream(self) -> str:
        return f"{self.prefix}:jobs"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def model(self) -> str:
        return f"{self.prefix}:model"

    def reply(self, token: str) -> str:
        return f"{self.prefix}:reply:{token}"

    def cancel(self, token: str) -> str:
        return f"{self.prefix}:cancel:{token}"

    def cache(self, digest: str) -> str:
        return f"{self.prefix}:cache:{digest}"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def worker_costs(self) -> str:
        return f"{self.prefix}:worker-costs"


def job_fields(job: Job, token: str) -> dict[str, bytes | str]:
    meta = asdict(job)
    del meta["image"]
    return {"token": token, "meta": json.dumps(meta), "image": job.image}


def job_from_fields(fields: dict[bytes, bytes]) -> tuple[str, Job]:
    """The reply token and the job of a stream entry; raises ValueError/KeyError if malformed."""
    token = fields[b"token"].decode()
    meta = json.loads(fields[b"meta"])
    job = Job(
        request_id=str(meta["request_id"]),
        image=fields[b"image"],
        options=JobOptions(**meta["options"]),
        deadline=float(meta["deadline"]),
        enqueued_at=float(meta["enqueued_at"]),
        pixels=int(meta.get("pixels", 0)),
    )
    return token, job


def encode_answer(answer: JobResult | ServiceError) -> bytes:
    """One frame: JSON header, newline, body bytes (json.dumps never emits a raw newline)."""
    if isinstance(answer, ServiceError):
        return json.dumps({"error": answer.to_dict()}).encode() + b"\n"
    header = asdict(answer)
    del header["body"]
    return json.dumps({"result": header}).encode() + b"\n" + answer.body


def decode_answer(frame: bytes | str) -> JobResult | ServiceError:
    if isinstance(frame, str):  # only with decode_responses=True, which this module never sets
        frame = frame.encode()
    head, _, body = frame.partition(b"\n")
    header = json.loads(head)
    if "error" in header:
        return ServiceError.from_dict(header["error"])
    return JobResult(body=body, **header["result"])


def cache_digest(image: bytes, options: JobOptions, model_version: str) -> str:
    """What identifies a result: the exact input bytes, every option, and the model version."""
    digest = hashlib.sha256()
    digest.update(model_version.encode())
    digest.update(b"\0")
    digest.update(json.dumps(asdict(options), sort_keys=True).encode())
    digest.update(b"\0")
    digest.update(image)
    return digest.hexdigest()


# KEYS[1] stream; ARGV[1] limit (0: none), ARGV[2..] field/value pairs.
# Returns {1, id} when admitted, {0, length} when the stream is full.
ADMIT_SCRIPT = """
local n = redis.call('XLEN', KEYS[1])
local limit = tonumber(ARGV[1])
if limit > 0 and n >= limit then return {0, n} end
return {1, redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))}
"""

# KEYS[1] stream, KEYS[2] reply list, KEYS[3] cancel marker; ARGV[1] group, ARGV[2] entry id,
# ARGV[3] frame, ARGV[4] reply ttl ms. Answers only if this call acknowledged the entry (exactly
# one answer per job, even when two workers processed it) and nobody withdrew the job.
FINISH_SCRIPT = """
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if acked == 1 and redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('RPUSH', KEYS[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
return acked
"""

# KEYS[1] stream, KEYS[2] reply list, KEYS[3] dead-letter stream; ARGV[1] group, ARGV[2] entry id,
# ARGV[3] error frame, ARGV[4] reply ttl ms, ARGV[5] dead-letter maxlen, ARGV[6..] dead fields.
DEAD_LETTER_SCRIPT = """
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if acked == 1 then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', unpack(ARGV, 6))
  redis.call('RPUSH', KEYS[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
return acked
"""

# KEYS[1] stream; ARGV[1] group, ARGV[2] consumer, ARGV[3..] entry ids.
# Resets the idle time of the entries this consumer still owns (heartbeat while a batch runs),
# without taking over entries another worker has reclaimed meanwhile.
TOUCH_SCRIPT = """
local touched = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    touched = touched + 1
  end
end
return touched
"""


# KEYS[1] workers zset, KEYS[2] costs hash; ARGV[1] consumer, ARGV[2] cost JSON. Server time, so
# the clocks of the workers' and the API's hosts never matter.
BEAT_SCRIPT = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(t[1]) + tonumber(t[2]) / 1000000, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

# KEYS[1] workers zset, KEYS[2] costs hash; ARGV[1] seconds a worker counts as alive after its
# last heartbeat. Forgets the others; returns the cost JSON of each live worker.
LIVE_SCRIPT = """
local t = redis.call('TIME')
local oldest = tonumber(t[1]) + tonumber(t[2]) / 1000000 - tonumber(ARGV[1])
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', oldest)
for _, name in ipairs(gone) do redis.call('HDEL', KEYS[2], name) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', oldest)
local live = redis.call('ZRANGE', KEYS[1], 0, -1)
if #live == 0 then return {} end
return redis.call('HMGET', KEYS[2], unpack(live))
"""


def parse_worker_costs(reply: Any) -> list[CostModel]:
    """The LIVE_SCRIPT reply: one cost model per live worker (unmeasured if unreadable)."""
    models = []
    for raw in reply or []:
        try:
            models.append(CostModel.from_dict(json.loads(raw)))
        except (TypeError, ValueError):
            models.append(CostModel())
    return models


async def ensure_group(client: aioredis.Redis, layout: RedisLayout) -> None:
    """Create the stream and its consumer group (at id 0: jobs admitted before it are kept)."""
    try:
        await client.xgroup_create(layout.stream, layout.group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def as_text(value: bytes | str) -> str:
    """A name or id from a Redis reply (bytes: this module never sets decode_responses)."""
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class QueueStats:
    stream_length: int = 0  # waiting + in-process jobs
    pending: int = 0  # delivered to a worker, not yet answered
    consumers: int = 0  # workers registered in the group

    @property
    def waiting(self) -> int:
        """Jobs not yet delivered to a worker."""
        return max(0, self.stream_length - self.pending)


async def read_stats(client: aioredis.Redis, layout: RedisLayout) -> QueueStats:
    pipe = client.pipeline(transaction=False)
    pipe.xlen(layout.stream)
    pipe.xinfo_groups(layout.stream)
    try:
        length, groups = await pipe.execute()
    except ResponseError:  # no stream yet
        return QueueStats()
    for group in groups:
        if as_text(group["name"]) == layout.group:
            return QueueStats(int(length), int(group["pending"]), int(group["consumers"]))
    return QueueStats(int(length))


async def wait_or_timeout(event: asyncio.Event, seconds: float) -> bool:
    """Sleep up to ``seconds``, waking early when ``event`` is set; whether it is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
    return event.is_set()


def publish_stats(metrics: Metrics, stats: QueueStats) -> None:
    metrics.redis_stream_length.set(stats.stream_length)
    metrics.redis_pending.set(stats.pending)
    metrics.redis_consumers.set(stats.consumers)
    metrics.queue_depth.set(stats.waiting)


async def read_model_info(client: aioredis.Redis, layout: RedisLayout) -> dict[str, Any] | None:
    raw = await client.get(layout.model)
    return None if raw is None else dict(json.loads(raw))


# ---------------------------------------------------------------------------------------------
# API side


@dataclass(frozen=True)
class RedisQueueConfig:
    url: str = "redis://127.0.0.1:6379/0"
    layout: RedisLayout = field(default_factory=RedisLayout)
    max_queue: int = 256  # stream length at which admission refuses (503 overloaded)
    result_ttl_s: float = 60.0
    cache_enabled: bool = True
    cache_ttl_s: int = 3600
    cache_url: str | None = None  # None: the queue's Redis
    retry_after_s: float = 1.0
    stats_interval_s: float = 1.0
    connect_timeout_s: float = 2.0
    worker_alive_s: float = 5.0  # a heartbeat older than this: the worker is gone
    require_live_worker: bool = True  # no live worker: not ready, and 503 no-workers at once

    @staticmethod
    def from_settings(settings: ServiceSettings) -> RedisQueueConfig:
        return RedisQueueConfig(
            url=settings.redis_url,
            layout=RedisLayout(settings.redis_prefix, settings.redis_group),
            max_queue=settings.queue_size,
            result_ttl_s=settings.result_ttl_s,
            cache_enabled=settings.cache_enabled,
            cache_ttl_s=settings.cache_ttl_s,
            cache_url=settings.cache_redis_url,
            retry_after_s=settings.retry_after_s,
            worker_alive_s=settings.worker_alive_s,
        )


def connect(
    url: str, connect_timeout_s: float = 2.0, socket_timeout_s: float | None = None
) -> aioredis.Redis:
    """A client for the queue: retries a command twice on a fresh connection, then fails.

    The retry covers pooled connections that went stale when Redis restarted. A retried command
    may have run once already: that is safe for everything sent here (XACK-gated answers run
    once; a job admitted twice is processed twice but answered once, on its one reply list).
    ``socket_timeout_s`` must exceed the longest blocking command the client sends; None (the
    API side) leaves reads unbounded because each BLPOP is bounded by its job's deadline.
    """
    return aioredis.Redis.from_url(
        url,
        retry=Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), 2),
        socket_connect_timeout=connect_timeout_s,
        socket_timeout=socket_timeout_s,
        socket_keepalive=True,
        health_check_interval=15,
    )


class RedisJobQueue:
    """``JobQueue`` over Redis: submit admits into the stream and blocks on the job's reply list.

    Each ``submit`` answers exactly once: the worker's answer, ``DeadlineExceededError`` when the
    deadline passes first (the job is then withdrawn), ``OverloadedError`` when the stream is full,
    ``UnavailableError`` when Redis cannot be reached. Nothing here loads the model or torch.
    """

    def __init__(self, config: RedisQueueConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.layout = config.layout
        self.metrics = metrics
        self._client = connect(config.url, config.connect_timeout_s)
        self._cache = (
            connect(config.cache_url, config.connect_timeout_s)
            if config.cache_url
            else self._client
        )
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
                "max_queue": self.config.max_queue,
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
            return await self._submit(job)
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
        if job.deadline <= time.time():
            raise DeadlineExceededError("the request deadline passed before it was queued")
        backlog_s = await self._admit_by_cost(job)
        token = uuid.uuid4().hex
        fields = job_fields(job, token)
        args: list[Any] = [self.config.max_queue]
        for name, value in fields.items():
            args += [name, value]
        admitted, value = await self._admit(keys=[self.layout.stream], args=args)
        if not admitted:
            raise OverloadedError(
                f"the job queue is full ({int(value)} jobs, limit {self.config.max_queue}); "
                "retry later",
                retry_after=max(self.config.retry_after_s, backlog_s),
            )
        entry_id = value
        reply = self.layout.reply(token)
        try:
            remaining = job.deadline - time.time()
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
            backlog_s, own_s, job.deadline - time.time(), self.config.retry_after_s
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
        """Remove a job nobody waits for: unread entries go away, held ones are skipped."""
        ttl_ms = max(1000, int((job.deadline - time.time()) * 1000) + 60_000)
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.xdel(self.layout.stream, entry_id)
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
        return self.layout.cache(cache_digest(job.image, job.options, version))

    async def _current_model_version(self) -> str | None:
        """As the stats task last read it; asked of Redis only while no worker has published."""
        if self._model_info is None:
            self._model_info = await read_model_info(self._client, self.layout)
        return None if self._model_info is None else str(self._model_info.get("model_version"))

    async def _refresh_stats(self) -> None:
        while not self._stop.is_set():
            try:
                self._stats = await read_stats(self._client, self.layout)
                self._model_info = await read_model_info(self._client, self.layout)
                if self.config.require_live_worker:
                    self._workers = await self._read_workers()
                if self.metrics is not None:
                    publish_stats(self.metrics, self._stats)
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
