"""The two batch stores keep the same contract: ``SQLiteStore`` (memory mode) and ``RedisStore``
(Redis mode, against the real Redis under a key prefix of the test's own): idempotent create,
newest-first pages, each item finished once with its one line, atomic updates, undelivered
webhooks, and (Redis) leases that exclude a second holder and run out."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis_fixtures import redis_prefix, redis_url

from service.batches.records import BatchRecord, Item
from service.batches.redis_store import RedisStore
from service.batches.store import SQLiteStore, Store

__all__ = ["redis_prefix", "redis_url"]  # fixtures


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    made: Store
    if request.param == "sqlite":
        made = SQLiteStore(tmp_path / "batches.sqlite3")
    else:
        url = request.getfixturevalue("redis_url")
        made = RedisStore(url, request.getfixturevalue("redis_prefix"))
    yield made
    made.close()


def batch(
    batch_id: str, owner: str = "alice", created: float = 100.0, **info: object
) -> BatchRecord:
    return BatchRecord(batch_id, owner, "validating", created, 3, info={"expires_at": 9e9, **info})


def items(count: int = 3) -> list[Item]:
    return [
        Item(i, f"c{i}", f"/in/{i}.png", {"saturation": 0.5} if i == 1 else {})
        for i in range(count)
    ]


def test_create_get_idempotency_and_pages(store: Store) -> None:
    first = store.create(batch("b1", idempotency_key="k"), items())
    assert first.id == "b1"
    again = store.create(batch("b2", idempotency_key="k"), items())
    assert again.id == "b1"  # the same key: the first batch, nothing new stored
    assert store.get("b2") is None
    assert store.find_idempotent("alice", "k").id == "b1"  # type: ignore[union-attr]
    assert store.find_idempotent("bob", "k") is None  # keys are per owner
    store.create(batch("b3", created=101.0), items())
    store.create(batch("b4", created=101.0), items())
    store.create(batch("x1", owner="bob", created=102.0), items())
    assert [r.id for r in store.list_batches("alice", 10, None)] == ["b4", "b3", "b1"]
    assert [r.id for r in store.list_batches("alice", 1, "b4")] == ["b3"]
    assert [r.id for r in store.list_batches("alice", 5, "b3")] == ["b1"]
    assert store.list_batches("alice", 5, "x1") == []  # another owner's cursor
    assert store.open_usage("alice") == (3, 9)
    got = store.get("b1")
    assert got is not None
    assert (got.owner, got.status, got.total, got.info["idempotency_key"]) == (
        "alice",
        "validating",
        3,
        "k",
    )
    assert [r.id for r in store.unfinished()] == ["b1", "b3", "b4", "x1"]


def test_each_item_finished_once_with_its_line(store: Store) -> None:
    store.create(batch("b1"), items(5))
    pending = store.pending_items("b1", -1, 10)
    assert [(i.seq, i.custom_id) for i in pending] == [(s, f"c{s}") for s in range(5)]
    assert pending[1].options == {"saturation": 0.5}
    assert [i.seq for i in store.pending_items("b1", 1, 2)] == [2, 3]
    # two schedulers finishing the same items concurrently: each item changes once
    results: list[bool] = []

    def finish() -> None:
        for seq in range(4):
            results.append(store.finish_item("b1", seq, seq != 2, {"custom_id": f"c{seq}"}))

    threads = [threading.Thread(target=finish) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(True) == 4
    record = store.get("b1")
    assert record is not None
    assert (record.completed, record.failed) == (3, 1)
    assert [json.loads(x)["custom_id"] for x in store.lines("b1", True)] == ["c0", "c1", "c3"]
    assert [json.loads(x)["custom_id"] for x in store.lines("b1", False)] == ["c2"]
    assert [i.seq for i in store.pending_items("b1", -1, 10)] == [4]


def test_update_save_and_undelivered(store: Store) -> None:
    store.create(batch("b1", webhook={"url": "http://h/x", "events": ["batch.completed"]}), items())
    store.finish_item("b1", 0, True, {"custom_id": "c0"})

    def complete(record: BatchRecord) -> None:
        record.mark("completed")
        record.info["webhook"]["pending"] = [{"event": "batch.completed", "webhook_id": "msg_1"}]

    updated = store.update("b1", complete)
    assert updated.status == "completed"
    record = store.get("b1")
    assert record is not None
    assert record.completed == 1  # counts are never overwritten by an update
    assert [r.id for r in store.unfinished()] == []
    assert store.open_usage("alice") == (0, 0)
    assert [r.id for r in store.undelivered()] == ["b1"]
    store.update("b1", lambda r: r.info["webhook"].update(pending=[]))
    assert store.undelivered() == []
    with pytest.raises(KeyError):
        store.update("nope", lambda r: None)


def test_redis_lease_excludes_a_second_holder_and_runs_out(
    redis_url: str, redis_prefix: str
) -> None:
    store = RedisStore(redis_url, redis_prefix)
    try:
        assert store.acquire_lease("b1", "a", 0.5)
        assert not store.acquire_lease("b1", "b", 0.5)
        assert not store.renew_lease("b1", "b", 0.5)  # not b's lease
        assert store.renew_lease("b1", "a", 0.5)
        assert store.lease_holder("b1") == "a"
        store.release_lease("b1", "b")  # not b's: nothing happens
        assert store.lease_holder("b1") == "a"
        time.sleep(0.7)  # a stopped renewing (killed): the lease runs out
        assert store.lease_holder("b1") is None
        assert not store.renew_lease("b1", "a", 0.5)  # a finds out it lost it
        assert store.acquire_lease("b1", "b", 0.5)
        store.release_lease("b1", "b")
        assert store.lease_holder("b1") is None
    finally:
        store.close()


def test_sqlite_store_is_not_shared(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "b.sqlite3")
    assert not store.shared
    assert store.acquire_lease("b", "a", 1) and store.acquire_lease("b", "b", 1)
    store.close()
