"""The batch API in Redis mode with real processes on the real Redis (a key prefix of the test's
own): two API replicas (``serve`` with COLORIZE_QUEUE=redis, no model) whose schedulers share the
batch state in Redis, and a GPU worker (``python -m service worker``, tiny checkpoints on the CPU).

A batch submitted to one replica runs there under a lease and completes through the worker; the
replica holding the lease is SIGKILLed mid-batch (and the worker with it), the other replica takes
the batch over once the lease runs out and finishes it with a new worker: every item ends in
exactly one output line, and the items finished before the kill are not computed again.

CI runs 240 items; ``COLORIZE_BATCH_REDIS_ITEMS=10000`` runs the issue's size (the kill comes
after an eighth of the items, the waits grow with the count)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest
import redis
from batch_support import jsonl, manifest_bytes, wait_status, write_images
from redis_fixtures import redis_prefix, redis_url
from test_redis_e2e import Fleet, Proc

__all__ = ["redis_prefix", "redis_url"]  # fixtures

ITEMS = int(os.environ.get("COLORIZE_BATCH_REDIS_ITEMS", "240"))
KILL_AT = max(30, ITEMS // 8)  # items completed before the kill
WAIT_S = max(180.0, ITEMS / 10)  # the 2-core box runs about 30 items/s through one worker

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(120 + 2 * WAIT_S)]


def counts(client: httpx.Client, batch_id: str) -> dict[str, int]:
    return dict(client.get(f"/batches/{batch_id}").json()["request_counts"])


def test_batch_through_the_worker_survives_a_killed_scheduler_and_worker(
    tmp_path: Path, redis_url: str, redis_prefix: str, tiny_checkpoints: Path
) -> None:
    images = write_images(tmp_path / "inputs", ITEMS)
    lines = [{"custom_id": f"scan-{i}", "source": str(p)} for i, p in enumerate(images)]
    fleet = Fleet(tmp_path, redis_url, redis_prefix, tiny_checkpoints)
    fleet.settings.update(
        COLORIZE_STATE_DIR=str(tmp_path / "state"),
        COLORIZE_BATCH_OUTPUT_DIR=str(tmp_path / "out"),  # shared by the replicas (one host)
        COLORIZE_BATCH_INPUT_ROOTS=str(tmp_path / "inputs"),
        COLORIZE_BATCH_LEASE_S="2",
        COLORIZE_CLAIM_IDLE_MS="1500",
        COLORIZE_MAX_BATCH_SIZE="4",
        COLORIZE_MAX_BATCH_DELAY_MS="5",
        COLORIZE_CACHE_ENABLED="false",  # every item really runs on a worker
    )
    try:
        apis = {name: fleet.api(name) for name in ("api-a", "api-b")}
        worker = fleet.worker("w1")
        fleet.wait_ready(*apis.values(), worker)
        a = httpx.Client(base_url=apis["api-a"].url, timeout=60)
        b = httpx.Client(base_url=apis["api-b"].url, timeout=60)
        response = a.post(
            "/batches",
            files={"manifest": ("m.jsonl", manifest_bytes(lines), "application/jsonl")},
            data={"options": '{"format": "png"}'},
        )
        assert response.status_code == 202, response.text
        batch_id = response.json()["id"]
        # the state is in Redis: the other replica sees the batch at once
        assert b.get(f"/batches/{batch_id}").json()["request_counts"]["total"] == ITEMS
        db = redis.Redis.from_url(redis_url)
        lease = f"{redis_prefix}:batch:{batch_id}:lease"
        deadline = time.monotonic() + WAIT_S
        while counts(b, batch_id)["completed"] < KILL_AT:
            assert time.monotonic() < deadline, apis["api-a"].tail()
            time.sleep(0.05)
        holder = db.get(lease)
        assert holder is not None
        running: Proc = next(p for p in apis.values() if f"-{p.process.pid}-" in holder.decode())
        other = next(p for p in apis.values() if p is not running)
        fleet.kill(running)  # the scheduler dies mid-batch
        fleet.kill(worker)  # and so does the worker with the jobs it had read
        recorded = {
            json.loads(line)["response"]["path"]
            for line in db.hvals(f"{redis_prefix}:batch:{batch_id}:lines")
            if json.loads(line)["error"] is None
        }
        assert KILL_AT <= len(recorded) < ITEMS, "the batch must be cut mid-way"
        folder = tmp_path / "out" / batch_id
        stamps = {p: (folder / p).stat().st_mtime_ns for p in recorded}
        fleet.wait_ready(fleet.worker("w2"))
        client = httpx.Client(base_url=other.url, timeout=60)
        started = time.monotonic()
        done = wait_status(client, batch_id, {"completed"}, timeout=WAIT_S)
        resumed_s = time.monotonic() - started
        assert done["request_counts"] == {"total": ITEMS, "completed": ITEMS, "failed": 0}
        # the other replica took it over (under its own lease) and said so
        assert f"running batch {batch_id}" in other.log.read_text()
        assert db.get(lease) is None  # released at the end
        output = jsonl(client, f"/batches/{batch_id}/output")
        assert len(output) == ITEMS
        assert sorted(line["custom_id"] for line in output) == sorted(c["custom_id"] for c in lines)
        assert jsonl(client, f"/batches/{batch_id}/errors") == []
        assert (folder / "output.jsonl").read_text().count("\n") == ITEMS
        assert len(list((folder / "images").iterdir())) == ITEMS
        assert not list(folder.rglob(".*.tmp"))
        # finished items were not recomputed: their files are the ones written before the kill
        assert {p: (folder / p).stat().st_mtime_ns for p in recorded} == stamps
        assert not (tmp_path / "state" / "batches.sqlite3").exists()  # no SQLite in Redis mode
        print(
            f"{ITEMS} items, {len(output)} output lines, killed after {len(recorded)}; the other "
            f"replica finished {ITEMS - len(recorded)} in {resumed_s:.0f} s (takeover included)"
        )
        db.close()
    finally:
        fleet.stop_all()
