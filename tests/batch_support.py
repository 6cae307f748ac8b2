"""Helpers for the batch API tests: a real ``serve`` process, tiny images, a webhook receiver.

The receiver is a real HTTP server (``http.server`` in a thread on 127.0.0.1) that verifies
every delivery with the ``standardwebhooks`` package, as a caller's endpoint would.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from standardwebhooks import Webhook

SECRET = "whsec_" + base64.b64encode(b"batch-test-secret-0123456789abcd").decode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tiny_png(seed: int, size: int = 8) -> bytes:
    """A small grey PNG, different per seed."""
    image = Image.new("L", (size, size))
    image.putdata([(seed * 37 + i * 11) % 256 for i in range(size * size)])
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def write_images(folder: Path, count: int, size: int = 8) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img{i:05d}.png"
        path.write_bytes(tiny_png(i, size))
        paths.append(path)
    return paths


def manifest_bytes(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


@dataclass
class Server:
    base: str
    process: subprocess.Popen[str]
    log: Path
    env: dict[str, str]
    args: list[str]
    headers: dict[str, str] = field(default_factory=dict)

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"X-API-Key": key} if key else self.headers
        return httpx.Client(base_url=self.base, headers=headers, timeout=60)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def restart(self) -> None:
        self.process = _popen(self.args, self.env, self.log, append=True)
        wait_ready(self)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _popen(args: list[str], env: dict[str, str], log: Path, append: bool = False) -> Any:
    return subprocess.Popen(
        args, stdout=log.open("a" if append else "w"), stderr=subprocess.STDOUT, text=True, env=env
    )


def wait_ready(server: Server, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.process.poll() is None, server.log.read_text()
        try:
            if httpx.get(server.base + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the server did not become ready:\n" + server.log.read_text())


@contextmanager
def serve(checkpoints: Path, tmp: Path, **env: str) -> Iterator[Server]:
    port = free_port()
    values = {
        **os.environ,
        "COLORIZE_STATE_DIR": str(tmp / "state"),
        "COLORIZE_BATCH_OUTPUT_DIR": str(tmp / "out"),
        "COLORIZE_BATCH_INPUT_ROOTS": str(tmp / "inputs"),
        "COLORIZE_WEBHOOK_SECRET": SECRET,
        "COLORIZE_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        "COLORIZE_WEBHOOK_BACKOFF_S": "0.2",
        "COLORIZE_MAX_BATCH_SIZE": "4",
        "COLORIZE_MAX_BATCH_DELAY_MS": "2",
        "COLORIZE_WARMUP": "false",
        **env,
    }
    args = [sys.executable, "-m", "service", "serve", "--checkpoints", str(checkpoints),
            "--no-detector", "--device", "cpu", "--precision", "fp32",
            "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    log = tmp / f"serve-{port}.log"
    server = Server(f"http://127.0.0.1:{port}", _popen(args, values, log), log, values, args)
    try:
        wait_ready(server)
        yield server
    finally:
        server.stop()


def wait_status(
    client: httpx.Client, batch_id: str, statuses: set[str], timeout: float = 120
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.get(f"/batches/{batch_id}").json()
        if batch["status"] in statuses:
            return batch
        time.sleep(0.2)
    raise TimeoutError(f"batch {batch_id} still {batch['status']}: {batch}")


def jsonl(client: httpx.Client, path: str) -> list[dict[str, Any]]:
    response = client.get(path)
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines() if line]


class WebhookReceiver:
    """A real HTTP endpoint that verifies each delivery's Standard Webhooks signature."""

    def __init__(self, secret: str = SECRET, fail_first: int = 0, redirect: bool = False) -> None:
        self.verified: list[dict[str, Any]] = []
        self.rejected: list[str] = []
        self.requests = 0
        self.fail_first = fail_first
        receiver = self
        verifier = Webhook(secret)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                receiver.requests += 1
                if redirect:
                    self.send_response(307)
                    self.send_header("location", "http://127.0.0.1:1/elsewhere")
                    self.end_headers()
                    return
                if receiver.requests <= receiver.fail_first:
                    self.send_response(503)
                    self.end_headers()
                    return
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    receiver.verified.append(verifier.verify(body, headers))
                    self.send_response(204)
                except Exception as exc:
                    receiver.rejected.append(repr(exc))
                    self.send_response(400)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, event: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.verified:
                if message["type"] == event:
                    return message
            time.sleep(0.05)
        raise TimeoutError(f"no verified {event}; rejected: {self.rejected}")
