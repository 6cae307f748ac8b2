"""Where batch state lives: ``SQLiteStore`` (memory mode, under COLORIZE_STATE_DIR) and
``RedisStore`` (Redis mode, shared by every API replica: service/batches/redis_store.py), behind
one ``Store`` protocol.

An item is recorded finished once, with its one result line: ``finish_item`` changes an item
only while it is pending, and the batch's counts move in the same transaction. A restart
therefore re-runs exactly the items without a line, and every item ends with exactly one line.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from service.batches.records import OPEN_STATUSES, BatchRecord, Item


class Store(Protocol):
    shared: bool  # True: other processes' schedulers read it too (batches run under a lease)

    def create(self, record: BatchRecord, items: Iterable[Item]) -> BatchRecord:
        """Store a new batch; with an idempotency key already used by the owner, return that
        batch instead (nothing new is stored)."""
        ...

    def get(self, batch_id: str) -> BatchRecord | None: ...

    def find_idempotent(self, owner: str, key: str) -> BatchRecord | None: ...

    def list_batches(self, owner: str, limit: int, after: str | None) -> list[BatchRecord]:
        """The owner's batches, newest first, starting after the batch ``after``."""
        ...

    def open_usage(self, owner: str) -> tuple[int, int]:
        """(open batches, items in them) of ``owner``."""
        ...

    def save(self, record: BatchRecord) -> None:
        """Store status and info (never the counts, which only ``finish_item`` moves)."""

    def update(self, batch_id: str, change: Callable[[BatchRecord], None]) -> BatchRecord:
        """Read, ``change`` and save status/info as one atomic step (KeyError: no such batch)."""
        ...

    def pending_items(self, batch_id: str, after_seq: int, limit: int) -> list[Item]: ...

    def finish_item(self, batch_id: str, seq: int, ok: bool, line: dict[str, Any]) -> bool:
        """Record the item's one line; False (nothing changed) if it was already finished."""
        ...

    def lines(self, batch_id: str, ok: bool) -> Iterator[str]:
        """The batch's output (ok) or error lines, in item order, each a JSON text."""
        ...

    def unfinished(self) -> list[BatchRecord]:
        """Every open batch, oldest first (resumed at start)."""
        ...

    def undelivered(self) -> list[BatchRecord]:
        """Batches whose terminal webhook was not delivered yet (``webhook.pending``): re-sent
        at start, since the process that was sending it may have been killed."""
        ...

    def acquire_lease(self, batch_id: str, holder: str, ttl_s: float) -> bool:
        """Take the right to run the batch for ``ttl_s``; False while another holder has it."""
        ...

    def renew_lease(self, batch_id: str, holder: str, ttl_s: float) -> bool:
        """Extend one's own lease; False if it was lost (expired and maybe taken over)."""
        ...

    def release_lease(self, batch_id: str, holder: str) -> None: ...

    def close(self) -> None: ...


def _record(row: sqlite3.Row | tuple[Any, ...]) -> BatchRecord:
    batch_id, owner, status, created_at, total, completed, failed, info = row
    return BatchRecord(
        batch_id, owner, status, created_at, total, completed, failed, json.loads(info)
    )


