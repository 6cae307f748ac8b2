"""Tracing overhead: the same requests with tracing off and on, side by side. A benchmark, not a test.

Two real ``python -m service serve`` processes in memory mode (seeded random tiny networks from
tests/weight_files.py, no detector, two supplied boxes so every stage runs): one with no OTEL_*
variable (tracing off), one exporting over OTLP/HTTP (BatchSpanProcessor) to a real HTTP receiver
in this process, which counts the spans' payloads. Requests alternate between the two, one at a
time, so that whatever else the machine does weighs on both alike. Printed: client latency
(median, p90, mean) per server and the difference, then the in-process cost of the engine's span
recording per job (``service.core.tracing.JobTrace``: a job span and seven stage spans) against
the no-op it is when off.

    python loadtests/bench_tracing.py                   # 300 requests per server
    python loadtests/bench_tracing.py --requests 100

Tiny networks make a request short, so the overhead's share is the largest it can be; its
absolute size (microseconds per request) is what carries over to real weights.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from _common import free_port, percentile
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
BOXES = json.dumps([[5, 5, 40, 30], [20, 10, 60, 45]])


def machine() -> str:
    name, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return f"{name}, {os.cpu_count()} cores, {'/'.join(isa) or 'no AVX2'}, no GPU"


class Receiver:
    """An OTLP/HTTP endpoint that answers 200 to POST /v1/traces and counts the bytes."""

    def __init__(self) -> None:
        self.posts = 0
        self.bytes = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path == "/v1/traces":
                    receiver.posts += 1
                    receiver.bytes += len(body)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def start(name: str, checkpoints: Path, logs: Path, otel: dict[str, str]) -> tuple[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COLORIZE_", "OTEL_"))}
    env.update(
        COLORIZE_QUEUE="memory", COLORIZE_HOST="127.0.0.1", COLORIZE_DEVICE="cpu",
        COLORIZE_PRECISION="fp32", COLORIZE_DETECTOR="false", COLORIZE_CHECKPOINTS=str(checkpoints),
        COLORIZE_WARMUP="false", COLORIZE_LOG_LEVEL="WARNING", COLORIZE_WORKER_THREADS="1",
        OMP_NUM_THREADS="1", **otel,
    )  # fmt: skip
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--port", str(port)], cwd=REPO, env=env,
        stdout=(logs / f"{name}.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{name} did not become ready; log in {logs}")


def summary(label: str, seconds: list[float]) -> str:
    ms = [s * 1000 for s in seconds]
    return (
        f"{label:<14} median {statistics.median(ms):7.2f} ms  p90 {percentile(ms, 0.9):7.2f} ms"
        f"  mean {statistics.fmean(ms):7.2f} ms"
    )


def span_recording_cost(jobs: int, receiver: Receiver) -> tuple[float, float]:
    """Microseconds per job of the engine's span calls: off (the no-op) and on (a real provider,
    BatchSpanProcessor, OTLP/HTTP exporter to ``receiver``)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from service_helpers import make_job

    from service.core import tracing
    from service.core.jobs import JobResult

    job = make_job(b"")
    result = JobResult(b"", "image/png", [[5, 5, 40, 30], [20, 10, 60, 45]], [1.0, 1.0], {}, "m")
    timings = {s: 0.001 for s in ("detect", "instance", "fusion", "merge", "encode")}

    def run() -> float:
        start = time.perf_counter()
        for _ in range(jobs):
            trace = tracing.job_trace(job, model="m", batch_size=4)
            trace.decoded(0.001)
            trace.predicted(time.time(), timings, 2)
            trace.finished(timings)
            trace.end(result)
        return (time.perf_counter() - start) / jobs * 1e6

    off = run()
    provider = TracerProvider()
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{receiver.url}/v1/traces"))
    )
    tracing.install(provider)
    try:
        on = run()
    finally:
        tracing.shutdown()
    return off, on


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="per server")
    parser.add_argument("--jobs", type=int, default=3000, help="jobs of the in-process measure")
    args = parser.parse_args()

    from weight_files import write_official

    receiver = Receiver()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoints = write_official(folder / "checkpoints", width=8, seed=0)
        off_url, off_proc = start("off", checkpoints, folder, {})
        on_url, on_proc = start(
            "on", checkpoints, folder,
            {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "500"},
        )  # fmt: skip
        image = io.BytesIO()
        Image.linear_gradient("L").resize((64, 48)).save(image, "PNG")
        body = image.getvalue()
        latencies: dict[str, list[float]] = {"off": [], "on": []}
        try:
            with httpx.Client(timeout=60) as client:
                for i in range(args.requests + 10):
                    for name, url in (("off", off_url), ("on", on_url))[:: 1 if i % 2 else -1]:
                        sent = time.perf_counter()
                        response = client.post(
                            f"{url}/colorize", params={"boxes": BOXES}, content=body,
                            headers={"content-type": "image/png"},
                        )  # fmt: skip
                        took = time.perf_counter() - sent
                        assert response.status_code == 200, response.text
                        if i >= 10:  # the first ten: warm-up
                            latencies[name].append(took)
            time.sleep(1.5)  # the last batch of spans leaves the on-server
        finally:
            for proc in (off_proc, on_proc):
                proc.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
            for proc in (off_proc, on_proc):
                proc.wait(30)  # type: ignore[attr-defined]
    off_us, on_us = span_recording_cost(args.jobs, receiver)
    print(f"machine: {machine()}")
    print(f"{args.requests} sequential requests per server, 64x48 PNG, 2 boxes, tiny networks")
    print(summary("tracing off", latencies["off"]))
    print(summary("tracing on", latencies["on"]))
    diff_median = statistics.median(latencies["on"]) - statistics.median(latencies["off"])
    diff_mean = statistics.fmean(latencies["on"]) - statistics.fmean(latencies["off"])
    print(f"difference     median {diff_median * 1000:+7.2f} ms  mean {diff_mean * 1000:+7.2f} ms "
          f"({diff_median / statistics.median(latencies['off']):+.1%} of the median)")  # fmt: skip
    print(f"OTLP receiver: {receiver.posts} POSTs, {receiver.bytes / 1024:.0f} KiB of spans")
    print(f"engine span recording per job: off {off_us:.2f} us, on {on_us:.1f} us "
          f"({args.jobs} jobs, 8 spans each)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
