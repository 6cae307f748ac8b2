"""Cost-aware admission under overload, against a real ``python -m service serve`` process.

More clients than the server can serve within the deadline send 1-megapixel images for a while.
Without cost admission they would queue and get 504 after the whole deadline; with it, the
requests that cannot finish are refused at once with 503 and a Retry-After. Prints the answers
by status, their latencies, and the Retry-After values::

    python loadtests/bench_admission.py --tiny --clients 24 --seconds 20
    python loadtests/bench_admission.py --checkpoints weights/checkpoints --timeout 5
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
from collections import defaultdict
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, percentile


def image_1mp() -> bytes:
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((1000, 1000)).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


async def client_loop(
    client: httpx.AsyncClient,
    url: str,
    body: bytes,
    until: float,
    out: list[tuple[int, float, str]],
) -> None:
    while time.monotonic() < until:
        start = time.perf_counter()
        try:
            response = await client.post(url, content=body, headers={"content-type": "image/png"})
            status, retry = response.status_code, response.headers.get("retry-after", "")
        except httpx.HTTPError:
            status, retry = 0, ""
        elapsed = time.perf_counter() - start
        out.append((status, elapsed, retry))
        if status == 503 and retry:
            await asyncio.sleep(min(float(retry), 2.0))  # a polite client, bounded for the run


async def run(base: str, clients: int, seconds: float) -> list[tuple[int, float, str]]:
    body = image_1mp()
    out: list[tuple[int, float, str]] = []
    async with httpx.AsyncClient(timeout=120) as client:
        for _ in range(3):  # the engine measures its costs
            await client.post(
                base + "/colorize", content=body, headers={"content-type": "image/png"}
            )
        until = time.monotonic() + seconds
        await asyncio.gather(
            *(client_loop(client, base + "/colorize", body, until, out) for _ in range(clients))
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--checkpoints", type=Path)
    parser.add_argument("--tiny", action="store_true", help="seeded width-8 networks")
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--timeout", type=float, default=5.0, help="COLORIZE_REQUEST_TIMEOUT_S")
    args = parser.parse_args()
    checkpoints = args.checkpoints
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from weight_files import write_official

        checkpoints = write_official(Path(tempfile.mkdtemp()), width=8, seed=0)
    if checkpoints is None:
        parser.error("give --checkpoints or --tiny")
    port = free_port()
    env = {**os.environ, "COLORIZE_REQUEST_TIMEOUT_S": str(args.timeout),
           "COLORIZE_MAX_BATCH_SIZE": "4", "COLORIZE_WARMUP": "false",
           "COLORIZE_MAX_CONNECTIONS": str(args.clients * 4)}  # fmt: skip
    log = open(Path(tempfile.mkdtemp()) / "serve.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--checkpoints", str(checkpoints),
         "--no-detector", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit("the server did not become ready")
            time.sleep(0.2)
        rows = asyncio.run(run(base, args.clients, args.seconds))
    finally:
        process.terminate()
        process.wait(60)
        log.close()
    by_status: dict[int, list[float]] = defaultdict(list)
    retries: list[float] = []
    for status, elapsed, retry in rows:
        by_status[status].append(elapsed)
        if retry:
            retries.append(float(retry))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"{args.clients} clients, {args.seconds:g} s, deadline {args.timeout:g} s, 1 MP PNG")  # fmt: skip
    print(f"{'status':>6} {'count':>6} {'p50 ms':>9} {'p95 ms':>9} {'max ms':>9}")
    for status in sorted(by_status):
        times = by_status[status]
        print(f"{status:>6} {len(times):>6} {percentile(times, 0.5) * 1000:9.1f} "
              f"{percentile(times, 0.95) * 1000:9.1f} {max(times) * 1000:9.1f}")  # fmt: skip
    if retries:
        print(f"Retry-After (s): min {min(retries):g}, median {percentile(retries, 0.5):g}, "
              f"max {max(retries):g}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
