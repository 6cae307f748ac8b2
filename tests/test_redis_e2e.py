"""Redis mode end to end with real processes: API replicas (``python -m service serve`` with
COLORIZE_QUEUE=redis, no model) and GPU workers (``python -m service worker``, tiny checkpoints on
the CPU), sharing a real Redis under a key prefix of the test's own.

Every test counts: each request sent gets exactly one response, carrying its own request ID and
(for 200) its own image; the API's ``colorize_requests_total`` adds up to the requests sent.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from redis_fixtures import OwnRedis, free_port, redis_prefix, redis_url

__all__ = ["redis_prefix", "redis_url"]  # fixtures

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[1]


def png(size: tuple[int, int]) -> bytes:
    image = Image.linear_gradient("L").resize(size)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


@dataclass
class Proc:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    port: int  # HTTP port (API) or metrics port (worker)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


@dataclass
class Fleet:
    """API replicas and workers on one Redis and prefix; everything is stopped at the end."""

    tmp: Path
    redis_url: str
    prefix: str
    checkpoints: Path
    settings: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("COLORIZE_")}
        env.update(
            OMP_NUM_THREADS="1", COLORIZE_QUEUE="redis", COLORIZE_REDIS_URL=self.redis_url,
            COLORIZE_REDIS_PREFIX=self.prefix, COLORIZE_HOST="127.0.0.1", COLORIZE_DEVICE="cpu",
            COLORIZE_WORKER_THREADS="2", COLORIZE_LOG_LEVEL="INFO", COLORIZE_WARMUP="false",
        )  # fmt: skip
        env.update(self.settings)
        return env

    def _spawn(self, name: str, args: list[str], port: int) -> Proc:
        log = self.tmp / f"{name}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "service", *args], cwd=ROOT, env=self.env(),
            stdout=log.open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        proc = Proc(name, process, log, port)
        self.procs.append(proc)
        return proc

    def api(self, name: str = "api") -> Proc:
        port = free_port()
        return self._spawn(name, ["serve", "--port", str(port)], port)

    def worker(self, name: str) -> Proc:
        port = free_port()
        args = ["worker", "--checkpoints", str(self.checkpoints), "--no-detector",
                "--metrics-port", str(port), "--consumer", name]  # fmt: skip
        return self._spawn(name, args, port)

    def wait_ready(self, *procs: Proc, timeout: float = 90) -> None:
        client = redis.Redis.from_url(self.redis_url)
        deadline = time.monotonic() + timeout
        waiting = list(procs)
        while waiting:
            for proc in list(waiting):
                if not proc.alive():
                    pytest.fail(f"{proc.name} exited early:\n{proc.tail()}")
                if self._ready(client, proc):
                    waiting.remove(proc)
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}\n{p.tail()}" for p in waiting)
                pytest.fail(f"not ready in {timeout} s:\n{logs}")
            time.sleep(0.1)
        client.close()

    def _ready(self, client: redis.Redis, proc: Proc) -> bool:
        try:
            if proc.name.startswith("api"):
                return httpx.get(f"{proc.url}/readyz", timeout=1).status_code == 200
            httpx.get(f"{proc.url}/metrics", timeout=1).raise_for_status()
            consumers = client.xinfo_consumers(f"{self.prefix}:jobs", "workers")
            return any(c["name"].decode() == proc.name for c in consumers)
        except (httpx.HTTPError, redis.RedisError):
            return False

    def kill(self, proc: Proc) -> None:
        proc.process.send_signal(signal.SIGKILL)
        proc.process.wait(10)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.alive():
                proc.process.terminate()
        for proc in self.procs:
            try:
                proc.process.wait(15)
            except subprocess.TimeoutExpired:
                proc.process.kill()
                proc.process.wait(5)


@pytest.fixture
def fleet(
    tmp_path: Path, redis_url: str, redis_prefix: str, tiny_checkpoints: Path
) -> Iterator[Fleet]:
    f = Fleet(tmp_path, redis_url, redis_prefix, tiny_checkpoints)
    yield f
    f.stop_all()


@dataclass
class Outcome:
    request_id: str
    status: int
    headers: dict[str, str]
    body: bytes
    size: tuple[int, int]


async def colorize(client: httpx.AsyncClient, api: Proc, size: tuple[int, int]) -> Outcome:
    request_id = uuid.uuid4().hex
    response = await client.post(
        f"{api.url}/colorize", content=png(size),
        headers={"content-type": "image/png", "x-request-id": request_id},
    )  # fmt: skip
    return Outcome(request_id, response.status_code, dict(response.headers), response.content, size)


def check_own_answer(outcome: Outcome) -> None:
    """The response belongs to its request: its ID echoed, its own image (size) returned."""
    assert outcome.headers["x-request-id"] == outcome.request_id
    if outcome.status == 200:
        assert Image.open(io.BytesIO(outcome.body)).size == outcome.size
    else:
        assert outcome.headers["content-type"].startswith("application/problem+json")


async def fire(
    apis: list[Proc], sizes: list[tuple[int, int]], timeout: float = 60
) -> list[Outcome]:
    async with httpx.AsyncClient(timeout=timeout) as client:
        outcomes = await asyncio.gather(
            *(colorize(client, apis[i % len(apis)], s) for i, s in enumerate(sizes))
        )
    for outcome in outcomes:
        check_own_answer(outcome)
    return list(outcomes)


def scrape(proc: Proc) -> str:
    return httpx.get(f"{proc.url}/metrics", timeout=5).text


def requests_counted(apis: list[Proc]) -> float:
    return sum(metric(scrape(api), "colorize_requests_total") for api in apis)


def distinct_sizes(n: int) -> list[tuple[int, int]]:
    return [(48 + 4 * i, 32 + 2 * (i % 7)) for i in range(n)]


def stream_state(fleet: Fleet) -> tuple[int, int]:
    client = redis.Redis.from_url(fleet.redis_url)
    try:
        stream = f"{fleet.prefix}:jobs"
        return int(client.xlen(stream)), int(client.xpending(stream, "workers")["pending"])
    finally:
        client.close()


def test_two_apis_two_workers_every_request_answered_once(fleet: Fleet) -> None:
    fleet.settings.update(COLORIZE_MAX_BATCH_SIZE="8", COLORIZE_MAX_BATCH_DELAY_MS="100")
    apis = [fleet.api("api-a"), fleet.api("api-b")]
    workers = [fleet.worker("w1"), fleet.worker("w2")]
    fleet.wait_ready(*apis, *workers)
    sizes = distinct_sizes(40)
    outcomes = asyncio.run(fire(apis, sizes))
    assert Counter(o.status for o in outcomes) == {200: 40}
    assert len({o.request_id for o in outcomes}) == 40
    assert requests_counted(apis) == 40
    batches = [metric(scrape(w), "colorize_batch_size_sum") for w in workers]
    assert sum(batches) == 40  # every job ran exactly once, on one of the workers
    assert all(b > 0 for b in batches)  # both workers took part
    worker_text = scrape(workers[0])
    assert metric(worker_text, "colorize_stage_duration_seconds_count", stage="detect") > 0
    assert "colorize_redis_pending_jobs" in worker_text
    assert metric(worker_text, "colorize_redis_consumers", model="instcolor") == 2
    assert stream_state(fleet) == (0, 0)
    info = httpx.get(f"{apis[0].url}/info", timeout=5).json()
    assert info["model"]["redis"]["consumers"] == 2


def test_one_batch_gathers_jobs_from_two_api_replicas(fleet: Fleet) -> None:
    fleet.settings.update(COLORIZE_MAX_BATCH_SIZE="8", COLORIZE_MAX_BATCH_DELAY_MS="1500",
                          COLORIZE_WARMUP="false")  # fmt: skip
    apis = [fleet.api("api-a"), fleet.api("api-b")]
    worker = fleet.worker("w1")
    fleet.wait_ready(*apis, worker)
    outcomes = asyncio.run(fire(apis, distinct_sizes(8)))  # 4 through each replica
    assert Counter(o.status for o in outcomes) == {200: 8}
    text = scrape(worker)
    # One batch of 8 (or 8 jobs in very few batches if the requests arrived unevenly).
    assert metric(text, "colorize_batch_size_sum") == 8
    assert metric(text, "colorize_batch_size_count") <= 2
    assert requests_counted(apis) == 8


def held_by(fleet: Fleet) -> dict[str, int]:
    client = redis.Redis.from_url(fleet.redis_url)
    try:
        summary = client.xpending(f"{fleet.prefix}:jobs", "workers")
        return {c["name"].decode(): int(c["pending"]) for c in summary["consumers"] or []}
    finally:
        client.close()


async def kill_holder_during(fleet: Fleet, workers: dict[str, Proc], sizes: list[tuple[int, int]],
                             api: Proc) -> tuple[list[Outcome], str]:  # fmt: skip
    """Send the requests; SIGKILL the worker holding most of them while its batch is open."""
    async with httpx.AsyncClient(timeout=60) as client:
        tasks = [asyncio.create_task(colorize(client, api, s)) for s in sizes]
        victim = ""
        deadline = time.monotonic() + 20
        while not victim:
            assert time.monotonic() < deadline, "no worker took the jobs"
            holders = {k: v for k, v in held_by(fleet).items() if v and k in workers}
            if holders:
                victim = max(holders, key=lambda k: holders[k])
                fleet.kill(workers[victim])
            await asyncio.sleep(0.02)
        outcomes = await asyncio.gather(*tasks)
    for outcome in outcomes:
        check_own_answer(outcome)
    return list(outcomes), victim


def test_sigkilled_worker_jobs_are_finished_by_the_other(fleet: Fleet) -> None:
    fleet.settings.update(
        COLORIZE_MAX_BATCH_SIZE="8", COLORIZE_MAX_BATCH_DELAY_MS="1500",
        COLORIZE_CLAIM_IDLE_MS="2000", COLORIZE_REQUEST_TIMEOUT_S="30", COLORIZE_WARMUP="false",
    )  # fmt: skip
    api = fleet.api()
    workers = {"w1": fleet.worker("w1"), "w2": fleet.worker("w2")}
    fleet.wait_ready(api, *workers.values())
    started = time.monotonic()
    outcomes, victim = asyncio.run(kill_holder_during(fleet, workers, distinct_sizes(6), api))
    assert Counter(o.status for o in outcomes) == {200: 6}
    assert time.monotonic() - started < 30  # within the clients' deadline
    assert not workers[victim].alive()
    survivor = next(p for name, p in workers.items() if name != victim)
    assert survivor.alive()
    assert metric(scrape(survivor), "colorize_batch_size_sum") >= 1
    assert "reclaimed" in survivor.tail()
    assert requests_counted([api]) == 6
    assert stream_state(fleet) == (0, 0)


def test_job_that_kills_every_worker_is_dead_lettered(fleet: Fleet) -> None:
    """A job whose every holder dies (killed each time it is picked up) stops after
    max_deliveries: it goes to the dead-letter stream and its client gets a clear 500."""
    fleet.settings.update(
        COLORIZE_MAX_BATCH_SIZE="8", COLORIZE_MAX_BATCH_DELAY_MS="1000",
        COLORIZE_CLAIM_IDLE_MS="1500", COLORIZE_MAX_DELIVERIES="2",
        COLORIZE_REQUEST_TIMEOUT_S="40", COLORIZE_WARMUP="false",
    )  # fmt: skip
    api = fleet.api()
    workers = {name: fleet.worker(name) for name in ("w1", "w2", "w3")}
    fleet.wait_ready(api, *workers.values())

    async def scenario() -> tuple[Outcome, list[str]]:
        killed: list[str] = []
        async with httpx.AsyncClient(timeout=60) as client:
            task = asyncio.create_task(colorize(client, api, (40, 40)))
            deadline = time.monotonic() + 30
            while not task.done():
                assert time.monotonic() < deadline
                for name, count in held_by(fleet).items():
                    if count and name in workers and workers[name].alive() and len(killed) < 2:
                        fleet.kill(workers[name])
                        killed.append(name)
                await asyncio.sleep(0.02)
            return await task, killed

    outcome, killed = asyncio.run(scenario())
    check_own_answer(outcome)
    assert len(killed) == 2
    assert outcome.status == 500
    problem = httpx.Response(500, content=outcome.body).json()
    assert problem["type"].endswith("/processing-failed")
    assert "dead-letter" in problem["detail"]
    client = redis.Redis.from_url(fleet.redis_url)
    dead = client.xrange(f"{fleet.prefix}:dead")
    client.close()
    assert len(dead) == 1
    assert dead[0][1][b"request_id"].decode() == outcome.request_id
    assert int(dead[0][1][b"deliveries"]) == 3
    [survivor] = [p for name, p in workers.items() if name not in killed]
    assert metric(scrape(survivor), "colorize_dropped_requests_total", reason="dead_letter") == 1
    # The service goes on: the next request is served.
    after = asyncio.run(fire([api], [(30, 20)]))
    assert after[0].status == 200
    assert requests_counted([api]) == 2
    assert stream_state(fleet) == (0, 0)


def test_cache_hit_is_marked_and_skips_the_worker(fleet: Fleet) -> None:
    api, worker = fleet.api(), fleet.worker("w1")
    fleet.wait_ready(api, worker)
    maps = Path(f"/proc/{api.process.pid}/maps")
    if maps.exists():  # the API replica of Redis mode never loads torch
        assert "libtorch" not in maps.read_text()
        assert "libtorch" in Path(f"/proc/{worker.process.pid}/maps").read_text()
    first = asyncio.run(fire([api], [(64, 48)]))[0]
    assert first.status == 200
    assert "x-cache" not in first.headers
    second = asyncio.run(fire([api], [(64, 48)]))[0]
    assert second.status == 200
    assert second.headers["x-cache"] == "hit"
    assert second.body == first.body
    api_text = scrape(api)
    assert metric(api_text, "colorize_cache_requests_total", result="hit") == 1
    assert metric(api_text, "colorize_cache_requests_total", result="miss") == 1
    assert metric(scrape(worker), "colorize_batch_size_sum") == 1  # the hit never reached it


def test_redis_stopped_and_restarted_under_traffic(fleet: Fleet, tmp_path: Path) -> None:
    server = OwnRedis(tmp_path)  # our own: the shared Redis is never stopped
    server.start()
    try:
        fleet.redis_url = server.url
        fleet.settings.update(COLORIZE_REQUEST_TIMEOUT_S="10", COLORIZE_MAX_BATCH_DELAY_MS="20")
        api, worker = fleet.api(), fleet.worker("w1")
        fleet.wait_ready(api, worker)
        outcomes, readiness = asyncio.run(traffic_through_outage(api, server))
        statuses = Counter(o.status for o in outcomes)
        assert set(statuses) <= {200, 503, 504}, statuses
        assert statuses[503] > 0  # the outage was seen
        assert statuses[200] > 0
        assert 503 in readiness
        assert readiness[-1] == 200  # ready again by itself
        for outcome in outcomes:
            if outcome.status == 503:
                problem = httpx.Response(503, content=outcome.body).json()
                # no-workers: Redis came back empty and the worker's next heartbeat (<= 1 s)
                # had not yet arrived
                assert problem["type"].endswith(("/unavailable", "/overloaded", "/no-workers"))
                assert outcome.headers.get("retry-after")
        tail = outcomes[-6:]
        assert all(o.status == 200 for o in tail), [o.status for o in tail]
        assert api.alive()
        assert worker.alive()
        assert len({o.request_id for o in outcomes}) == len(outcomes)
        assert requests_counted([api]) == len(outcomes)
    finally:
        fleet.stop_all()
        server.stop()


async def traffic_through_outage(api: Proc, server: OwnRedis) -> tuple[list[Outcome], list[int]]:
    """Three clients in a loop; Redis is killed after 1.5 s and restarted 2 s later."""
    outcomes: list[Outcome] = []
    readiness: list[int] = []
    stop = asyncio.Event()
    recovered_at: list[float] = []

    async def client_loop(i: int) -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            n = 0
            while not stop.is_set():
                outcome = await colorize(client, api, (40 + i, 30 + n % 10))
                check_own_answer(outcome)
                outcomes.append(outcome)
                n += 1
                if outcome.status != 200:
                    await asyncio.sleep(0.05)

    async def probe() -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            while not stop.is_set():
                readiness.append((await client.get(f"{api.url}/readyz")).status_code)
                await asyncio.sleep(0.1)

    async def operator() -> None:
        await asyncio.sleep(1.5)
        await asyncio.to_thread(server.stop)
        await asyncio.sleep(2.0)
        await asyncio.to_thread(server.start)
        deadline = time.monotonic() + 20
        while True:  # run on until six answers in a row succeed after the restart
            recent = outcomes[-6:]
            if len(recent) == 6 and all(o.status == 200 for o in recent) and recovered_at:
                break
            if readiness and readiness[-1] == 200 and not recovered_at:
                recovered_at.append(time.monotonic())
            assert time.monotonic() < deadline, "no recovery after Redis came back"
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)
        stop.set()

    await asyncio.gather(*(client_loop(i) for i in range(3)), probe(), operator())
    return outcomes, readiness
