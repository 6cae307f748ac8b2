"""The Redis protocol shared by API replicas and GPU workers: key layout, wire format, scripts.

API replicas admit jobs into a stream, GPU workers answer on per-job lists.

Layout, for a key prefix ``P`` (``COLORIZE_REDIS_PREFIX``, default ``colorize``) and consumer group
``G`` (``COLORIZE_REDIS_GROUP``):

- One stream, group, model record and worker set per model: the keys below are those of the
  default model (``instcolor``); another model ``M`` has ``P:jobs:M``, ``P:model:M``,
  ``P:workers:M`` and ``P:worker-costs:M`` (``RedisLayout.model``). A worker loading models
  ``a,b`` consumes both streams; an API replica puts a job on its model's stream, so a worker only
  ever receives jobs of a model it loaded, and each stream's lag (what KEDA scales on) counts only
  that model's jobs.
- ``P:jobs``: stream of waiting and in-process jobs. Fields: ``token`` (the reply token, unique per
  admitted job), ``meta`` (the job as JSON, without the image), ``image`` (raw bytes). Workers read
  it through group ``G`` (created at id 0 with MKSTREAM, by whichever process comes first) and
  remove an entry once it is answered, so the stream length is the backlog: admission refuses a job
  when it has reached ``max_queue`` (atomically, in a Lua script). An entry not yet delivered is
  never deleted (a withdrawn job stays until a worker reads and skips it): the group's lag, which
  KEDA scales the workers on, is exact only while no entry after the group's last-delivered id is
  deleted (``RELEASE_LUA``; docs/kubernetes.md).
- ``P:reply:<token>``: list holding the one answer for a job (a result or an error), pushed by the
  worker together with XACK and the entry's removal in one Lua script, only if the XACK acknowledged the entry: a
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
  (``service.core.admission``). A worker not heard from for ``worker_alive_s`` is dropped from both.
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
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError, ResponseError

from service.core.admission import CostModel
from service.core.errors import (
    ServiceError,
)
from service.core.jobs import DEFAULT_MODEL, Job, JobOptions, JobResult
from service.core.metrics import Metrics
from service.settings import RedisSettings, default_of

log = logging.getLogger(__name__)

# OSError includes TimeoutError (what asyncio.wait_for raises): an unanswered command counts too.
REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, OSError)


@dataclass(frozen=True)
class RedisLayout:
    """Key names for one deployment (a prefix) and the consumer group name."""

    prefix: str = default_of(RedisSettings, "redis_prefix")
    group: str = default_of(RedisSettings, "redis_group")
    model_name: str = DEFAULT_MODEL  # whose stream, model record and worker set

    @staticmethod
    def from_settings(settings: RedisSettings, model: str = DEFAULT_MODEL) -> RedisLayout:
        return RedisLayout(settings.redis_prefix, settings.redis_group, model)

    def _of_model(self, key: str) -> str:
        """``P:key`` for the default model (the names before models existed), else ``P:key:M``."""
        if self.model_name == DEFAULT_MODEL:
            return f"{self.prefix}:{key}"
        return f"{self.prefix}:{key}:{self.model_name}"

    @property
    def stream(self) -> str:
        return self._of_model("jobs")

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def model(self) -> str:
        return self._of_model("model")

    def reply(self, token: str) -> str:
        return f"{self.prefix}:reply:{token}"

    def cancel(self, token: str) -> str:
        return f"{self.prefix}:cancel:{token}"

    def cache(self, digest: str) -> str:
        return f"{self.prefix}:cache:{digest}"

    @property
    def workers(self) -> str:
        return self._of_model("workers")

    @property
    def worker_costs(self) -> str:
        return self._of_model("worker-costs")


class RedisClock:
    """Redis server time (TIME), kept as an offset to a local clock and refreshed by ``sync``.

    Deadlines in Redis mode are on this clock: the API replica stamps ``enqueued_at`` and
    ``deadline`` with it and the workers compare against it, so the hosts' own clocks never
    matter. ``local`` is the clock the offset is kept to (monotonic: steps of the wall clock do not
    move it). Until the first ``sync`` succeeds it reads this host's wall clock.
    """

    def __init__(self, local: Callable[[], float] = time.monotonic) -> None:
        self._local = local
        self._offset: float | None = None

    @property
    def synced(self) -> bool:
        return self._offset is not None

    async def sync(self, client: aioredis.Redis) -> None:
        """Read TIME once; the offset is taken at the middle of the round trip."""
        before = self._local()
        seconds, micros = await client.time()
        after = self._local()
        self._offset = int(seconds) + int(micros) / 1e6 - (before + after) / 2

    def now(self) -> float:
        """Seconds since the epoch on the Redis server's clock."""
        if self._offset is None:
            return time.time()
        return self._local() + self._offset

    def to_redis(self, job: Job, wall: Callable[[], float] = time.time) -> Job:
        """``job``, stamped on this host's wall clock ``wall``, moved onto the Redis clock."""
        delta = self.now() - wall()
        return replace(job, enqueued_at=job.enqueued_at + delta, deadline=job.deadline + delta)

    def from_redis(self, job: Job, wall: Callable[[], float] = time.time) -> Job:
        """``job``, stamped on the Redis clock, moved onto this host's wall clock ``wall`` (what
        the engine compares deadlines and measures queue time with)."""
        delta = wall() - self.now()
        return replace(job, enqueued_at=job.enqueued_at + delta, deadline=job.deadline + delta)


