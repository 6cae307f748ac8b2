"""Two ``BatchScheduler``s on one ``RedisStore`` (the real Redis, a prefix of the test's own), as
two API replicas have, without HTTP: the batch runs on one scheduler at a time; the one whose
lease is taken stops submitting, the other finishes; every item ends in exactly one line and is
run once unless it was in flight when its scheduler stopped.

The queue is a counting stand-in for the engine (it answers each job with its request id as the
image bytes), so the test sees which items each scheduler ran."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

from batch_support import tiny_png
from redis_fixtures import redis_prefix, redis_url

from service.batches.records import BatchRecord, Item
from service.batches.redis_store import RedisStore
from service.batches.runner import BatchScheduler
from service.batches.webhooks import WebhookSender
from service.core.jobs import Job, JobResult
from service.settings import ServiceSettings

__all__ = ["redis_prefix", "redis_url"]  # fixtures

ITEMS = 200


class CountingQueue:
    """Answers every job after ``delay_s`` with its request id; counts the jobs it ran."""

    def __init__(self, delay_s: float = 0.05) -> None:
        self.delay_s = delay_s
        self.ran: Counter[str] = Counter()

    async def submit(self, job: Job) -> JobResult:
        await asyncio.sleep(self.delay_s)
        self.ran[job.request_id] += 1
        return JobResult(job.request_id.encode(), "image/png", [], [], {}, "test", model=job.model)


def scheduler(store: RedisStore, queue: CountingQueue, settings: ServiceSettings) -> BatchScheduler:
    sender = WebhookSender(None, [], max_attempts=1, backoff_base_s=1, timeout_s=1)
    return BatchScheduler(store, settings, lambda: queue, sender)  # type: ignore[arg-type,return-value]


async def test_a_taken_lease_stops_one_scheduler_and_the_other_finishes(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    settings = ServiceSettings(
        queue="redis", redis_url=redis_url, redis_prefix=redis_prefix, batch_lease_s=1.5,
        batch_in_flight=2, state_dir=tmp_path / "state", batch_output_dir=tmp_path / "out",
    )  # fmt: skip
    store_a, store_b = RedisStore(redis_url, redis_prefix), RedisStore(redis_url, redis_prefix)
    record = BatchRecord("batch_lease1", "anonymous", "validating", time.time(), ITEMS,
                         info={"expires_at": time.time() + 600, "options": {},
                               "output_dir": str(tmp_path / "out" / "b")})  # fmt: skip
    store_a.create(record, [Item(i, f"c{i}", str(tmp_path / f"{i}.png")) for i in range(ITEMS)])
    for i in range(ITEMS):
        (tmp_path / f"{i}.png").write_bytes(tiny_png(i))
    left = tmp_path / "out" / "b" / "images" / ".0000007.png.0123456789ab.tmp"
    left.parent.mkdir(parents=True)
    left.write_bytes(b"half an image")  # what a SIGKILL mid-write leaves
    queue_a, queue_b = CountingQueue(), CountingQueue()
    a = scheduler(store_a, queue_a, settings)
    await a.start()  # finds the open batch and takes its lease
    while sum(queue_a.ran.values()) < 10:
        await asyncio.sleep(0.01)
    b = scheduler(store_b, queue_b, settings)
    await b.start()
    await asyncio.sleep(1.0)
    assert sum(queue_b.ran.values()) == 0  # a holds the lease: b runs nothing
    # the lease is taken by someone else (as when a was paused past its lease): a stops
    lease = store_a.key(record.id, "lease")
    store_a._db.set(lease, "thief", px=2500)
    await asyncio.sleep(1.0)  # a renews every 0.5 s: it has found out by now
    stopped_at = sum(queue_a.ran.values())
    await asyncio.sleep(0.5)
    assert sum(queue_a.ran.values()) == stopped_at  # a submits nothing more
    assert sum(queue_b.ran.values()) == 0  # nor does b while the thief holds the lease
    await a.stop()  # a goes away; b takes the batch once the thief's lease runs out
    deadline = time.monotonic() + 30
    while (got := store_b.get(record.id)) is not None and got.status != "completed":
        assert time.monotonic() < deadline, got
        await asyncio.sleep(0.05)
    await b.stop()
    done = store_b.get(record.id)
    assert done is not None
    assert (done.completed, done.failed) == (ITEMS, 0)
    lines = [json.loads(x) for x in store_b.lines(record.id, True)]
    assert sorted(line["custom_id"] for line in lines) == sorted(f"c{i}" for i in range(ITEMS))
    ran = queue_a.ran + queue_b.ran
    assert set(ran) == {f"{record.id}-{i}" for i in range(ITEMS)}  # every item ran
    assert 10 <= stopped_at < ITEMS and sum(queue_b.ran.values()) > 0  # both took part
    # an item runs twice only if it was in flight on a when a stopped: at most batch_in_flight
    assert sum(n - 1 for n in ran.values()) <= settings.batch_in_flight
    assert (tmp_path / "out" / "b" / "output.jsonl").read_text().count("\n") == ITEMS
    images = tmp_path / "out" / "b" / "images"
    assert not left.exists()  # swept when the batch was taken up
    assert len(list(images.iterdir())) == ITEMS
    assert (images / "0000007.png").read_bytes() == f"{record.id}-7".encode()
    store_a.close()
    store_b.close()
