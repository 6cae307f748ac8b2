"""CPU after the last 504: does a server stop working for requests whose deadline has passed?

Starts a real ``python -m service serve`` (memory mode) and, for Redis mode, a real API replica
plus a ``python -m service worker``, on seeded width-8 networks (as the tests do). Sends
``--images`` large PNGs at once with a short deadline (``COLORIZE_REQUEST_TIMEOUT_S``), waits for
every answer (all 504 when the deadline is short enough), then samples each server process's CPU
time (utime + stime from ``/proc/<pid>/stat``) once a second for ``--seconds`` seconds and prints
the CPU seconds per second of each second (1.0 = one core busy). A server that drops expired
jobs at every stage is back to ~0 within a second of the last 504::

    python loadtests/bench_deadline_idle.py                       # this checkout, both modes
    python loadtests/bench_deadline_idle.py --source /path/to/other/checkout --modes memory

``--source`` runs the servers from another checkout of the project (e.g. the main branch before
a change) with the same images, settings and weights. Bounded: well under 3 minutes per run.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port

REPO = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # fields 14 and 15 of proc(5)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def large_png(size: int, seed: int) -> bytes:
    """A size x size greyscale photo-like PNG (gradients plus noise), different per seed."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, size, dtype=np.float32)
    base = (x[None, :] + x[::-1, None] * 0.3 + seed * 17) % 256
    pixels = np.clip(base + rng.normal(0, 4, (size, size)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, "PNG", compress_level=1)
    return out.getvalue()


@contextmanager
def process(args: list[str], env: dict[str, str], log: Path, cwd: Path) -> Iterator[int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", *args], cwd=cwd, env=env,
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_ready(base: str, logs: list[Path], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    tails = "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for log in logs)
    raise SystemExit(f"{base} did not become ready in {timeout:g} s\n{tails}")


async def send_all(base: str, images: list[bytes]) -> list[tuple[int, float]]:
    """Every image at once; (status, seconds after sending) per answer."""
    start = time.perf_counter()

    async def one(client: httpx.AsyncClient, body: bytes) -> tuple[int, float]:
        response = await client.post(
            base + "/colorize", content=body, headers={"content-type": "image/png"}
        )
        return response.status_code, time.perf_counter() - start

    limits = httpx.Limits(max_connections=len(images))
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        return list(await asyncio.gather(*(one(client, body) for body in images)))


def measure(base: str, pids: dict[str, int], images: list[bytes], seconds: int) -> None:
    answers = asyncio.run(send_all(base, images))
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}  # right after the last answer
    statuses = sorted(status for status, _ in answers)
    last = max(elapsed for _, elapsed in answers)
    print(f"  answers: {statuses}, the last after {last:.1f} s")
    per_second: dict[str, list[float]] = {name: [] for name in pids}
    tick = time.monotonic()
    for _ in range(seconds):
        tick += 1.0
        time.sleep(max(0.0, tick - time.monotonic()))
        for name, pid in pids.items():
            now = cpu_seconds(pid)
            per_second[name].append(now - before[name])
            before[name] = now
    for name, values in per_second.items():
        shown = "  ".join(f"{v:4.2f}" for v in values)
        print(f"  {name:>6} CPU s/s in seconds 1..{seconds} after the last answer: {shown}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--source", type=Path, default=REPO, help="checkout to run the servers from"
    )
    parser.add_argument("--modes", default="memory,redis", help="memory, redis or both")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", type=int, default=4000, help="side of the square PNGs")
    parser.add_argument("--timeout", type=float, default=5.0, help="COLORIZE_REQUEST_TIMEOUT_S")
    parser.add_argument("--seconds", type=int, default=5, help="seconds sampled after the last 504")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO / "tests"))
    from weight_files import write_official

    work = Path(tempfile.mkdtemp(prefix="bench-deadline-"))
    checkpoints = write_official(work / "checkpoints", width=8, seed=0)
    images = [large_png(args.size, seed) for seed in range(args.images)]
    source = args.source.resolve()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLORIZE_")}
    env.update(
        PYTHONPATH=str(source), COLORIZE_DEVICE="cpu", COLORIZE_WARMUP="false",
        COLORIZE_REQUEST_TIMEOUT_S=str(args.timeout), COLORIZE_LOG_LEVEL="WARNING",
        COLORIZE_MAX_BODY_BYTES=str(64 * 1024 * 1024), COLORIZE_CACHE_ENABLED="false",
        COLORIZE_HOST="127.0.0.1",
    )  # fmt: skip
    model = ["--checkpoints", str(checkpoints), "--no-detector"]
    print(f"CPU: {cpu_name()}, {os.cpu_count()} CPUs; code: {source}")
    print(f"{args.images} PNGs of {args.size}x{args.size} ({sum(map(len, images)) / 1e6:.0f} MB) "
          f"at once, deadline {args.timeout:g} s")  # fmt: skip
    for mode in args.modes.split(","):
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with ExitStack() as stack:
            if mode == "memory":
                pids = {"serve": stack.enter_context(process(
                    ["serve", *model, "--port", str(port)], env, work / "serve.log", source))}  # fmt: skip
            elif mode == "redis":
                redis_env = {**env, "COLORIZE_QUEUE": "redis", "COLORIZE_REDIS_URL": args.redis_url,
                             "COLORIZE_REDIS_PREFIX": f"bench-deadline-{uuid.uuid4().hex[:8]}",
                             # shorter than the deadline, as the settings require
                             "COLORIZE_CLAIM_IDLE_MS": str(int(args.timeout * 500))}  # fmt: skip
                pids = {
                    "api": stack.enter_context(process(
                        ["serve", "--port", str(port)], redis_env, work / "api.log", source)),
                    "worker": stack.enter_context(process(
                        ["worker", *model, "--metrics-port", "0"], redis_env,
                        work / "worker.log", source)),
                }  # fmt: skip
            else:
                parser.error(f"unknown mode {mode!r}")
            wait_ready(base, sorted(work.glob("*.log")))
            time.sleep(1.0)  # start-up work (imports, first heartbeats) is over
            print(f"{mode} mode:")
            measure(base, pids, images, args.seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
