"""A real ``python -m service serve`` process on a free port: a real HTTP request, SIGTERM drain,
and the refusal to start without weights."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import image_corpus as corpus
import pytest

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(checkpoints: Path, port: int, log: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--checkpoints", str(checkpoints),
         "--no-detector", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, text=True,
        # settings also come from the environment; batch buckets 1 and 2 keep the warm-up short
        env={**os.environ, "COLORIZE_MAX_BATCH_SIZE": "2", "COLORIZE_MAX_BATCH_DELAY_MS": "20"},
    )  # fmt: skip


def wait_ready(base: str, process: subprocess.Popen[str], log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the server did not become ready")


def in_flight(base: str) -> float:
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith("colorize_in_flight_requests "):
            return float(line.split()[1])
    return 0.0


def test_serve_answers_real_http_and_drains_on_sigterm(
    tiny_checkpoints: Path, tmp_path: Path
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    process = start(tiny_checkpoints, port, log)
    try:
        wait_ready(base, process, log)
        response = httpx.post(
            base + "/colorize",
            files={"image": ("photo.jpg", corpus.jpeg(64, 48), "image/jpeg")},
            timeout=30,
        )
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/jpeg"
        assert "queue;dur=" in response.headers["server-timing"]
        assert "colorize_batch_size_count" in httpx.get(base + "/metrics").text

        # Requests in flight when SIGTERM arrives all finish; then the process exits cleanly.
        results: list[int] = []

        def post(i: int) -> None:
            r = httpx.post(
                base + "/colorize?boxes=[[1,1,40,40]]",
                content=corpus.png(60 + i, 50),
                headers={"content-type": "image/png"},
                timeout=60,
            )
            results.append(r.status_code)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        # SIGTERM once every request is inside the handler (not after a fixed sleep, which a
        # loaded machine can outrun): the in-flight gauge counts them.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and in_flight(base) < 6 and not results:
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(60)
        assert process.wait(60) == 0, log.read_text()
        assert results == [200] * 6
        assert "drained and closed" in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_refuses_to_start_without_weights(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--checkpoints", str(tmp_path / "none"),
         "--no-detector", "--port", str(free_port())],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "latest_net_G.pth" in result.stderr
    assert "fetch-weights" in result.stderr


def test_serve_reports_bad_settings(tiny_checkpoints: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--checkpoints", str(tiny_checkpoints),
         "--no-detector", "--port", "70000"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "COLORIZE_PORT=70000" in result.stderr
