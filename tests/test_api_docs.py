"""The API documentation works offline, and the OpenAPI schema says what the server enforces.

``/docs`` (Swagger UI) and ``/redoc`` load their scripts from the app itself; a real headless
Chromium, with every host but loopback unresolvable, renders the operations from ``/openapi.json``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import image_corpus as corpus
import pytest
from service_helpers import running_app, service_settings

PROBLEM = "application/problem+json"


def _asset_urls(page: str) -> list[str]:
    return re.findall(r"""(?:src|href)=["']?([^"' >]+)""", page) + re.findall(
        r"""url: ?["']([^"']+)["']""", page
    )


async def test_docs_pages_load_nothing_from_other_hosts(tiny_checkpoints: Path) -> None:
    async with running_app(service_settings(tiny_checkpoints)) as (_, client):
        for page_path in ("/docs", "/redoc"):
            page = await client.get(page_path)
            assert page.status_code == 200, page_path
            urls = _asset_urls(page.text)
            assert urls, page.text
            for url in urls:
                assert not re.match(r"(https?:)?//", url), f"{page_path} loads {url}"
                asset = await client.get(url)
                assert asset.status_code == 200, url
                assert len(asset.content) > 100, url
        bundle = (await client.get("/docs")).text
        assert "swagger-ui-bundle.js" in bundle


async def test_openapi_matches_what_is_enforced(tiny_checkpoints: Path) -> None:
    settings = service_settings(tiny_checkpoints, instance_limit=5)
    async with running_app(settings) as (_, client):
        schema = (await client.get("/openapi.json")).json()
        operation = schema["paths"]["/colorize"]["post"]
        body = operation["requestBody"]["content"]
        assert {"multipart/form-data", "image/*", "application/octet-stream"} <= set(body)
        limit = next(p for p in operation["parameters"] if p["name"] == "max_instances")
        assert limit["schema"]["maximum"] == 5
        assert "at most 5" in limit["description"]

        # what the schema says is what the server does: 5 accepted, 6 refused, octet-stream read
        image = corpus.png(40, 30)
        octet = {"content-type": "application/octet-stream"}
        ok = await client.post("/colorize?max_instances=5", content=image, headers=octet)
        assert ok.status_code == 200, ok.text
        refused = await client.post("/colorize?max_instances=6", content=image, headers=octet)
        assert refused.status_code == 422
        assert refused.headers["content-type"] == PROBLEM
        assert "max_instances" in refused.json()["detail"]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_swagger_ui_renders_offline_in_chromium(tiny_checkpoints: Path, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        message = "chromium is not installed: apt-get install -y chromium"
        if os.environ.get("CI"):
            pytest.fail(f"{message} -- CI must install it")
        pytest.skip(message)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--checkpoints", str(tiny_checkpoints),
         "--no-detector", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log.open("w"), stderr=subprocess.STDOUT,
        env={**os.environ, "COLORIZE_WARMUP": "false"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, log.read_text()
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        dom = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}",
             # every host but this machine is unresolvable: a CDN script could not load
             "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
             "--virtual-time-budget=30000", "--dump-dom", base + "/docs"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    finally:
        server.terminate()
        server.wait(30)
    assert dom.returncode == 0, dom.stderr[-2000:]
    # Swagger UI drew the operations it read from /openapi.json
    assert "opblock" in dom.stdout, dom.stdout[-2000:]
    assert "/colorize" in dom.stdout
    assert "InstColor Service" in dom.stdout
