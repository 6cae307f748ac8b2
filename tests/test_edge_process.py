"""The public edge against a real ``python -m service serve`` process: header size (431), header
deadline (408 / close), idle timeout, connection cap (503), API keys, and client aborts during
upload (499, no traceback). One server for the module keeps the CPU cost down."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import image_corpus as corpus
import pytest
from test_serve_process import free_port, wait_ready

pytestmark = pytest.mark.slow

KEY = "alice-0123456789abcdef"
HEADER_TIMEOUT_S = 1.5
BODY_TIMEOUT_S = 2.5
KEEP_ALIVE_S = 1.0
MAX_CONNECTIONS = 12


class Server:
    def __init__(self, base: str, port: int, log: Path) -> None:
        self.base, self.port, self.log = base, port, log

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return sock

    def healthy(self) -> bool:
        return httpx.get(self.base + "/healthz", timeout=5).status_code == 200


@pytest.fixture(scope="module")
def server(tiny_checkpoints: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    log = tmp_path_factory.mktemp("edge") / "serve.log"
    env = {
        **os.environ,
        "COLORIZE_MAX_BATCH_SIZE": "1",
        "COLORIZE_WARMUP": "false",
        "COLORIZE_MAX_HEADER_BYTES": "8192",
        "COLORIZE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "COLORIZE_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "COLORIZE_KEEP_ALIVE_TIMEOUT_S": str(KEEP_ALIVE_S),
        "COLORIZE_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "COLORIZE_API_KEYS": f"alice:{KEY},bob:bob-0123456789abcdef",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--checkpoints", str(tiny_checkpoints),
         "--no-detector", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process, log)
        yield Server(base, port, log)
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert "Traceback" not in log.read_text(), log.read_text()


def read_all(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout`` passes)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pytest.fail(f"the server kept the connection open past {timeout} s (got {data!r})")
    return data


def test_oversized_headers_get_431_and_the_server_stays_healthy(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
        reply = read_all(sock, 10)
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]
    assert b"8192 bytes" in reply
    response = httpx.get(server.base + "/healthz", headers={"X-Fine": "b" * 4000})
    assert response.status_code == 200  # headers within the limit are served


def test_headers_sent_too_slowly_get_408_and_close(server: Server) -> None:
    with server.connect() as sock:
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
        reply = read_all(sock, HEADER_TIMEOUT_S + 5)
        waited = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408 "), reply
    assert HEADER_TIMEOUT_S * 0.8 <= waited < HEADER_TIMEOUT_S + 5
    assert server.healthy()


def test_silent_and_idle_connections_are_closed(server: Server) -> None:
    with server.connect() as silent:
        assert read_all(silent, HEADER_TIMEOUT_S + 5) == b""  # never sent a byte: just closed
    with server.connect() as idle:
        idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = read_all(idle, KEEP_ALIVE_S + HEADER_TIMEOUT_S + 5)  # keep-alive, then closed
    assert reply.startswith(b"HTTP/1.1 200 "), reply


def test_connections_over_the_cap_get_503(server: Server) -> None:
    held = [server.connect() for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)  # the server has accepted them
        with server.connect() as extra:
            reply = read_all(extra, 5)
        assert reply.startswith(b"HTTP/1.1 503 "), reply
        assert b"too many open connections" in reply
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the held sockets' close reaches the server
        try:
            if server.healthy():
                break
        except httpx.TransportError:
            time.sleep(0.1)
    assert server.healthy()


def test_api_keys_on_a_real_server(server: Server) -> None:
    image = corpus.encode(corpus.gray(64, 48), "PNG")
    url = server.base + "/colorize"
    plain = {"Content-Type": "image/png"}
    refused = httpx.post(url, content=image, headers=plain)
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["type"].endswith("/unauthorized")
    wrong = httpx.post(url, content=image, headers={**plain, "X-API-Key": "alice-0123456789abcdeX"})
    assert wrong.status_code == 401
    assert "not valid" in wrong.json()["detail"]
    ok = httpx.post(url, content=image, headers={**plain, "X-API-Key": KEY})
    assert ok.status_code == 200, ok.text
    bearer = httpx.post(url, content=image, headers={**plain, "Authorization": "Bearer " + KEY})
    assert bearer.status_code == 200
    for open_path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"):
        assert httpx.get(server.base + open_path).status_code == 200, open_path
    assert httpx.get(server.base + "/info").status_code == 401
    metrics = httpx.get(server.base + "/metrics").text
    assert 'colorize_requests_by_key_total{key="alice",outcome="ok"} 2.0' in metrics
    assert "colorize_unauthorized_requests_total 3.0" in metrics  # no key, wrong key, /info
    assert KEY not in metrics


def test_a_body_sent_too_slowly_gets_408_and_close(server: Server) -> None:
    """A few bytes per second: the body deadline ends it, counted as a 408 of /colorize."""

    def count() -> float:
        text = httpx.get(server.base + "/metrics").text
        for line in text.splitlines():
            if line.startswith('colorize_requests_total{outcome="client_error",status="408"}'):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = count()
    with server.connect() as sock:
        started = time.monotonic()
        sock.sendall(
            b"POST /colorize HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"X-API-Key: " + KEY.encode() + b"\r\nContent-Length: 100000\r\n\r\n\x89PNG"
        )
        stop = threading.Event()

        def trickle() -> None:  # 4 bytes a second, well within the header limits' patience
            while not stop.wait(0.25):
                try:
                    sock.sendall(b"\x00")
                except OSError:
                    return

        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        try:
            reply = read_all(sock, BODY_TIMEOUT_S + 10)
        finally:
            stop.set()
            sender.join(5)
        waited = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408 "), reply
    assert b"request body too slow" in reply
    assert BODY_TIMEOUT_S * 0.8 <= waited < BODY_TIMEOUT_S + 10  # and the socket was closed
    deadline = time.monotonic() + 10
    while count() < before + 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert count() == before + 1
    assert "body_timeout_s" in server.log.read_text()
    assert server.healthy()
    # a body that arrives in time is unaffected
    ok = httpx.post(server.base + "/colorize", content=corpus.png(),
                    headers={"content-type": "image/png", "x-api-key": KEY})  # fmt: skip
    assert ok.status_code == 200


def test_client_abort_during_upload_is_a_499_without_traceback(server: Server) -> None:
    for _ in range(3):
        with server.connect() as sock:
            sock.sendall(
                b"POST /colorize HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"X-API-Key: " + KEY.encode() + b"\r\nContent-Length: 100000\r\n\r\n" + b"\x89PNG"
            )
            time.sleep(0.3)  # the handler is reading the body
    deadline = time.monotonic() + 10
    metrics = ""
    while time.monotonic() < deadline:
        metrics = httpx.get(server.base + "/metrics").text
        if 'colorize_requests_total{outcome="client_closed",status="499"} 3.0' in metrics:
            break
        time.sleep(0.2)
    assert 'colorize_requests_total{outcome="client_closed",status="499"} 3.0' in metrics
    assert 'status="500"' not in metrics
    log = server.log.read_text()
    assert "client disconnected during the upload" in log
    assert "Traceback" not in log
