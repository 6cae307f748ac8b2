"""Event-loop stall: /healthz latency while a 20 MB upload is served. A benchmark, not a test.

It starts a real ``python -m service serve`` (seeded random tiny networks from
tests/weight_files.py, no detector), then sends ``--uploads`` uploads of a ``--size-mb``
grayscale-noise JPEG with ``Accept: application/json`` (the answer comes back base64 in JSON)
while another thread probes ``/healthz`` every ``--interval-ms``. A probe's latency is how long
the server's event loop left it waiting: the max and p99 during the uploads are the stall. Probes
before the first upload give the idle baseline.

* ``--queue memory`` (default): each upload is colorized in the server process (the model's
  threads share the process's GIL with the event loop, so their work shows in the probes too);
* ``--queue redis``: one ``worker`` process colorizes the upload once, then every measured upload
  is a result-cache hit: the API process reads the 20 MB body, hashes it (the cache key), reads
  the cached answer and base64-encodes it into JSON: its own work alone.

    python loadtests/bench_event_loop.py                 # memory mode, 3 uploads of 20 MB
    python loadtests/bench_event_loop.py --queue redis   # cache hits: the API process alone

Bounded: the server gets 60 s to start and each upload 60 s; a run takes about a minute on a
2-core CPU.
"""

from __future__ import annotations

import argparse
import base64
import io
import multiprocessing
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path

import httpx
import numpy as np
from _common import free_port, percentile
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BYTES_PER_PIXEL = 1.58  # grayscale noise as a quality-100 JPEG


