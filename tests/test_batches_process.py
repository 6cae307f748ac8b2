"""The batch API against a real ``python -m service serve`` process (tiny random weights):
manifest and archive submits, results, refusals, keys, webhooks verified by a real receiver,
cancel, expiry, and SIGKILL with resume."""

from __future__ import annotations

import io
import json
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from batch_support import (
    WebhookReceiver,
    jsonl,
    manifest_bytes,
    serve,
    tiny_png,
    wait_status,
    write_images,
)

pytestmark = pytest.mark.slow

KEYS = "alice:key-alice-0001-0123456789,bob:key-bob-0002-0123456789"


def submit(
    client,
    *,
    manifest: bytes | None = None,
    archive: bytes | None = None,
    headers: dict[str, str] | None = None,
    **fields: str,
):  # type: ignore[no-untyped-def]
    files = {}
    if manifest is not None:
        files["manifest"] = ("batch.jsonl", manifest, "application/jsonl")
    if archive is not None:
        files["archive"] = ("images.zip", archive, "application/octet-stream")
    return client.post("/batches", files=files, data=fields, headers=headers or {})


def test_manifest_batch_results_errors_keys_and_webhook(
    tiny_checkpoints: Path, tmp_path: Path
) -> None:
    images = write_images(tmp_path / "inputs" / "scans", 12)
    (tmp_path / "inputs" / "scans" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines = [{"custom_id": f"id-{i}", "source": str(p)} for i, p in enumerate(images)]
    lines[3]["saturation"] = 0.0  # a per-item option
    lines.append({"custom_id": "corrupt", "source": "scans/corrupt.png"})  # relative to the root
    lines.append({"custom_id": "missing", "source": "scans/nope.png"})
    with WebhookReceiver() as hooks, serve(tiny_checkpoints, tmp_path,
                                           COLORIZE_API_KEYS=KEYS) as server:  # fmt: skip
        alice, bob = (
            server.client("key-alice-0001-0123456789"),
            server.client("key-bob-0002-0123456789"),
        )
        response = submit(alice, manifest=manifest_bytes(lines), options='{"format": "png"}',
                          metadata='{"project": "scans"}', webhook_url=hooks.url,
                          webhook_events="batch.completed")  # fmt: skip
        assert response.status_code == 202, response.text
        batch = response.json()
        assert batch["object"] == "batch" and batch["request_counts"]["total"] == 14
        assert batch["status"] in ("validating", "in_progress")
        done = wait_status(alice, batch["id"], {"completed"})
        assert done["request_counts"] == {"total": 14, "completed": 12, "failed": 2}
        assert done["metadata"] == {"project": "scans"}

        output = jsonl(alice, f"/batches/{batch['id']}/output")
        errors = jsonl(alice, f"/batches/{batch['id']}/errors")
        assert sorted(o["custom_id"] for o in output) == sorted(f"id-{i}" for i in range(12))
        by_id = {e["custom_id"]: e["error"] for e in errors}
        assert by_id["corrupt"]["status_code"] == 400 and by_id["corrupt"]["code"]
        assert by_id["missing"]["code"] == "unreadable"
        folder = tmp_path / "out" / batch["id"]
        for line in output:
            path = folder / line["response"]["path"]
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (folder / "output.jsonl").read_text().count("\n") == 12
        assert not list(folder.rglob(".*.tmp"))  # atomic writes leave no temporaries

        # the webhook arrived, verified by standardwebhooks, thin (counts, no image)
        message = hooks.wait_for("batch.completed")
        assert message["data"]["id"] == batch["id"]
        assert message["data"]["request_counts"]["completed"] == 12
        assert not hooks.rejected
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            deliveries = alice.get(f"/batches/{batch['id']}").json()["webhook"]["deliveries"]
            if deliveries:
                break
            time.sleep(0.1)
        assert deliveries[-1]["status_code"] == 204 and deliveries[-1]["event"] == "batch.completed"

        # another key sees nothing of it
        assert bob.get(f"/batches/{batch['id']}").status_code == 404
        assert bob.get(f"/batches/{batch['id']}/output").status_code == 404
        assert bob.post(f"/batches/{batch['id']}/cancel").status_code == 404
        assert bob.get("/batches").json()["data"] == []
        assert server.client().get("/batches").status_code == 401

        # the results as one streamed zip, named by custom_id
        archive = zipfile.ZipFile(io.BytesIO(alice.get(f"/batches/{batch['id']}/archive").content))
        names = set(archive.namelist())
        assert {"output.jsonl", "errors.jsonl", "images/id-0.png"} <= names
        assert len([n for n in names if n.startswith("images/")]) == 12

        # newest first, paginated
        second = submit(alice, manifest=manifest_bytes(lines[:2])).json()
        page = alice.get("/batches", params={"limit": 1}).json()
        assert page["data"][0]["id"] == second["id"] and page["has_more"]
        rest = alice.get("/batches", params={"limit": 1, "after": page["last_id"]}).json()
        assert rest["data"][0]["id"] == batch["id"] and not rest["has_more"]
        metrics = server.client().get("/metrics").text
        assert "colorize_batch_items_total" in metrics
        assert 'colorize_batch_webhook_deliveries_total{result="delivered"}' in metrics


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _tar_with_link() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        data = tiny_png(1)
        info = tarfile.TarInfo("a.png")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("b.png")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        archive.addfile(link)
    return buffer.getvalue()


def test_archive_submit_refusals_and_idempotency(tiny_checkpoints: Path, tmp_path: Path) -> None:
    (tmp_path / "inputs").mkdir()
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(tiny_png(0))
    (tmp_path / "inputs" / "link.png").symlink_to(outside)
    with serve(tiny_checkpoints, tmp_path, COLORIZE_ARCHIVE_MAX_ENTRIES="20") as server:
        client = server.client()
        members = {f"roll1/frame{i}.png": tiny_png(i) for i in range(5)}
        members["notes.txt"] = b"not an image"
        response = submit(client, archive=_zip(members), headers={"Idempotency-Key": "k1"})
        assert response.status_code == 202, response.text
        batch = response.json()
        again = submit(client, archive=_zip(members), headers={"Idempotency-Key": "k1"})
        assert again.status_code == 202 and again.json()["id"] == batch["id"]
        done = wait_status(client, batch["id"], {"completed"})
        assert done["request_counts"] == {"total": 6, "completed": 5, "failed": 1}
        output = jsonl(client, f"/batches/{batch['id']}/output")
        assert {o["custom_id"] for o in output} == {f"roll1/frame{i}.png" for i in range(5)}
        assert jsonl(client, f"/batches/{batch['id']}/errors")[0]["custom_id"] == "notes.txt"

        bomb = _zip({"bomb.png": b"\0" * 20_000_000})
        refusals = {
            "traversal": submit(client, archive=_zip({"../evil.png": tiny_png(0)})),
            "absolute": submit(client, archive=_zip({"/etc/evil.png": tiny_png(0)})),
            "symlink": submit(client, archive=_tar_with_link()),
            "ratio": submit(client, archive=bomb),
            "entries": submit(client, archive=_zip({f"{i}.png": b"x" for i in range(21)})),
            "not an archive": submit(client, archive=b"garbage" * 100),
            "outside root": submit(client, manifest=manifest_bytes(
                [{"custom_id": "a", "source": str(outside)}])),
            "dotdot": submit(client, manifest=manifest_bytes(
                [{"custom_id": "a", "source": "../elsewhere.png"}])),
            "link out": submit(client, manifest=manifest_bytes(
                [{"custom_id": "a", "source": "link.png"}])),
            "bad option": submit(client, manifest=manifest_bytes(
                [{"custom_id": "a", "source": "x.png", "saturation": 9}])),
            "unknown option": submit(client, archive=_zip(members), options='{"colour": 1}'),
            "temperature range": submit(client, manifest=manifest_bytes(
                [{"custom_id": "a", "source": "x.png", "temperature": 2}])),
            "temperature model": submit(client, archive=_zip(members),
                                        options='{"temperature": 0.5}'),
            "both files": submit(client, archive=_zip(members), manifest=b"{}"),
            "duplicate id": submit(client, manifest=manifest_bytes(
                [{"custom_id": "a", "source": "x.png"}, {"custom_id": "a", "source": "y.png"}])),
            "webhook host": submit(client, archive=_zip(members),
                                   webhook_url="http://169.254.169.254/latest"),
        }  # fmt: skip
        for name, refused in refusals.items():
            assert refused.status_code == 422, (name, refused.text)
            assert refused.headers["content-type"] == "application/problem+json", name
            assert refused.json()["detail"], name
        assert "zip bomb" in refusals["ratio"].json()["detail"]
        assert (
            "'temperature' must be in [0.01, 1]" in refusals["temperature range"].json()["detail"]
        )
        assert (
            "model 'instcolor' does not decode by the annealed mean"
            in (refusals["temperature model"].json()["detail"])
        )
        assert "outside COLORIZE_BATCH_INPUT_ROOTS" in refusals["link out"].json()["detail"]
        assert not (tmp_path / "evil.png").exists()
        assert not Path("/etc/evil.png").exists()
        assert client.get("/batches/batch_nope").status_code == 404
        # nothing refused was stored
        assert len(client.get("/batches").json()["data"]) == 1


def test_cancel_and_expiry(tiny_checkpoints: Path, tmp_path: Path) -> None:
    images = write_images(tmp_path / "inputs", 400)
    lines = [{"custom_id": p.name, "source": str(p)} for p in images]
    with (
        WebhookReceiver() as hooks,
        serve(tiny_checkpoints, tmp_path, COLORIZE_BATCH_EXPIRY_S="4") as server,
    ):
        client = server.client()
        batch = submit(client, manifest=manifest_bytes(lines), webhook_url=hooks.url).json()
        queued = submit(client, manifest=manifest_bytes(lines[:5])).json()  # waits its turn
        wait_status(client, batch["id"], {"in_progress"})
        while client.get(f"/batches/{batch['id']}").json()["request_counts"]["completed"] < 5:
            time.sleep(0.05)
        cancelled_at = time.monotonic()
        assert client.post(f"/batches/{batch['id']}/cancel").json()["status"] in (
            "cancelling", "cancelled")  # fmt: skip
        ended = wait_status(client, batch["id"], {"cancelled"}, timeout=10)
        assert time.monotonic() - cancelled_at < 3.0
        counts = ended["request_counts"]
        assert 5 <= counts["completed"] < 400
        time.sleep(0.5)  # nothing more runs once cancelled
        after = client.get(f"/batches/{batch['id']}").json()["request_counts"]
        assert after == counts
        output = jsonl(client, f"/batches/{batch['id']}/output")
        assert len(output) == counts["completed"]  # the partial results stay listed
        assert hooks.wait_for("batch.cancelled")["data"]["status"] == "cancelled"
        wait_status(client, queued["id"], {"completed"})

        slow = submit(client, manifest=manifest_bytes(lines), webhook_url=hooks.url).json()
        expired = wait_status(client, slow["id"], {"expired"}, timeout=30)
        assert expired["request_counts"]["completed"] < 400
        assert expired["expired_at"] is not None
        assert hooks.wait_for("batch.expired")["data"]["id"] == slow["id"]


def test_resume_after_sigkill_each_item_once(tiny_checkpoints: Path, tmp_path: Path) -> None:
    images = write_images(tmp_path / "inputs", 300)
    lines = [{"custom_id": p.name, "source": str(p)} for p in images]
    with serve(tiny_checkpoints, tmp_path) as server:
        client = server.client()
        batch = submit(client, manifest=manifest_bytes(lines)).json()
        while client.get(f"/batches/{batch['id']}").json()["request_counts"]["completed"] < 40:
            time.sleep(0.05)
        server.kill()
        # what was recorded before the kill (read from the database the killed process left)
        import sqlite3

        db = sqlite3.connect(tmp_path / "state" / "batches.sqlite3")
        recorded = {json.loads(line)["response"]["path"] for (line,) in
                    db.execute("SELECT line FROM items WHERE state='ok'")}  # fmt: skip
        db.close()
        folder = tmp_path / "out" / batch["id"]
        stamps = {p: (folder / p).stat().st_mtime_ns for p in recorded}
        assert len(recorded) >= 40
        server.restart()
        client = server.client()
        done = wait_status(client, batch["id"], {"completed"}, timeout=180)
        assert done["request_counts"] == {"total": 300, "completed": 300, "failed": 0}
        output = jsonl(client, f"/batches/{batch['id']}/output")
        assert len(output) == 300
        assert sorted(o["custom_id"] for o in output) == sorted(p.name for p in images)
        # finished items were not recomputed: their files are the ones written before the kill
        assert {p: (folder / p).stat().st_mtime_ns for p in recorded} == stamps
        assert not list(folder.rglob(".*.tmp"))
        assert "resuming batch" in server.log.read_text()
