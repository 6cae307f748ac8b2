"""Batch API benchmark: images/s through ``POST /batches`` against the same images through
``POST /colorize``, side by side in one run, and the latency of an interactive request while a
batch runs. A benchmark, not a test.

It starts a real ``python -m service serve`` (memory mode, one per ``--in-flight`` value, no
detector) on seeded random tiny (width 8) networks in the official layout (tests/weight_files.py)
or ``--checkpoints``, writes ``--images`` distinct grayscale PNGs under the batch input root and
measures, client side:

* ``/colorize``: every image once through ``POST /colorize`` by ``--users`` closed-loop users
  (enough to fill the batcher): images/s;
* ``batch``: one manifest of the same images through ``POST /batches``, from submit to
  ``completed``: images/s (``COLORIZE_BATCH_IN_FLIGHT`` = the ``--in-flight`` value);
* interactive latency: one user's sequential ``/colorize`` requests of another image, idle and
  while the batch runs (median, p95).

``--modes redis`` runs the same in Redis mode (``--redis-url``, a key prefix of its own; the
batch state in Redis, one API replica and one ``worker``, result cache off).

    python loadtests/bench_batches.py                        # 300 images of 256x256, in-flight 2 and 8
    python loadtests/bench_batches.py --images 1000 --size 512 --in-flight 2,16 --users 16

Prints a Markdown table naming the CPU (from /proc/cpuinfo); copy it into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _common import free_port, percentile
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    """The CPU's model name and its widest vector extension (from /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                 if ln.startswith("model name")), platform.machine())  # fmt: skip
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                  if ln.startswith("flags")), [])  # fmt: skip
    wide = next((f for f in ("avx512_bf16", "avx512f", "avx2") if f in flags), "no AVX")
    return f"{name} ({wide})"