def job_fields(job: Job, token: str) -> dict[str, bytes | str]:
    meta = asdict(job)
    del meta["image"]
    if not meta["trace_context"]:  # only sent when tracing is on: other entries unchanged
        del meta["trace_context"]
    for name in ("hints", "temperature"):  # only sent when given: other entries unchanged
        if meta["options"][name] is None:
            del meta["options"][name]
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
        trace_context={str(k): str(v) for k, v in meta.get("trace_context", {}).items()},
        model=str(meta.get("model", DEFAULT_MODEL)),
    )
    return token, job


def encode_answer(answer: JobResult | ServiceError) -> bytes:
    """One frame: JSON header, newline, body bytes (json.dumps never emits a raw newline)."""
    if isinstance(answer, ServiceError):
        return json.dumps({"error": answer.to_dict()}).encode() + b"\n"
    header = asdict(answer)
    del header["body"]
    if not header["truncated"]:  # only ever sent when true: the frames of whole images unchanged
        del header["truncated"]
    if header["seed"] is None:  # only a sampling model's answer carries its seed and samples
        del header["seed"], header["samples_base64"]
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
    described = asdict(options)
    for name in ("hints", "temperature"):  # the keys of results without them are as before
        if described[name] is None:
            del described[name]
    digest.update(json.dumps(described, sort_keys=True).encode())
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

# release(stream, group, id): remove the acknowledged entry ``id`` and every answered entry before
# the oldest one still needed, keeping XINFO GROUPS' ``lag`` exact (never nil, which KEDA reads as
# 0). Redis 7 reports the lag as unknown once a deleted id (XDEL) is at or after the group's
# last-delivered id while an older entry remains; trimming the head (XTRIM MINID) never does. So:
# XDEL only ids below the last-delivered one; trim up to the oldest pending entry; with none
# pending, everything up to the last-delivered entry is answered: trim, then XDEL that entry, which
# is then the stream's first.
RELEASE_LUA = """
local function id_less(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
local function release(stream, group, id)
  local last = nil
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == group then last = info['last-delivered-id'] end
  end
  if last == nil then return end
  if id_less(id, last) then redis.call('XDEL', stream, id) end
  local pending = redis.call('XPENDING', stream, group)
  if tonumber(pending[1]) > 0 then
    redis.call('XTRIM', stream, 'MINID', pending[2])
  else
    redis.call('XTRIM', stream, 'MINID', last)
    redis.call('XDEL', stream, last)
  end
end
"""

# KEYS[1] stream; ARGV[1] group, ARGV[2] entry id. Acknowledge without an answer (a withdrawn job).
RELEASE_SCRIPT = (
    RELEASE_LUA
    + """
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
release(KEYS[1], ARGV[1], ARGV[2])
return acked
"""
)

# KEYS[1] stream, KEYS[2] reply list, KEYS[3] cancel marker; ARGV[1] group, ARGV[2] entry id,
# ARGV[3] frame, ARGV[4] reply ttl ms. Answers only if this call acknowledged the entry (exactly
# one answer per job, even when two workers processed it) and nobody withdrew the job.
FINISH_SCRIPT = (
    RELEASE_LUA
    + """
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
release(KEYS[1], ARGV[1], ARGV[2])
if acked == 1 and redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('RPUSH', KEYS[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
return acked
"""
)

# KEYS[1] stream, KEYS[2] reply list, KEYS[3] dead-letter stream; ARGV[1] group, ARGV[2] entry id,
# ARGV[3] error frame, ARGV[4] reply ttl ms, ARGV[5] dead-letter maxlen, ARGV[6..] dead fields.
DEAD_LETTER_SCRIPT = (
    RELEASE_LUA
    + """
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
release(KEYS[1], ARGV[1], ARGV[2])
if acked == 1 then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', unpack(ARGV, 6))
  redis.call('RPUSH', KEYS[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
return acked
"""
)

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


def publish_stats(metrics: Metrics, stats: QueueStats, layout: RedisLayout) -> None:
    """``stats`` of ``layout``'s stream, labelled with its model: every model's queue (API side)
    and every model a worker serves publish into the same process's gauges."""
    model = layout.model_name
    metrics.redis_stream_length.labels(model=model).set(stats.stream_length)
    metrics.redis_pending.labels(model=model).set(stats.pending)
    metrics.redis_consumers.labels(model=model).set(stats.consumers)
    metrics.queue_depth.labels(model=model).set(stats.waiting)


async def read_model_info(client: aioredis.Redis, layout: RedisLayout) -> dict[str, Any] | None:
    raw = await client.get(layout.model)
    return None if raw is None else dict(json.loads(raw))


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