_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, status TEXT NOT NULL, created_at REAL NOT NULL,
    total INTEGER NOT NULL, completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0, info TEXT NOT NULL, idempotency_key TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS batches_idempotency ON batches (owner, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS batches_owner ON batches (owner, created_at);
CREATE TABLE IF NOT EXISTS items (
    batch_id TEXT NOT NULL, seq INTEGER NOT NULL, custom_id TEXT NOT NULL, source TEXT NOT NULL,
    options TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'pending', line TEXT,
    PRIMARY KEY (batch_id, seq)
);
CREATE INDEX IF NOT EXISTS items_pending ON items (batch_id, state, seq);
"""
_COLUMNS = "id, owner, status, created_at, total, completed, failed, info"


class SQLiteStore:
    """One SQLite file in WAL mode; one connection guarded by a lock (calls are short; the
    scheduler runs them in a thread, off the event loop). One process owns the file, so a lease
    is always granted."""

    shared = False

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit survives a process kill
        self._db.executescript(_SCHEMA)

    def create(self, record: BatchRecord, items: Iterable[Item]) -> BatchRecord:
        key = record.info.get("idempotency_key")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if key is not None:
                    row = self._db.execute(
                        f"SELECT {_COLUMNS} FROM batches WHERE owner=? AND idempotency_key=?",
                        (record.owner, key),
                    ).fetchone()
                    if row is not None:
                        self._db.execute("ROLLBACK")
                        return _record(row)
                self._db.execute(
                    f"INSERT INTO batches ({_COLUMNS}, idempotency_key) VALUES (?,?,?,?,?,?,?,?,?)",
                    (
                        record.id,
                        record.owner,
                        record.status,
                        record.created_at,
                        record.total,
                        0,
                        0,
                        json.dumps(record.info),
                        key,
                    ),
                )
                self._db.executemany(
                    "INSERT INTO items (batch_id, seq, custom_id, source, options) "
                    "VALUES (?,?,?,?,?)",
                    (
                        (record.id, i.seq, i.custom_id, i.source, json.dumps(i.options))
                        for i in items
                    ),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return record

    def _one(self, sql: str, args: tuple[Any, ...]) -> BatchRecord | None:
        with self._lock:
            row = self._db.execute(sql, args).fetchone()
        return None if row is None else _record(row)

    def get(self, batch_id: str) -> BatchRecord | None:
        return self._one(f"SELECT {_COLUMNS} FROM batches WHERE id=?", (batch_id,))

    def find_idempotent(self, owner: str, key: str) -> BatchRecord | None:
        return self._one(
            f"SELECT {_COLUMNS} FROM batches WHERE owner=? AND idempotency_key=?", (owner, key)
        )

    def list_batches(self, owner: str, limit: int, after: str | None) -> list[BatchRecord]:
        with self._lock:
            if after is not None:
                cursor = self._db.execute(
                    "SELECT created_at, id FROM batches WHERE id=? AND owner=?", (after, owner)
                ).fetchone()
                if cursor is None:
                    return []
                rows = self._db.execute(
                    f"SELECT {_COLUMNS} FROM batches WHERE owner=? AND "
                    "(created_at < ? OR (created_at = ? AND id < ?)) "
                    "ORDER BY created_at DESC, id DESC LIMIT ?",
                    (owner, cursor[0], cursor[0], cursor[1], limit),
                ).fetchall()
            else:
                rows = self._db.execute(
                    f"SELECT {_COLUMNS} FROM batches WHERE owner=? "
                    "ORDER BY created_at DESC, id DESC LIMIT ?",
                    (owner, limit),
                ).fetchall()
        return [_record(row) for row in rows]

    def open_usage(self, owner: str) -> tuple[int, int]:
        marks = ",".join("?" * len(OPEN_STATUSES))
        with self._lock:
            row = self._db.execute(
                f"SELECT COUNT(*), COALESCE(SUM(total), 0) FROM batches WHERE owner=? "
                f"AND status IN ({marks})",
                (owner, *sorted(OPEN_STATUSES)),
            ).fetchone()
        return int(row[0]), int(row[1])

    def save(self, record: BatchRecord) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE batches SET status=?, info=? WHERE id=?",
                (record.status, json.dumps(record.info), record.id),
            )

    def update(self, batch_id: str, change: Callable[[BatchRecord], None]) -> BatchRecord:
        record = self.get(batch_id)  # callers run on the one store thread: no other writer
        if record is None:
            raise KeyError(batch_id)
        change(record)
        self.save(record)
        return record

    def pending_items(self, batch_id: str, after_seq: int, limit: int) -> list[Item]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, custom_id, source, options FROM items WHERE batch_id=? AND "
                "state='pending' AND seq>? ORDER BY seq LIMIT ?",
                (batch_id, after_seq, limit),
            ).fetchall()
        return [Item(seq, cid, source, json.loads(opts)) for seq, cid, source, opts in rows]

    def finish_item(self, batch_id: str, seq: int, ok: bool, line: dict[str, Any]) -> bool:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                changed = self._db.execute(
                    "UPDATE items SET state=?, line=? WHERE batch_id=? AND seq=? "
                    "AND state='pending'",
                    ("ok" if ok else "failed", json.dumps(line), batch_id, seq),
                ).rowcount
                if changed:
                    column = "completed" if ok else "failed"
                    self._db.execute(
                        f"UPDATE batches SET {column}={column}+1 WHERE id=?", (batch_id,)
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return bool(changed)

    def lines(self, batch_id: str, ok: bool) -> Iterator[str]:
        last = -1
        while True:  # in pages, so a long file never holds the lock (or memory) for long
            with self._lock:
                rows = self._db.execute(
                    "SELECT seq, line FROM items WHERE batch_id=? AND state=? AND seq>? "
                    "ORDER BY seq LIMIT 1000",
                    (batch_id, "ok" if ok else "failed", last),
                ).fetchall()
            if not rows:
                return
            for seq, line in rows:
                yield line
                last = seq

    def unfinished(self) -> list[BatchRecord]:
        marks = ",".join("?" * len(OPEN_STATUSES))
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM batches WHERE status IN ({marks}) ORDER BY created_at",
                tuple(sorted(OPEN_STATUSES)),
            ).fetchall()
        return [_record(row) for row in rows]

    def undelivered(self) -> list[BatchRecord]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM batches WHERE "
                "json_extract(info, '$.webhook.pending') IS NOT NULL ORDER BY created_at"
            ).fetchall()
        records = [_record(row) for row in rows]
        return [r for r in records if (r.info.get("webhook") or {}).get("pending")]

    def acquire_lease(self, batch_id: str, holder: str, ttl_s: float) -> bool:
        return True

    def renew_lease(self, batch_id: str, holder: str, ttl_s: float) -> bool:
        return True

    def release_lease(self, batch_id: str, holder: str) -> None:
        return

    def close(self) -> None:
        with self._lock:
            self._db.close()
