"""``RedisStore``: batch state in Redis (Redis mode), shared by every API replica, with leases.

The same ``Store`` interface as ``SQLiteStore`` (service/batches/store.py), and the same rule:
an item is finished once, with its one line, by a Lua script that removes it from the pending set
and moves the batch's count in one step, so two schedulers finishing the same item still leave
one line. Keys, for prefix ``P`` (``COLORIZE_REDIS_PREFIX``), none with a TTL (batch state must
never be evicted; docs/redis.md):

- ``P:batch:<id>`` hash: owner, status, created_at, total, completed, failed, info (JSON)
- ``P:batch:<id>:items`` hash seq -> [custom_id, source, options]; ``:pending`` zset of seqs not
  finished; ``:ok`` / ``:failed`` zsets of finished seqs; ``:lines`` hash seq -> result line
- ``P:batch:<id>:lease`` string, PX: the scheduler running the batch (its holder id)
- ``P:batches:owner:<owner>`` zset by created_at; ``P:batches:open`` zset by created_at;
  ``P:batches:webhooks`` set (a terminal webhook not yet delivered);
  ``P:batches:idem:<owner>:<key>`` the batch of an Idempotency-Key
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any, ParamSpec, TypeVar

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from service.batches.records import OPEN_STATUSES, BatchRecord, Item
from service.core.errors import UnavailableError

P = ParamSpec("P")
T = TypeVar("T")

CHUNK = 1000
UPDATE_TRIES = 50

# KEYS: batch hash, pending zset, done zset (ok or failed), lines hash; ARGV: seq, line, column
FINISH_SCRIPT = """
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[4], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[1], ARGV[1])
redis.call('HINCRBY', KEYS[1], ARGV[3], 1)
return 1
"""
# KEYS: lease; ARGV: holder, ttl ms. Renew only one's own lease.
RENEW_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _unavailable(fn: Callable[P, T]) -> Callable[P, T]:
    """Redis errors become ``UnavailableError`` (503 on a route; the scheduler waits)."""

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise UnavailableError(
                f"the batch store (Redis) is unreachable: {exc}", retry_after=1.0
            ) from None

    return call


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisStore:
    """Batch state under ``<prefix>:batch*`` in one Redis (every replica and scheduler)."""

    shared = True  # several schedulers may read it: batches are run under a lease

    def __init__(self, url: str, prefix: str, *, connect_timeout_s: float = 2.0) -> None:
        self.prefix = prefix
        self._db = redis.Redis.from_url(
            url,
            retry=Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), 2),
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=10.0,
        )
        self._finish = self._db.register_script(FINISH_SCRIPT)
        self._renew = self._db.register_script(RENEW_SCRIPT)
        self._release = self._db.register_script(RELEASE_SCRIPT)

    # -- key names ---------------------------------------------------------------------------

    def key(self, batch_id: str, part: str = "") -> str:
        return f"{self.prefix}:batch:{batch_id}" + (f":{part}" if part else "")

    def _owner_key(self, owner: str) -> str:
        return f"{self.prefix}:batches:owner:{owner}"

    def _idem_key(self, owner: str, key: str) -> str:
        return f"{self.prefix}:batches:idem:{owner}:{key}"

    @property
    def _open_key(self) -> str:
        return f"{self.prefix}:batches:open"

    @property
    def _webhooks_key(self) -> str:
        return f"{self.prefix}:batches:webhooks"

    # -- records -----------------------------------------------------------------------------

    def _read(self, batch_id: str, fields: Any) -> BatchRecord | None:
        if not fields:
            return None
        values = {_text(k): _text(v) for k, v in fields.items()}
        return BatchRecord(
            batch_id,
            values["owner"],
            values["status"],
            float(values["created_at"]),
            int(values["total"]),
            int(values.get("completed", 0)),
            int(values.get("failed", 0)),
            json.loads(values["info"]),
        )

    def _many(self, ids: list[Any]) -> list[BatchRecord]:
        names = [_text(i) for i in ids]
        pipe = self._db.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self.key(name))
        records = [self._read(n, f) for n, f in zip(names, pipe.execute(), strict=True)]
        return [r for r in records if r is not None]

    def _state_fields(self, record: BatchRecord) -> dict[Any, Any]:
        return {"status": record.status, "info": json.dumps(record.info)}

    def _queue_indexes(self, pipe: Any, record: BatchRecord) -> None:
        if record.is_open:
            pipe.zadd(self._open_key, {record.id: record.created_at})
        else:
            pipe.zrem(self._open_key, record.id)
        if (record.info.get("webhook") or {}).get("pending"):
            pipe.sadd(self._webhooks_key, record.id)
        else:
            pipe.srem(self._webhooks_key, record.id)

    # -- the Store interface -----------------------------------------------------------------

    @_unavailable
    def create(self, record: BatchRecord, items: Iterable[Item]) -> BatchRecord:
        key = record.info.get("idempotency_key")
        idem = self._idem_key(record.owner, key) if key is not None else None
        if idem is not None:
            found = self._db.get(idem)
            if found is not None:
                existing = self.get(_text(found))
                if existing is not None:
                    return existing
        # the items first (unreachable until the batch hash exists), then the batch in one step
        iterator = iter(items)
        while chunk := list(islice(iterator, CHUNK)):
            pipe = self._db.pipeline(transaction=False)
            pipe.hset(
                self.key(record.id, "items"),
                mapping={i.seq: json.dumps([i.custom_id, i.source, i.options]) for i in chunk},
            )
            pipe.zadd(self.key(record.id, "pending"), {str(i.seq): i.seq for i in chunk})
            pipe.execute()
        with self._db.pipeline(transaction=True) as pipe:
            try:
                if idem is not None:
                    pipe.watch(idem)
                    if pipe.get(idem) is not None:
                        raise redis.WatchError  # the same key won meanwhile
                pipe.multi()
                if idem is not None:
                    pipe.set(idem, record.id)
                pipe.hset(
                    self.key(record.id),
                    mapping={
                        "owner": record.owner,
                        "created_at": repr(record.created_at),
                        "total": str(record.total),
                        "completed": "0",
                        "failed": "0",
                        **self._state_fields(record),
                    },
                )
                pipe.zadd(self._owner_key(record.owner), {record.id: record.created_at})
                self._queue_indexes(pipe, record)
                pipe.execute()
            except redis.WatchError:
                self._db.delete(self.key(record.id, "items"), self.key(record.id, "pending"))
                assert key is not None
                winner = self.find_idempotent(record.owner, key)
                if winner is None:
                    raise RuntimeError("idempotency key raced and vanished") from None
                return winner
        return record

    @_unavailable
    def get(self, batch_id: str) -> BatchRecord | None:
        return self._read(batch_id, self._db.hgetall(self.key(batch_id)))

    @_unavailable
    def find_idempotent(self, owner: str, key: str) -> BatchRecord | None:
        found = self._db.get(self._idem_key(owner, key))
        return None if found is None else self.get(_text(found))

    @_unavailable
    def list_batches(self, owner: str, limit: int, after: str | None) -> list[BatchRecord]:
        """Newest first: a zset by created_at read in reverse (equal times: by id, reversed, as
        SQLite's ORDER BY created_at DESC, id DESC)."""
        index = self._owner_key(owner)
        start = 0
        if after is not None:
            rank: Any = self._db.zrevrank(index, after)
            if rank is None:
                return []
            start = int(rank) + 1
        return self._many(self._db.zrevrange(index, start, start + limit - 1))

    @_unavailable
    def open_usage(self, owner: str) -> tuple[int, int]:
        ids = [_text(i) for i in self._db.zrange(self._open_key, 0, -1)]
        pipe = self._db.pipeline(transaction=False)
        for batch_id in ids:
            pipe.hmget(self.key(batch_id), ["owner", "total"])
        batches = items = 0
        for row_owner, total in pipe.execute():
            if row_owner is not None and _text(row_owner) == owner:
                batches += 1
                items += int(total)
        return batches, items

    @_unavailable
    def save(self, record: BatchRecord) -> None:
        with self._db.pipeline(transaction=True) as pipe:
            pipe.hset(self.key(record.id), mapping=self._state_fields(record))
            self._queue_indexes(pipe, record)
            pipe.execute()

    @_unavailable
    def update(self, batch_id: str, change: Callable[[BatchRecord], None]) -> BatchRecord:
        """Read, change and save status/info atomically (optimistic: WATCH, retried on a
        concurrent write by another replica)."""
        key = self.key(batch_id)
        for _ in range(UPDATE_TRIES):
            with self._db.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(key)
                    record = self._read(batch_id, pipe.hgetall(key))
                    if record is None:
                        raise KeyError(batch_id)
                    change(record)
                    pipe.multi()
                    pipe.hset(key, mapping=self._state_fields(record))
                    self._queue_indexes(pipe, record)
                    pipe.execute()
                    return record
                except redis.WatchError:
                    continue
        raise UnavailableError(f"batch {batch_id} is changing too often to update", retry_after=1)

    @_unavailable
    def pending_items(self, batch_id: str, after_seq: int, limit: int) -> list[Item]:
        seqs: Any = self._db.zrangebyscore(
            self.key(batch_id, "pending"), f"({after_seq}", "+inf", start=0, num=limit
        )
        if not seqs:
            return []
        rows = self._db.hmget(self.key(batch_id, "items"), seqs)
        items = []
        for seq, row in zip(seqs, rows, strict=True):
            if row is None:
                continue
            custom_id, source, options = json.loads(row)
            items.append(Item(int(seq), custom_id, source, options))
        return items

    @_unavailable
    def finish_item(self, batch_id: str, seq: int, ok: bool, line: dict[str, Any]) -> bool:
        done = self.key(batch_id, "ok" if ok else "failed")
        keys = [
            self.key(batch_id),
            self.key(batch_id, "pending"),
            done,
            self.key(batch_id, "lines"),
        ]
        column = "completed" if ok else "failed"
        return bool(self._finish(keys=keys, args=[str(seq), json.dumps(line), column]))

    def lines(self, batch_id: str, ok: bool) -> Iterator[str]:
        index = self.key(batch_id, "ok" if ok else "failed")
        low = "-inf"
        while True:  # in pages: a long file is never read whole
            seqs: Any = _unavailable(self._db.zrangebyscore)(index, low, "+inf", start=0, num=CHUNK)
            if not seqs:
                return
            rows = _unavailable(self._db.hmget)(self.key(batch_id, "lines"), seqs)
            for row in rows:
                if row is not None:
                    yield _text(row)
            low = f"({_text(seqs[-1])}"

    @_unavailable
    def unfinished(self) -> list[BatchRecord]:
        records = self._many(self._db.zrange(self._open_key, 0, -1))
        return [r for r in records if r.status in OPEN_STATUSES]

    @_unavailable
    def undelivered(self) -> list[BatchRecord]:
        records = self._many(sorted(self._db.smembers(self._webhooks_key)))
        return [r for r in records if (r.info.get("webhook") or {}).get("pending")]

    # -- leases: one scheduler runs a batch at a time ----------------------------------------

    @_unavailable
    def acquire_lease(self, batch_id: str, holder: str, ttl_s: float) -> bool:
        return bool(
            self._db.set(self.key(batch_id, "lease"), holder, nx=True, px=int(ttl_s * 1000))
        )

    @_unavailable
    def renew_lease(self, batch_id: str, holder: str, ttl_s: float) -> bool:
        return bool(
            self._renew(keys=[self.key(batch_id, "lease")], args=[holder, int(ttl_s * 1000)])
        )

    @_unavailable
    def release_lease(self, batch_id: str, holder: str) -> None:
        self._release(keys=[self.key(batch_id, "lease")], args=[holder])

    def lease_holder(self, batch_id: str) -> str | None:
        value = self._db.get(self.key(batch_id, "lease"))
        return None if value is None else _text(value)

    def close(self) -> None:
        self._db.close()
