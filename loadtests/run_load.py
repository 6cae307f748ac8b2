"""Headless load run: N closed-loop users for T seconds, then throughput, latency and errors.

    python loadtests/run_load.py --host http://127.0.0.1:8000 --users 8 --duration 30

or let it start (and stop) the service itself, with any ``serve`` flags and COLORIZE_ variables::

    python loadtests/run_load.py --users 8 --duration 30 \\
        --serve "--checkpoints weights/checkpoints --no-detector" --env COLORIZE_MAX_BATCH_SIZE=8

Prints requests/s, p50/p95/p99 latency (client side, exact), error rate, the mean batch size the
server formed during the run (from /metrics) and the mean of each Server-Timing stage.
``--json FILE`` also writes the figures as JSON. Query options: ``--query 'boxes=[[...]]'``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import free_port, percentile

HERE = Path(__file__).resolve().parent


def _batch_stats(host: str) -> tuple[float, float]:
    """(sum, count) of colorize_batch_size from the server's /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(host + "/metrics", timeout=10) as response:  # noqa: S310
        text = response.read().decode()
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "colorize_batch_size":
            for sample in family.samples:
                if sample.name.endswith("_sum"):
                    total = sample.value
                elif sample.name.endswith("_count"):
                    count = sample.value
    return total, count


def _start_server(
    serve_args: str, env: list[str], log_path: Path
) -> tuple[subprocess.Popen[bytes], str]:
    import urllib.error
    import urllib.request

    port = free_port()
    extra = dict(item.split("=", 1) for item in env)
    command = [sys.executable, "-m", "service", "serve", *shlex.split(serve_args),
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    log = log_path.open("wb")
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **extra}
    )
    host = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited; see {log_path}")
        try:
            with urllib.request.urlopen(host + "/readyz", timeout=2) as response:  # noqa: S310
                if response.status == 200:
                    return process, host
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit("the server did not become ready in 600 s")


def run(host: str, users: int, duration: float, warmup: float) -> dict[str, Any]:
    import gevent
    from locust.env import Environment

    sys.path.insert(0, str(HERE))
    import locustfile

    latencies: list[float] = []
    failures = 0
    recording = False

    def on_request(response_time: float, exception: BaseException | None, **_: Any) -> None:
        nonlocal failures
        if not recording:
            return
        if exception is None:
            latencies.append(response_time)
        else:
            failures += 1

    env = Environment(user_classes=[locustfile.ColorizeUser], host=host)
    env.events.request.add_listener(on_request)
    runner = env.create_local_runner()
    runner.start(users, spawn_rate=users)
    gevent.sleep(warmup)
    before = _batch_stats(host)
    locustfile.SERVER_TIMINGS.clear()
    recording = True
    started = time.monotonic()
    gevent.sleep(duration)
    recording = False
    elapsed = time.monotonic() - started
    after = _batch_stats(host)
    runner.quit()

    total = len(latencies) + failures
    batches = after[1] - before[1]
    return {
        "users": users,
        "duration_s": round(elapsed, 1),
        "requests": total,
        "ok": len(latencies),
        "throughput_rps": round(len(latencies) / elapsed, 2),
        "p50_ms": round(percentile(latencies, 0.50), 1),
        "p95_ms": round(percentile(latencies, 0.95), 1),
        "p99_ms": round(percentile(latencies, 0.99), 1),
        "error_rate": round(failures / total, 4) if total else 0.0,
        "mean_batch_size": round((after[0] - before[0]) / batches, 2) if batches else None,
        "server_timing_mean_ms": {
            stage: round(sum(values) / len(values), 1)
            for stage, values in sorted(locustfile.SERVER_TIMINGS.items())
            if values
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", help="service URL (omit with --serve)")
    parser.add_argument("--users", type=int, default=4, help="concurrent closed-loop users")
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds first")
    parser.add_argument("--query", default="", help="query string for /colorize")
    parser.add_argument("--image", help="image file to send (default: generated 512x384 JPEG)")
    parser.add_argument("--multipart", action="store_true", help="send multipart/form-data")
    parser.add_argument("--serve", help="start `python -m service serve` with these flags")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for --serve")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if bool(args.host) == bool(args.serve):
        parser.error("give exactly one of --host and --serve")
    # the locustfile reads its settings from the environment
    os.environ["LOAD_QUERY"] = args.query
    os.environ["LOAD_MULTIPART"] = "1" if args.multipart else "0"
    if args.image:
        os.environ["LOAD_IMAGE"] = args.image
    process = None
    host = args.host
    if args.serve:
        process, host = _start_server(args.serve, args.env, Path("run_load_server.log"))
    try:
        figures = run(host.rstrip("/"), args.users, args.duration, args.warmup)
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(120)
    figures["settings"] = {"query": args.query, "env": args.env, "serve": args.serve}
    print(
        f"users={figures['users']} duration={figures['duration_s']}s requests={figures['requests']} "
        f"throughput={figures['throughput_rps']} req/s p50={figures['p50_ms']} ms "
        f"p95={figures['p95_ms']} ms p99={figures['p99_ms']} ms "
        f"errors={figures['error_rate'] * 100:.2f}% mean_batch={figures['mean_batch_size']}"
    )
    print("server timing (mean ms): " + json.dumps(figures["server_timing_mean_ms"]))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