def noise_jpeg(size_bytes: int) -> bytes:
    """A grayscale-noise JPEG of about ``size_bytes`` (noise does not compress)."""
    side = int((size_bytes / BYTES_PER_PIXEL) ** 0.5)
    for _ in range(3):
        pixels = np.random.default_rng(0).integers(0, 256, (side, side), dtype=np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "JPEG", quality=100)
        if abs(out.tell() - size_bytes) < 0.02 * size_bytes:
            break
        side = int(side * (size_bytes / out.tell()) ** 0.5)
    return out.getvalue()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def start(args: argparse.Namespace, checkpoints: Path, logs: Path) -> tuple[str, list]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLORIZE_")}
    env.update(
        COLORIZE_QUEUE=args.queue, COLORIZE_HOST="127.0.0.1", COLORIZE_DEVICE="cpu",
        COLORIZE_PRECISION="fp32", COLORIZE_DETECTOR="false", COLORIZE_CHECKPOINTS=str(checkpoints),
        COLORIZE_WARMUP="false", COLORIZE_MAX_BODY_BYTES=str(64 * 1024 * 1024),
        COLORIZE_REQUEST_TIMEOUT_S="120", COLORIZE_LOG_LEVEL="WARNING",
        COLORIZE_REDIS_URL=args.redis_url, COLORIZE_REDIS_PREFIX=f"bench-{uuid.uuid4().hex[:8]}",
        COLORIZE_CACHE_ENABLED="true",
    )  # fmt: skip
    if args.asyncio_debug:  # the server logs each event-loop callback over 100 ms
        env["PYTHONASYNCIODEBUG"] = "1"
    port = free_port()
    procs = []
    commands = [["serve", "--port", str(port)]]
    if args.queue == "redis":
        commands.append(["worker", "--metrics-port", "0", "--consumer", "bench-stall"])
    for command in commands:
        log = (logs / f"{command[0]}.log").open("wb")
        procs.append(subprocess.Popen([sys.executable, "-m", "service", *command], cwd=REPO,
                                      env=env, stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        try:
            ready = httpx.get(f"{url}/readyz", timeout=1).status_code == 200
            if ready and (args.queue == "memory" or "model_version" in _model(url)):
                return url, procs
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop(procs)
    raise SystemExit(f"the server did not become ready; logs in {logs}")


def _model(url: str) -> dict:
    return httpx.get(f"{url}/info", timeout=1).json().get("model", {})


def stop(procs: list) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _probe(url: str, interval: float, stop: Event, out: Connection) -> None:
    samples = []
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            sent = time.monotonic()
            assert client.get(f"{url}/healthz").status_code == 200
            samples.append((sent, time.monotonic() - sent))
            stop.wait(interval)
    out.send(samples)


class Prober:
    """GET /healthz every ``interval`` seconds from a process of its own (so that the uploading
    client's work never delays a probe); records (sent at, latency) pairs on the monotonic clock,
    which every process shares."""

    def __init__(self, url: str, interval: float) -> None:
        context = multiprocessing.get_context("fork")
        self.stop = context.Event()
        self.receiver, sender = context.Pipe(duplex=False)
        self.process = context.Process(target=_probe, args=(url, interval, self.stop, sender))
        self.samples: list[tuple[float, float]] = []

    def start(self) -> None:
        self.process.start()

    def finish(self) -> None:
        self.stop.set()
        self.samples = self.receiver.recv()
        self.process.join(10)

    def between(self, windows: list[tuple[float, float]]) -> list[float]:
        return [lat for sent, lat in self.samples if any(a <= sent <= b for a, b in windows)]


@dataclass
class Run:
    idle: list[float]  # probe latencies (s) before the first upload
    busy: list[float]  # probe latencies (s) sent while an upload was being served
    seconds: list[float]  # each upload, request to answer
    answer_bytes: int


def measure(url: str, args: argparse.Namespace, body: bytes) -> Run:
    headers = {"content-type": "image/jpeg", "accept": "application/json"}
    redis = args.queue == "redis"
    with httpx.Client(timeout=60) as client:

        def upload(data: bytes) -> httpx.Response:
            response = client.post(f"{url}/colorize", content=data, headers=headers)
            if response.status_code != 200:
                raise SystemExit(f"upload: {response.status_code} {response.text[:300]}")
            return response

        if redis:  # the miss that fills the cache (a worker colorizes it): not measured
            upload(body)
        prober = Prober(url, args.interval_ms / 1000)
        prober.start()
        time.sleep(args.baseline_s)
        idle_end = time.monotonic()
        windows, seconds, answer = [], [], 0
        for i in range(args.uploads):
            # memory: one byte after the JPEG's end makes each body distinct (each is colorized);
            # redis: the same body, answered from the cache (the API process's work alone)
            began = time.monotonic()
            response = upload(body if redis else body + bytes([i]))
            ended = time.monotonic()
            assert not redis or response.headers.get("x-cache") == "hit", "expected a cache hit"
            windows.append((began, ended))
            seconds.append(ended - began)
            answer = len(response.content)
            if i == 0:  # the answer is whole: JSON whose base64 is a JPEG of the input's size
                image = base64.b64decode(response.json()["image_base64"])
                with Image.open(io.BytesIO(image)) as decoded, Image.open(io.BytesIO(body)) as sent:
                    assert decoded.format == "JPEG", decoded.format
                    assert decoded.size == sent.size, (decoded.size, sent.size)
            time.sleep(0.2)
        prober.finish()
    idle = [lat for sent, lat in prober.samples if sent < idle_end]
    return Run(idle, prober.between(windows), seconds, answer)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", choices=["memory", "redis"], default="memory")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--size-mb", type=float, default=20.0, help="upload size (10^6 bytes)")
    parser.add_argument("--uploads", type=int, default=3)
    parser.add_argument("--interval-ms", type=float, default=5.0, help="between /healthz probes")
    parser.add_argument("--baseline-s", type=float, default=2.0, help="idle probing first")
    parser.add_argument("--asyncio-debug", action="store_true",
                        help="print the server's slow-callback warnings (slows it down)")  # fmt: skip
    args = parser.parse_args()

    body = noise_jpeg(int(args.size_mb * 1e6))
    with Image.open(io.BytesIO(body)) as image:
        size = image.size
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, str(REPO / "tests"))
        from weight_files import write_official

        checkpoints = write_official(Path(tmp) / "checkpoints", width=8, seed=0)
        url, procs = start(args, checkpoints, Path(tmp))
        try:
            result = measure(url, args, body)
        finally:
            stop(procs)
            if args.asyncio_debug:
                print((Path(tmp) / "serve.log").read_text(errors="replace")[-6000:])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip() or "unknown"  # fmt: skip
    idle, busy = result.idle, result.busy

    def ms(values: list[float], q: float) -> str:
        return f"{1000 * percentile(values, q):.1f}"

    uploads = ", ".join(f"{s:.1f}" for s in result.seconds)
    print(f"CPU: {cpu_name()}; commit {commit}; queue={args.queue}")
    print(f"upload: {len(body) / 1e6:.1f} MB JPEG {size[0]}x{size[1]}, Accept: application/json; "
          f"answer {result.answer_bytes / 1e6:.1f} MB; seconds per upload: {uploads}")  # fmt: skip
    for name, values in (("idle", idle), ("upload", busy)):
        print(f"/healthz {name}: n={len(values)} p50={ms(values, 0.5)} p99={ms(values, 0.99)} "
              f"max={ms(values, 1.0)} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
