"""Redis mode benchmark: throughput with 1 and 2 worker processes, and the per-request overhead of
the Redis path against the in-process path. A benchmark, not a test.

It starts real processes (``python -m service serve`` and ``python -m service worker``) on a Redis
(``--redis-url``, default 127.0.0.1:6379, under a key prefix of its own) and measures, client side:

* ``latency``: one user, sequential requests: the per-request cost of each path (median, p95);
* ``throughput``: ``--users`` closed-loop users for ``--requests`` requests: requests/s;
* ``cache hit``: the same image again with the result cache on (no worker involved).

All processes run with OMP_NUM_THREADS=1 (one compute thread each) so that "2 workers" means two
cores' worth of model compute on a 2-core box, and memory mode is compared like for like.
Weights: ``--checkpoints`` or, by default, random tiny (width 8) networks in the official layout
(tests/weight_files.py), so the figures measure the serving path, not the network.

    python loadtests/bench_redis.py                    # writes docs/readme/benchmarks-redis.md
    python loadtests/bench_redis.py --users 16 --requests 400 --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis
from _common import free_port, percentile
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = (320, 240)


def photo(i: int) -> bytes:
    image = Image.linear_gradient("L").resize(IMAGE_SIZE)
    draw = ImageDraw.Draw(image)
    draw.rectangle((10 + i % 50, 20, 120 + i % 70, 200), fill=(i * 37) % 256)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


@dataclass
class Stack:
    """One API process and its workers; stopped with ``close``."""

    api_url: str
    procs: list[subprocess.Popen[bytes]]
    prefix: str
    redis_url: str | None

    def close(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.redis_url:
            client = redis.Redis.from_url(self.redis_url)
            keys = list(client.scan_iter(match=f"{self.prefix}:*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()


def start_stack(
    checkpoints: Path, queue: str, workers: int, redis_url: str, cache: bool, log_dir: Path
) -> Stack:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLORIZE_")}
    env.update(
        OMP_NUM_THREADS="1", COLORIZE_QUEUE=queue, COLORIZE_REDIS_URL=redis_url,
        COLORIZE_REDIS_PREFIX=prefix, COLORIZE_HOST="127.0.0.1", COLORIZE_DEVICE="cpu",
        COLORIZE_DETECTOR="false", COLORIZE_CHECKPOINTS=str(checkpoints),
        COLORIZE_WARMUP="false", COLORIZE_CACHE_ENABLED=str(cache).lower(),
        COLORIZE_WORKER_THREADS="2", COLORIZE_LOG_LEVEL="WARNING", COLORIZE_QUEUE_SIZE="256",
    )  # fmt: skip
    port = free_port()
    procs = []
    for i in range(workers):
        args = ["worker", "--metrics-port", str(free_port()), "--consumer", f"bench-w{i}"]
        log = (log_dir / f"{queue}-w{i}.log").open("wb")
        procs.append(subprocess.Popen([sys.executable, "-m", "service", *args], cwd=REPO,
                                      env=env, stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
    log = (log_dir / f"{queue}-api.log").open("wb")
    procs.append(subprocess.Popen([sys.executable, "-m", "service", "serve", "--port", str(port)],
                                  cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
    stack = Stack(
        f"http://127.0.0.1:{port}", procs, prefix, redis_url if queue == "redis" else None
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            ready = httpx.get(f"{stack.api_url}/readyz", timeout=1).status_code == 200
            if ready and queue == "redis":
                info = httpx.get(f"{stack.api_url}/info", timeout=1).json()
                ready = (
                    info["model"]["redis"]["consumers"] >= workers
                    and "model_version" in info["model"]
                )
            if ready:
                return stack
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            stack.close()
            raise SystemExit(f"{queue} stack did not start; logs in {log_dir}")
        time.sleep(0.2)


async def post(client: httpx.AsyncClient, url: str, body: bytes) -> tuple[int, float, str]:
    start = time.perf_counter()
    response = await client.post(f"{url}/colorize", content=body,
                                 headers={"content-type": "image/png"})  # fmt: skip
    return response.status_code, time.perf_counter() - start, response.headers.get("x-cache", "")


async def latency(url: str, n: int, same_image: bool = False) -> list[float]:
    async with httpx.AsyncClient(timeout=60) as client:
        for i in range(5):  # warm the path (first batches, connection pools)
            await post(client, url, photo(10_000 + i))
        if same_image:
            await post(client, url, photo(0))
        seconds = []
        for i in range(n):
            status, took, cache = await post(client, url, photo(0 if same_image else i))
            assert status == 200, status
            assert not same_image or cache == "hit"
            seconds.append(took)
        return seconds


async def throughput(url: str, users: int, total: int) -> tuple[float, int]:
    # encoded before the clock starts: the client shares the CPU (and its event loop) with them
    bodies = iter([photo(20_000 + i) for i in range(total)])
    errors = 0

    async def user(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for body in bodies:
            status, _, _ = await post(client, url, body)
            errors += status != 200

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=users)) as client:
        for i in range(users):
            await post(client, url, photo(30_000 + i))
        start = time.perf_counter()
        await asyncio.gather(*(user(client) for _ in range(users)))
        return total / (time.perf_counter() - start), errors


def ms(values: list[float], q: float) -> float:
    return 1000 * percentile(values, q)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=Path, help="default: random tiny networks")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--requests", type=int, default=240)
    parser.add_argument("--sequential", type=int, default=60, help="requests in the latency runs")
    parser.add_argument("--output", type=Path, default=REPO / "docs/readme/benchmarks-redis.md")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = args.checkpoints
        if checkpoints is None:
            sys.path.insert(0, str(REPO / "tests"))
            from weight_files import write_official

            checkpoints = write_official(Path(tmp) / "checkpoints", width=8, seed=0)
        logs = Path(tmp)
        rows: list[str] = []
        lat: dict[str, list[float]] = {}
        runs = [("memory", 0, False), ("redis", 1, False), ("redis", 2, False), ("redis", 1, True)]
        for queue, workers, cache in runs:
            label = "in-process (memory)" if queue == "memory" else f"redis, {workers} worker(s)"
            if cache:
                label = "redis, cache hit"
            stack = start_stack(checkpoints, queue, workers, args.redis_url, cache, logs)
            try:
                seconds = asyncio.run(latency(stack.api_url, args.sequential, same_image=cache))
                lat[label] = seconds
                rps, errors = (float("nan"), 0)
                if not cache:
                    rps, errors = asyncio.run(throughput(stack.api_url, args.users, args.requests))
            finally:
                stack.close()
            rows.append(
                f"| {label} | {ms(seconds, 0.5):.1f} | {ms(seconds, 0.95):.1f} | "
                + ("-" if cache else f"{rps:.1f}")
                + f" | {errors} |"
            )
            print(rows[-1], flush=True)

    base = statistics.median(lat["in-process (memory)"])
    overhead = statistics.median(lat["redis, 1 worker(s)"]) - base
    cpu = platform.processor() or platform.machine()
    report = "\n".join([
        f"### Redis mode, {dt.date.today().isoformat()}: {os.cpu_count()}-core CPU "
        f"({cpu}), no GPU, tiny (width 8) networks, OMP_NUM_THREADS=1 per process",
        "",
        f"`python loadtests/bench_redis.py --users {args.users} --requests {args.requests}`: "
        f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} PNG, no detector, max batch 8, batch delay 5 ms, "
        "1 API process; latency = one user, sequential requests; throughput = "
        f"{args.users} closed-loop users.",
        "",
        "| path | median latency (ms) | p95 latency (ms) | throughput (req/s) | errors |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Overhead of the Redis path per request (median, 1 worker vs in-process): "
        f"{overhead * 1000:+.1f} ms.",
        "",
    ])  # fmt: skip
    print(report)
    if not args.no_write:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with args.output.open("a") as out:
            out.write(report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
