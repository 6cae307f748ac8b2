"""The issue's "done" check: a 10,000-item manifest of tiny images completes through a SIGKILL and
restart of the server with exactly 10,000 output lines, the completion webhook arrives verified,
and an interactive POST /colorize sent during the batch is answered within the documented bound
(docs/batches.md: idle latency + 2 s on this CPU).

CI runs it with 1,000 items (about a minute here); ``COLORIZE_DONE_ITEMS=10000`` runs the issue's
full size (3 min 35 s on the quiet 2-core EPYC box; figures in docs/batches.md)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest
from batch_support import WebhookReceiver, jsonl, manifest_bytes, serve, tiny_png, wait_status

pytestmark = pytest.mark.slow

ITEMS = int(os.environ.get("COLORIZE_DONE_ITEMS", "1000"))
INTERACTIVE_BOUND_S = 2.0  # over the idle latency: docs/batches.md


def colorize_seconds(client: httpx.Client) -> float:
    started = time.perf_counter()
    response = client.post("/colorize", files={"image": ("a.png", tiny_png(7, 64), "image/png")})
    assert response.status_code == 200, response.text
    return time.perf_counter() - started


def test_ten_thousand_items_through_a_kill(tiny_checkpoints: Path, tmp_path: Path) -> None:
    folder = tmp_path / "inputs"
    folder.mkdir()
    lines = []
    for i in range(ITEMS):
        path = folder / f"{i:05d}.png"
        path.write_bytes(tiny_png(i))
        lines.append({"custom_id": f"scan-{i}", "source": path.name})
    with WebhookReceiver() as hooks, serve(tiny_checkpoints, tmp_path,
                                           COLORIZE_BATCH_IN_FLIGHT="8") as server:  # fmt: skip
        client = server.client()
        idle = min(colorize_seconds(client) for _ in range(3))
        batch = client.post(
            "/batches",
            files={"manifest": ("m.jsonl", manifest_bytes(lines), "application/jsonl")},
            data={"webhook_url": hooks.url, "options": '{"format": "png"}'},
        ).json()
        assert batch["request_counts"]["total"] == ITEMS
        while client.get(f"/batches/{batch['id']}").json()["request_counts"]["completed"] < 200:
            time.sleep(0.1)
        during = [colorize_seconds(client) for _ in range(3)]
        assert max(during) <= idle + INTERACTIVE_BOUND_S, (idle, during)
        while (
            client.get(f"/batches/{batch['id']}").json()["request_counts"]["completed"] < ITEMS // 3
        ):
            time.sleep(0.2)
        server.kill()
        server.restart()
        client = server.client()
        started = time.monotonic()
        done = wait_status(client, batch["id"], {"completed"}, timeout=600)
        resumed_s = time.monotonic() - started
        assert done["request_counts"] == {"total": ITEMS, "completed": ITEMS, "failed": 0}
        output = jsonl(client, f"/batches/{batch['id']}/output")
        assert len(output) == ITEMS
        assert len({line["custom_id"] for line in output}) == ITEMS
        assert jsonl(client, f"/batches/{batch['id']}/errors") == []
        out = tmp_path / "out" / batch["id"]
        assert (out / "output.jsonl").read_text().count("\n") == ITEMS
        assert len(list((out / "images").iterdir())) == ITEMS
        message = hooks.wait_for("batch.completed")
        assert message["data"]["request_counts"]["completed"] == ITEMS
        print(
            f"{ITEMS} items, {len(output)} output lines, {message['type']} verified; interactive "
            f"idle {idle:.3f} s, during the batch {max(during):.3f} s (bound: idle + "
            f"{INTERACTIVE_BOUND_S} s); the restarted server finished the rest in {resumed_s:.0f} s"
        )
