"""A real Prometheus server scrapes the real service processes; the dashboard's queries run.

Two stacks, both on loopback with the tiny checkpoints (no detector) on the CPU:

- memory mode: one ``python -m service serve`` process (the CPU-only compose setup);
- Redis mode: an API (``serve`` with ``COLORIZE_QUEUE=redis``) and two ``python -m service worker``
  replicas on a private ``redis-server``, each scraped on its own port as the compose stack's
  Prometheus scrapes every replica (the production config finds them through Docker DNS).

A Prometheus server (Debian's ``prometheus`` package) scrapes every second. The tests send
colorize requests in waves between scrapes, wait until the per-stage histograms arrive through
Prometheus' HTTP API, then evaluate every PromQL expression of the Grafana dashboard as Grafana
sends it and assert that data comes back.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from deploy_support import (
    REPO,
    PanelQuery,
    dashboard_queries,
    evaluable,
    free_port,
    require_binary,
)
from PIL import Image
from redis_fixtures import OwnRedis

from service.core.metrics import STAGES

pytestmark = pytest.mark.slow

SCRAPE_INTERVAL_S = 1
RATE_WINDOW = "2m"  # what $__rate_interval becomes: covers the whole test's traffic
WAVES, PER_WAVE = 3, 4
BAD_REQUESTS = 1  # per wave: a text body, refused with 415 (client_error)
WORKERS = 2

GPU_PANEL = "GPU memory allocated"  # selects processes whose model runs on CUDA; these run on CPU
# Panels without a meaningful value in a mode: the query must still be valid PromQL that
# Prometheus evaluates; data is not required.
NO_DATA_EXPECTED = {
    "memory": {
        "Cache hit ratio": "the result cache exists in Redis mode only: 0 look-ups give 0/0 = NaN",
        GPU_PANEL: "no CUDA device in this test",
        # the Redis stream gauges are labelled per model and set by a Redis queue only
        "In flight and queued/C": "no Redis stream in memory mode (colorize_redis_stream_length)",
        "In flight and queued/D": "no Redis stream in memory mode (colorize_redis_pending_jobs)",
        "Redis consumers/A": "no Redis stream in memory mode (colorize_redis_consumers)",
    },
    "redis": {GPU_PANEL: "no CUDA device in this test"},
}
QUERIES = dashboard_queries()


@dataclass
class Prometheus:
    url: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert response.status_code == 200, f"{expr}: {body}"
        assert body["status"] == "success", f"{expr}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def panel_query(self, expr: str) -> list[dict[str, Any]]:
        """A dashboard expression, with Grafana's variables as Grafana would substitute them."""
        return self.query(evaluable(expr, RATE_WINDOW))

    def scalar(self, expr: str) -> float:
        (series,) = self.panel_query(expr)
        return float(series["value"][1])


@dataclass
class Stack:
    """What one test module's traffic did, and the Prometheus that saw it."""

    prometheus: Prometheus
    api_url: str
    statuses: dict[int, int]