def photo(i: int, size: int) -> bytes:
    image = Image.linear_gradient("L").resize((size, size))
    draw = ImageDraw.Draw(image)
    draw.rectangle((i % 50, 10, size // 2 + i % 70, size - 10), fill=(i * 37) % 256)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def start(
    checkpoints: Path, work: Path, mode: str, in_flight: int, args: argparse.Namespace
) -> tuple[str, list[subprocess.Popen[bytes]]]:
    """memory: one ``serve``; redis: an API replica (batch state in Redis) and one worker, under
    a key prefix of their own, result cache off (the batch would hit /colorize's results)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLORIZE_")}
    env.update(
        COLORIZE_QUEUE=mode, COLORIZE_REDIS_URL=args.redis_url,
        COLORIZE_REDIS_PREFIX=prefix(in_flight),
        COLORIZE_CACHE_ENABLED="false", COLORIZE_WORKER_THREADS="2",
    )  # fmt: skip
    env.update(
        COLORIZE_HOST="127.0.0.1", COLORIZE_DEVICE="cpu", COLORIZE_DETECTOR="false",
        COLORIZE_CHECKPOINTS=str(checkpoints), COLORIZE_WARMUP="false",
        COLORIZE_LOG_LEVEL="WARNING", COLORIZE_MAX_BATCH_SIZE=str(args.max_batch_size),
        COLORIZE_MAX_BATCH_DELAY_MS=str(args.batch_delay_ms), COLORIZE_QUEUE_SIZE="256",
        COLORIZE_STATE_DIR=str(work / f"state-{mode}-{in_flight}"),
        COLORIZE_BATCH_OUTPUT_DIR=str(work / f"out-{mode}-{in_flight}"),
        COLORIZE_BATCH_INPUT_ROOTS=str(work / "inputs"),
        COLORIZE_BATCH_IN_FLIGHT=str(in_flight),
    )  # fmt: skip
    port = free_port()
    commands = [["serve", "--port", str(port)]]
    if mode == "redis":
        commands.append(["worker", "--metrics-port", str(free_port())])
    processes = []
    for i, command in enumerate(commands):
        log = (work / f"{mode}-{in_flight}-{i}.log").open("wb")
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "service", *command],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        ))  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:  # redis: /readyz needs a live worker
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return url, processes
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
            stop(processes)
            raise SystemExit(f"{mode} did not start; logs in {work}")
        time.sleep(0.2)


def prefix(in_flight: int) -> str:
    return f"bench-batches-{os.getpid()}-{in_flight}"


def delete_keys(url: str, key_prefix: str) -> None:
    """The run's keys (batch state has no TTL)."""
    import redis

    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{key_prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


async def colorize_all(url: str, images: list[bytes], users: int) -> float:
    """Seconds to send every image once through /colorize with ``users`` closed-loop users."""
    todo = list(range(len(images)))

    async def user(client: httpx.AsyncClient) -> None:
        while todo:
            i = todo.pop()
            response = await client.post(
                f"{url}/colorize", content=images[i], headers={"content-type": "image/png"}
            )
            if response.status_code != 200:
                raise SystemExit(f"/colorize answered {response.status_code}: {response.text}")

    async with httpx.AsyncClient(timeout=120) as client:
        started = time.perf_counter()
        await asyncio.gather(*(user(client) for _ in range(users)))
        return time.perf_counter() - started


async def one_latency(client: httpx.AsyncClient, url: str, body: bytes) -> float:
    started = time.perf_counter()
    response = await client.post(
        f"{url}/colorize", content=body, headers={"content-type": "image/png"}
    )
    if response.status_code != 200:
        raise SystemExit(f"/colorize answered {response.status_code}: {response.text}")
    return time.perf_counter() - started


async def idle_latencies(url: str, probe: bytes, n: int = 15) -> list[float]:
    async with httpx.AsyncClient(timeout=120) as client:
        return [await one_latency(client, url, probe) for _ in range(n)]


async def run_batch(
    url: str, manifest: bytes, probe: bytes
) -> tuple[float, list[float], dict[str, int]]:
    """Seconds from submit to completed, and the interactive latencies measured meanwhile."""
    async with httpx.AsyncClient(timeout=120) as client:
        started = time.perf_counter()
        response = await client.post(
            f"{url}/batches", files={"manifest": ("m.jsonl", manifest, "application/jsonl")}
        )
        if response.status_code != 202:
            raise SystemExit(f"POST /batches answered {response.status_code}: {response.text}")
        batch_id = response.json()["id"]
        latencies: list[float] = []
        while True:
            batch = (await client.get(f"{url}/batches/{batch_id}")).json()
            if batch["status"] not in ("validating", "in_progress", "finalizing"):
                break
            latencies.append(await one_latency(client, url, probe))
            await asyncio.sleep(0.05)
        seconds = time.perf_counter() - started
        if batch["status"] != "completed":
            raise SystemExit(f"batch ended {batch['status']}: {batch}")
        return seconds, latencies, batch["request_counts"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=256, help="square images of this side (px)")
    parser.add_argument("--users", type=int, default=8, help="closed-loop /colorize users")
    parser.add_argument("--in-flight", default="2,8", help="COLORIZE_BATCH_IN_FLIGHT values")
    parser.add_argument("--modes", default="memory", help="memory, redis or memory,redis")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-delay-ms", type=float, default=5.0)
    parser.add_argument("--checkpoints", type=Path, help="default: random tiny networks")
    args = parser.parse_args()
    values = [int(v) for v in args.in_flight.split(",") if v.strip()]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-batches-") as tmp:
        work = Path(tmp)
        checkpoints = args.checkpoints
        if checkpoints is None:
            sys.path.insert(0, str(REPO / "tests"))
            from weight_files import write_official

            checkpoints = write_official(work / "checkpoints", width=8, seed=0)
        images = [photo(i, args.size) for i in range(args.images)]
        (work / "inputs").mkdir()
        lines = []
        for i, body in enumerate(images):
            (work / "inputs" / f"{i:06d}.png").write_bytes(body)
            lines.append(json.dumps({"custom_id": f"img-{i}", "source": f"{i:06d}.png"}))
        manifest = ("\n".join(lines) + "\n").encode()
        probe = photo(999_999, args.size)
        rows = []
        for mode, in_flight in [(m, v) for m in args.modes.split(",") for v in values]:
            url, processes = start(checkpoints, work, mode, in_flight, args)
            try:
                asyncio.run(colorize_all(url, images[:16], args.users))  # warm up
                interactive = asyncio.run(colorize_all(url, images, args.users))
                idle = asyncio.run(idle_latencies(url, probe))
                seconds, during, counts = asyncio.run(run_batch(url, manifest, probe))
            finally:
                stop(processes)
                if mode == "redis":
                    delete_keys(args.redis_url, prefix(in_flight))
            rows.append((mode, in_flight, interactive, seconds, idle, during, counts))
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True, check=False).stdout.strip()  # fmt: skip
    n = args.images
    print(f"## Batch API against /colorize (`loadtests/bench_batches.py`), {now}, cpu\n")
    print(f"- Machine: CPU {cpu_name()}, {os.cpu_count()} cores; no GPU used; load average "
          f"{load_before[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")  # fmt: skip
    print(f"- {n} distinct {args.size}x{args.size} grayscale PNGs, tiny random width-8 networks, "
          f"no detector, max batch {args.max_batch_size}, batch delay {args.batch_delay_ms} ms; "
          f"commit {commit}")  # fmt: skip
    print(f"- Command: `python loadtests/bench_batches.py --images {n} --size {args.size} "
          f"--users {args.users} --in-flight {args.in_flight} --modes {args.modes}`")  # fmt: skip
    print("- /colorize: every image once, by closed-loop users; batch: one manifest of the same "
          "images, submit to completed; interactive: one user's sequential /colorize, idle and "
          "while the batch runs\n")  # fmt: skip
    print(f"| mode | batch in flight | /colorize images/s ({args.users} users) | batch images/s | "
          "batch / colorize | interactive idle median / p95 (ms) | during batch median / p95 (ms) "
          "| batch failed |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for mode, in_flight, interactive, seconds, idle, during, counts in rows:
        print(
            f"| {mode} | {in_flight} | {n / interactive:.1f} | {n / seconds:.1f} | "
            f"{interactive / seconds:.2f} | {percentile(idle, 0.5) * 1000:.0f} / "
            f"{percentile(idle, 0.95) * 1000:.0f} | {percentile(during, 0.5) * 1000:.0f} / "
            f"{percentile(during, 0.95) * 1000:.0f} | {counts['failed']} |"
        )


if __name__ == "__main__":
    main()
