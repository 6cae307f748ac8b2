"""The batch API against a real ``serve`` process: a terminal webhook interrupted by a SIGKILL is
sent again after the restart (a real receiver verifies it with ``standardwebhooks``); an upload
without Content-Length (chunked) is capped at COLORIZE_BATCH_MAX_UPLOAD_BYTES like any other
(413 problem+json); the per-item ``model`` option is checked against the served models and
the item runs on the model it names."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from batch_support import WebhookReceiver, jsonl, manifest_bytes, serve, wait_status, write_images

pytestmark = pytest.mark.slow


def test_an_interrupted_terminal_webhook_is_sent_again_after_a_kill(
    tiny_checkpoints: Path, tmp_path: Path
) -> None:
    images = write_images(tmp_path / "inputs", 3)
    lines = [{"custom_id": p.name, "source": str(p)} for p in images]
    # the receiver refuses every delivery until the server is killed (retries 0-60 s apart)
    with (
        WebhookReceiver(fail_first=10**6) as hooks,
        serve(tiny_checkpoints, tmp_path, COLORIZE_WEBHOOK_BACKOFF_S="60") as server,
    ):
        client = server.client()
        batch = client.post(
            "/batches",
            files={"manifest": ("m.jsonl", manifest_bytes(lines), "application/jsonl")},
            data={"webhook_url": hooks.url, "webhook_events": "batch.completed"},
        ).json()
        done = wait_status(client, batch["id"], {"completed"})
        deadline = time.monotonic() + 10
        while not done["webhook"]["deliveries"] and time.monotonic() < deadline:
            time.sleep(0.05)
            done = client.get(f"/batches/{batch['id']}").json()
        first = done["webhook"]["deliveries"]
        assert [(d["status_code"], d["event"]) for d in first[:1]] == [(503, "batch.completed")]
        assert hooks.verified == []
        server.kill()  # mid-delivery: the webhook is still pending on the batch
        refused = hooks.requests
        hooks.fail_first = refused  # the receiver is fine again
        server.env["COLORIZE_WEBHOOK_BACKOFF_S"] = "0.2"
        server.restart()
        message = hooks.wait_for("batch.completed", timeout=30)
        assert message["data"]["id"] == batch["id"]
        assert message["data"]["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
        assert not hooks.rejected
        client = server.client()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            webhook = client.get(f"/batches/{batch['id']}").json()["webhook"]
            if len(webhook["deliveries"]) == refused + 1:
                break
            time.sleep(0.05)
        *before, resent = webhook["deliveries"]
        assert [d["status_code"] for d in before] == [503] * refused
        assert not any(d.get("resent") for d in before)
        assert resent["status_code"] == 204 and resent["resent"] is True
        assert resent["webhook_id"] == first[0]["webhook_id"]  # the same message: dedupable
        assert "re-sending the undelivered webhook" in server.log.read_text()
        # delivered: no longer pending, so a further restart sends nothing more
        server.kill()
        server.restart()
        time.sleep(2)
        assert len(hooks.verified) == 1
        assert hooks.requests == refused + 1


def _raw_post(
    base: str, path: str, head: dict[str, str], chunks: list[bytes]
) -> tuple[int, dict[str, str], bytes]:
    """A chunked request over a plain socket (no Content-Length); the answer's status,
    headers and body."""
    parts = urlsplit(base)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        lines = [f"POST {path} HTTP/1.1", f"Host: {parts.netloc}", "Transfer-Encoding: chunked",
                 *(f"{k}: {v}" for k, v in head.items()), "", ""]  # fmt: skip
        sock.sendall("\r\n".join(lines).encode())
        try:
            for chunk in chunks:
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early and closed: read what it said
        received = b""
        while b"\r\n\r\n" not in received:
            data = sock.recv(65536)
            if not data:
                break
            received += data
        header, _, body = received.partition(b"\r\n\r\n")
        status_line, *header_lines = header.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            data = sock.recv(65536)
            if not data:
                break
            body += data
    return int(status_line.split()[1]), headers, body


def _multipart(name: str, filename: str, content: bytes, boundary: str = "b0undary") -> bytes:
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )


def test_chunked_uploads_are_capped_and_item_models_checked(
    tiny_checkpoints: Path, tmp_path: Path
) -> None:
    images = write_images(tmp_path / "inputs", 2)
    with serve(tiny_checkpoints, tmp_path, COLORIZE_BATCH_MAX_UPLOAD_BYTES="4096") as server:
        head = {"Content-Type": "multipart/form-data; boundary=b0undary"}
        big = _multipart("archive", "a.zip", b"x" * 20_000)
        status, headers, body = _raw_post(
            server.base, "/batches", head, [big[i : i + 1000] for i in range(0, len(big), 1000)]
        )
        assert status == 413, body
        assert headers["content-type"] == "application/problem+json"
        assert "COLORIZE_BATCH_MAX_UPLOAD_BYTES" in json.loads(body)["detail"]
        # a chunked upload under the cap is taken
        small = _multipart("manifest", "m.jsonl", manifest_bytes(
            [{"custom_id": "a", "source": str(images[0])}]))  # fmt: skip
        status, _, body = _raw_post(server.base, "/batches", head, [small[:50], small[50:]])
        assert status == 202, body
        client = server.client()
        wait_status(client, json.loads(body)["id"], {"completed"})
        assert len(client.get("/batches").json()["data"]) == 1  # the refused one stored nothing

        # per-item model: one of the served models, else 422 naming them
        def submit(lines: list[dict[str, object]], **fields: str):  # type: ignore[no-untyped-def]
            files = {"manifest": ("m.jsonl", manifest_bytes(lines), "application/jsonl")}
            return client.post("/batches", files=files, data=fields)

        refused = submit([{"custom_id": "a", "source": str(images[0]), "model": "zhang-eccv16"}])
        assert refused.status_code == 422
        assert refused.headers["content-type"] == "application/problem+json"
        detail = refused.json()["detail"]
        assert "manifest line 1" in detail and "'zhang-eccv16'" in detail and "instcolor" in detail
        assert submit([{"custom_id": "a", "source": str(images[0])}],
                      options='{"model": "nope"}').status_code == 422  # fmt: skip
        taken = submit([{"custom_id": f"i{i}", "source": str(p), "model": "instcolor"}
                        for i, p in enumerate(images)])  # fmt: skip
        assert taken.status_code == 202, taken.text
        wait_status(client, taken.json()["id"], {"completed"})
        output = jsonl(client, f"/batches/{taken.json()['id']}/output")
        assert {o["response"]["model"] for o in output} == {"instcolor"}


def test_items_run_on_the_model_they_name(zoo_weights: Path, tmp_path: Path) -> None:
    images = write_images(tmp_path / "inputs", 4, size=32)
    lines = [{"custom_id": f"i{i}", "source": str(p)} for i, p in enumerate(images)]
    lines[1]["model"] = lines[3]["model"] = "zhang-eccv16"
    with serve(zoo_weights / "checkpoints", tmp_path, COLORIZE_WEIGHTS_DIR=str(zoo_weights),
               COLORIZE_MODELS="instcolor,zhang-eccv16") as server:  # fmt: skip
        client = server.client()
        response = client.post(
            "/batches",
            files={"manifest": ("m.jsonl", manifest_bytes(lines), "application/jsonl")},
        )
        assert response.status_code == 202, response.text
        batch_id = response.json()["id"]
        done = wait_status(client, batch_id, {"completed"}, timeout=300)
        assert done["request_counts"] == {"total": 4, "completed": 4, "failed": 0}
        output = {
            o["custom_id"]: o["response"] for o in jsonl(client, f"/batches/{batch_id}/output")
        }
        assert {k: v["model"] for k, v in output.items()} == {
            "i0": "instcolor", "i1": "zhang-eccv16", "i2": "instcolor", "i3": "zhang-eccv16"}  # fmt: skip
        assert output["i1"]["model_version"] != output["i0"]["model_version"]
        # a model this server does not serve is refused before anything is stored
        lines[0]["model"] = "zhang-siggraph17"
        refused = client.post(
            "/batches",
            files={"manifest": ("m.jsonl", manifest_bytes(lines), "application/jsonl")},
        )
        assert refused.status_code == 422
        assert "zhang-siggraph17" in refused.json()["detail"]