def _wait_until(predicate: Callable[[], bool], timeout: float, what: str, *logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    tails = "\n".join(f"--- {log}\n{log.read_text()[-3000:]}" for log in logs if log.exists())
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


@contextlib.contextmanager
def _process(
    command: list[str], log: Path, ready_url: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` until the block ends (SIGTERM, then kill); wait for ``ready_url``: 200."""
    with log.open("wb") as sink:
        process = subprocess.Popen(command, cwd=log.parent, env=env, stdout=sink, stderr=sink)
    try:
        _wait_until(
            lambda: process.poll() is not None or _status(ready_url) == 200,
            120, f"{ready_url} ({Path(command[0]).name} {' '.join(command[1:4])})", log,
        )  # fmt: skip
        assert process.poll() is None, f"{command} exited:\n{log.read_text()[-3000:]}"
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def _service_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLORIZE_")}
    env.update(
        PYTHONPATH=str(REPO), COLORIZE_DEVICE="cpu", COLORIZE_WARMUP="false",
        COLORIZE_MAX_BATCH_SIZE="4", COLORIZE_MAX_BATCH_DELAY_MS="20", **extra,
    )  # fmt: skip
    return env


def _service_command(command: str, checkpoints: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "service", command, "--checkpoints", str(checkpoints),
            "--no-detector", *args]  # fmt: skip


@contextlib.contextmanager
def _prometheus(folder: Path, jobs: dict[str, list[str]]) -> Iterator[Prometheus]:
    """A Prometheus server on a free loopback port scraping ``jobs`` (name -> host:port list)."""
    binary = require_binary("prometheus")
    config = {
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "scrape_timeout": "900ms"},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": targets}]}
            for job, targets in jobs.items()
        ],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    command = [
        binary, f"--config.file={folder / 'prometheus.yml'}",
        f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1h", "--log.level=warn",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with _process(command, folder / "prometheus.log", f"{url}/-/ready"):
        prometheus = Prometheus(url)
        targets = sum(len(t) for t in jobs.values())
        _wait_until(
            lambda: len(prometheus.query("up == 1")) == targets,
            30, "the first successful scrape of every target", folder / "prometheus.log",
        )  # fmt: skip
        yield prometheus


def _png(seed: int) -> bytes:
    image = Image.linear_gradient("L").resize((160, 120))
    image.paste(40 + 10 * seed, (20, 30, 70 + seed, 100))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _send_waves(api_url: str, images: Callable[[int], list[bytes]]) -> dict[int, int]:
    """WAVES waves, a few scrapes apart so that rates see increases; returns status counts."""
    statuses: dict[int, int] = {}

    def colorize(body: bytes | None) -> int:
        content, kind = (body, "image/png") if body is not None else (b"text", "text/plain")
        response = httpx.post(
            f"{api_url}/colorize", content=content, headers={"content-type": kind}, timeout=60
        )
        return response.status_code

    with ThreadPoolExecutor(PER_WAVE + BAD_REQUESTS) as pool:
        for wave in range(WAVES):
            if wave:
                time.sleep(2 * SCRAPE_INTERVAL_S)
            bodies: list[bytes | None] = [*images(wave), *([None] * BAD_REQUESTS)]
            for status in pool.map(colorize, bodies):
                statuses[status] = statuses.get(status, 0) + 1
    assert statuses == {200: WAVES * PER_WAVE, 415: WAVES * BAD_REQUESTS}, statuses
    return statuses


def _wait_for_totals(prometheus: Prometheus, expected: int) -> None:
    def arrived() -> bool:
        result = prometheus.query('sum(colorize_stage_duration_seconds_count{stage="total"})')
        return bool(result) and float(result[0]["value"][1]) >= expected

    _wait_until(arrived, 30, "the last wave's observations in Prometheus")
    time.sleep(2 * SCRAPE_INTERVAL_S)  # one more scrape, so rates end on the final values


# --- memory mode: one process --------------------------------------------------------------------


@pytest.fixture(scope="module")
def memory_stack(
    tiny_checkpoints: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("memory-stack")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = _service_command("serve", tiny_checkpoints, "--host", "127.0.0.1", "--port",
                               str(port))  # fmt: skip
    with (
        _process(command, folder / "serve.log", f"{url}/readyz", _service_env(COLORIZE_QUEUE="memory")),
        _prometheus(folder, {"colorize-api": [f"127.0.0.1:{port}"]}) as prometheus,
    ):  # fmt: skip
        statuses = _send_waves(url, lambda wave: [_png(0)] * PER_WAVE)
        _wait_for_totals(prometheus, statuses[200])
        yield Stack(prometheus, url, statuses)


def test_per_stage_histograms_arrive_in_prometheus(memory_stack: Stack) -> None:
    prometheus, statuses = memory_stack.prometheus, memory_stack.statuses
    result = prometheus.query("sum by (stage) (colorize_stage_duration_seconds_count)")
    counts = {series["metric"]["stage"]: float(series["value"][1]) for series in result}
    assert set(counts) == set(STAGES)
    for stage, count in counts.items():
        assert count == statuses[200], stage  # one observation per successful request
    buckets = prometheus.query(
        'count(colorize_stage_duration_seconds_bucket{stage="total", job="colorize-api"})'
    )
    assert float(buckets[0]["value"][1]) == 14  # 1 ms .. 10 s and +Inf
    p95 = prometheus.scalar(
        "histogram_quantile(0.95, sum by (le) (rate("
        'colorize_stage_duration_seconds_bucket{stage="total"}[$__rate_interval])))'
    )
    assert 0 < p95 <= 10


def test_request_counters_arrive_with_outcome_and_status(memory_stack: Stack) -> None:
    result = memory_stack.prometheus.query("sum by (outcome, status) (colorize_requests_total)")
    counts = {(s["metric"]["outcome"], s["metric"]["status"]): float(s["value"][1]) for s in result}
    assert counts[("ok", "200")] == memory_stack.statuses[200]
    assert counts[("client_error", "415")] == memory_stack.statuses[415]


def _assert_panel_has_data(stack: Stack, query: PanelQuery, mode: str) -> None:
    result = stack.prometheus.panel_query(query.expr)  # any PromQL error fails here
    exceptions = NO_DATA_EXPECTED[mode]
    if query.panel in exceptions or f"{query.panel}/{query.ref}" in exceptions:
        return
    assert result, f"{query.panel}: no series for {query.expr}"
    values = [float(series["value"][1]) for series in result]
    assert any(math.isfinite(v) for v in values), f"{query.panel}: only NaN/Inf: {result}"


@pytest.mark.parametrize("query", QUERIES, ids=lambda q: f"{q.panel}/{q.ref}")
def test_dashboard_query_returns_data_in_memory_mode(
    memory_stack: Stack, query: PanelQuery
) -> None:
    _assert_panel_has_data(memory_stack, query, "memory")


def test_rates_see_the_traffic(memory_stack: Stack) -> None:
    """The request-rate panel shows both statuses, and the batch-size heatmap has observations."""
    prometheus = memory_stack.prometheus
    rates = prometheus.panel_query(
        "sum by (status) (rate(colorize_requests_total[$__rate_interval]))"
    )
    by_status = {s["metric"]["status"]: float(s["value"][1]) for s in rates}
    assert by_status["200"] > 0
    assert by_status["415"] > 0
    heatmap = prometheus.panel_query(
        "sum by (le) (increase(colorize_batch_size_bucket[$__rate_interval]))"
    )
    assert max(float(s["value"][1]) for s in heatmap) > 0
    assert prometheus.scalar("count(colorize_model_info)") == 1


def test_no_data_exceptions_name_real_panels() -> None:
    panels = {q.panel for q in QUERIES} | {f"{q.panel}/{q.ref}" for q in QUERIES}
    for mode, exceptions in NO_DATA_EXPECTED.items():
        assert set(exceptions) <= panels, mode


def test_container_healthcheck_script(memory_stack: Stack) -> None:
    script = REPO / "deploy" / "healthcheck.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLORIZE_")}
    port = memory_stack.api_url.rsplit(":", 1)[1]
    ready = subprocess.run(
        [sys.executable, str(script)], env={**env, "COLORIZE_PORT": port},
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert ready.returncode == 0, ready.stderr
    closed = subprocess.run(
        [sys.executable, str(script)], env={**env, "COLORIZE_PORT": str(free_port())},
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert closed.returncode == 1
    assert "healthcheck:" in closed.stderr


# --- Redis mode: API + two workers ---------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_stack(
    tiny_checkpoints: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("redis-stack")
    redis = OwnRedis(folder)
    redis.start()
    env = _service_env(COLORIZE_QUEUE="redis", COLORIZE_REDIS_URL=redis.url)
    api_port = free_port()
    api_url = f"http://127.0.0.1:{api_port}"
    worker_ports = [free_port() for _ in range(WORKERS)]
    try:
        with contextlib.ExitStack() as stack:
            for i, port in enumerate(worker_ports):
                command = _service_command("worker", tiny_checkpoints, "--metrics-port", str(port))
                # A worker's metrics port opens once its model is loaded (the compose health URL).
                stack.enter_context(_process(
                    command, folder / f"worker-{i}.log", f"http://127.0.0.1:{port}/metrics", env
                ))  # fmt: skip
            command = _service_command("serve", tiny_checkpoints, "--host", "127.0.0.1",
                                       "--port", str(api_port))  # fmt: skip
            stack.enter_context(_process(command, folder / "api.log", f"{api_url}/readyz", env))
            prometheus = stack.enter_context(_prometheus(folder, {
                "colorize-api": [f"127.0.0.1:{api_port}"],
                "colorize-worker": [f"127.0.0.1:{port}" for port in worker_ports],
            }))  # fmt: skip
            # Waves 0 and 2 send new images (cache misses), wave 1 repeats wave 0's (hits).
            statuses = _send_waves(
                api_url, lambda wave: [_png(10 * (wave % 2) + i) for i in range(PER_WAVE)]
            )
            _wait_for_totals(prometheus, statuses[200])
            yield Stack(prometheus, api_url, statuses)
    finally:
        redis.stop()


def test_every_replica_is_scraped_in_redis_mode(redis_stack: Stack) -> None:
    prometheus = redis_stack.prometheus
    up = {s["metric"]["job"]: float(s["value"][1]) for s in prometheus.query("sum by (job) (up)")}
    assert up == {"colorize-api": 1, "colorize-worker": WORKERS}
    assert prometheus.scalar("count(colorize_model_info)") == WORKERS  # workers hold the model
    assert prometheus.scalar("max(colorize_redis_consumers)") == WORKERS
    # The API answers, the workers run the stages: together every stage arrives.
    result = prometheus.query("sum by (stage) (colorize_stage_duration_seconds_count) > 0")
    assert {s["metric"]["stage"] for s in result} == set(STAGES)
    by_job = prometheus.query(
        'sum by (job) (colorize_stage_duration_seconds_count{stage=~"fusion|total"}) > 0'
    )
    assert {s["metric"]["job"] for s in by_job} == {"colorize-api", "colorize-worker"}


def test_cache_hit_ratio_sees_repeated_images(redis_stack: Stack) -> None:
    hits = redis_stack.prometheus.scalar('sum(colorize_cache_requests_total{result="hit"})')
    misses = redis_stack.prometheus.scalar('sum(colorize_cache_requests_total{result="miss"})')
    assert hits >= 1
    assert misses >= 1
    ratio = redis_stack.prometheus.scalar(
        next(q.expr for q in QUERIES if q.panel == "Cache hit ratio")
    )
    assert 0 < ratio < 1


@pytest.mark.parametrize("query", QUERIES, ids=lambda q: f"{q.panel}/{q.ref}")
def test_dashboard_query_returns_data_in_redis_mode(redis_stack: Stack, query: PanelQuery) -> None:
    _assert_panel_has_data(redis_stack, query, "redis")
