"""OpenTelemetry tracing (docs/tracing.md): one request's span tree in memory mode (in-memory
exporter, the real app and engine) and across real API and worker processes in Redis mode (the
console exporter's JSON on their stdout); off, no spans and no SDK imported."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from image_corpus import png
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from redis_fixtures import free_port, redis_prefix, redis_url
from service_helpers import make_job, running_app, service_settings

from service.core import tracing
from service.core.tracing import STAGES, TracingConfig, TracingConfigError

__all__ = ["redis_prefix", "redis_url"]  # fixtures

ROOT = Path(__file__).resolve().parents[1]
BOXES = [[5, 5, 40, 30], [20, 10, 60, 45]]


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracing.install(provider)
    yield spans
    tracing.install(None)


def server_timing(header: str) -> dict[str, float]:
    """Seconds per stage from a Server-Timing header (``name;dur=<ms>``)."""
    return {m[1]: float(m[2]) / 1000 for m in re.finditer(r"([\w-]+);dur=([\d.]+)", header)}


# -- memory mode --------------------------------------------------------------------------------


async def test_one_request_span_tree_in_memory_mode(
    tiny_checkpoints: Path, exporter: InMemorySpanExporter
) -> None:
    async with running_app(service_settings(tiny_checkpoints)) as (app, client):
        exporter.clear()  # the readiness probes' spans
        response = await client.post(
            "/colorize", params={"boxes": json.dumps(BOXES)}, content=png(64, 48),
            headers={"content-type": "image/png"},
        )  # fmt: skip
        assert response.status_code == 200, response.text
        model = app.state.service.queue.describe()["model_version"]
    spans = list(exporter.get_finished_spans())
    [server] = [s for s in spans if s.kind == SpanKind.SERVER]
    assert "/colorize" in server.name
    assert server.parent is None
    by_name = {s.name: s for s in spans}
    job = by_name["colorize"]
    assert {s.context.trace_id for s in spans} == {server.context.trace_id}
    assert job.parent is not None and job.parent.span_id == server.context.span_id
    stages = [by_name[name] for name in STAGES]
    for stage in stages:
        assert stage.parent is not None and stage.parent.span_id == job.context.span_id
    assert len(spans) == 2 + len(STAGES)  # server, job, stages: no ASGI receive/send noise
    # stages in the order they run, each inside the job span, the job inside the request's span
    assert stages[0].start_time == job.start_time  # queue wait from the job's admission
    for earlier, later in itertools.pairwise(stages):
        assert earlier.end_time <= later.start_time + 1000, (earlier.name, later.name)
    assert server.start_time <= job.start_time and job.end_time <= server.end_time
    assert stages[-1].end_time <= job.end_time
    # the durations are the engine's own measures: those of the Server-Timing header
    timing = server_timing(response.headers["server-timing"])
    for stage in ("decode", "detect", "instance", "fusion", "merge", "encode"):
        seconds = (by_name[stage].end_time - by_name[stage].start_time) / 1e9
        assert seconds == pytest.approx(timing[stage], abs=2e-3), stage
    assert job.attributes["colorize.model"] == model
    assert job.attributes["colorize.batch_size"] == 1
    assert job.attributes["colorize.instances"] == 2
    assert job.attributes["colorize.request_id"] == response.headers["x-request-id"]
    assert by_name["instance"].attributes["colorize.instances"] == 2
    assert by_name["fusion"].attributes["colorize.batch_size"] == 1


async def test_each_batch_item_is_traced(
    tiny_checkpoints: Path, exporter: InMemorySpanExporter
) -> None:
    """A batch's items each get a ``batch item`` span (batch id, custom_id), parent of the job's
    span and its stages."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("roll/a.png", png(32, 24))
        archive.writestr("roll/b.png", png(24, 32))
    async with running_app(service_settings(tiny_checkpoints)) as (_, client):
        response = await client.post(
            "/batches", files={"archive": ("scans.zip", buffer.getvalue(), "application/zip")}
        )
        assert response.status_code == 202, response.text
        batch_id = response.json()["id"]
        deadline = time.monotonic() + 60
        while (status := (await client.get(f"/batches/{batch_id}")).json()["status"]) not in (
            "completed", "failed",
        ):  # fmt: skip
            assert time.monotonic() < deadline, status
            await asyncio.sleep(0.1)
        assert status == "completed"
    spans = list(exporter.get_finished_spans())
    items = [s for s in spans if s.name == "batch item"]
    assert sorted(s.attributes["batch.custom_id"] for s in items) == ["roll/a.png", "roll/b.png"]
    assert {s.attributes["batch.id"] for s in items} == {batch_id}
    jobs = [s for s in spans if s.name == "colorize"]
    assert len(jobs) == 2
    item_ids = {s.context.span_id: s for s in items}
    for job in jobs:
        assert job.parent is not None and job.parent.span_id in item_ids
        item = item_ids[job.parent.span_id]
        assert job.context.trace_id == item.context.trace_id
        stages = [
            s for s in spans if s.parent is not None and s.parent.span_id == job.context.span_id
        ]
        assert {s.name for s in stages} >= {"decode", "merge", "encode"}


async def test_a_failed_job_span_says_why(
    tiny_checkpoints: Path, exporter: InMemorySpanExporter
) -> None:
    async with running_app(service_settings(tiny_checkpoints)) as (_, client):
        exporter.clear()
        response = await client.post(
            "/colorize", content=b"\x89PNG\r\n\x1a\n" + b"\0" * 64,
            headers={"content-type": "image/png"},
        )  # fmt: skip
        assert response.status_code == 400
    job = next(s for s in exporter.get_finished_spans() if s.name == "colorize")
    assert not job.status.is_ok
    assert job.attributes["colorize.error"] == "invalid-image"
    assert not [s for s in exporter.get_finished_spans() if s.name in STAGES[1:]]


async def test_off_no_spans_and_no_context(tiny_checkpoints: Path) -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()  # built but never installed: tracing stays off
    provider.add_span_processor(SimpleSpanProcessor(spans))
    assert not tracing.enabled()
    async with running_app(service_settings(tiny_checkpoints)) as (_, client):
        response = await client.post(
            "/colorize", content=png(40, 30), headers={"content-type": "image/png"}
        )
        assert response.status_code == 200
    assert spans.get_finished_spans() == ()
    job = make_job(png(8, 8))
    assert tracing.carrier() == {}
    assert tracing.carried(job) is job
    assert tracing.job_trace(job, model="m", batch_size=1) is tracing.NO_TRACE


OFF_IMPORTS = """
import json, sys
from service.cli import build_parser
import service.app, service.engine.batch, service.queues.redis.client, service.queues.redis.worker
from service.app import create_app
from service.core import tracing
from service.settings import ServiceSettings
from service.commands.model_flags import tracing_config
args = build_parser().parse_args(["serve"])
assert tracing.setup(tracing_config(args, "x")) is False
create_app(ServiceSettings(queue="redis"))
print(json.dumps(sorted(m for m in sys.modules
                        if m.startswith(("opentelemetry.sdk.trace", "opentelemetry.instrumentation",
                                         "opentelemetry.exporter")))))
"""
# (fastapi imports parts of the OpenTelemetry API, and redis-py the metrics SDK where it is
# installed, for their own optional telemetry: what tracing would add is the trace SDK, the
# instrumentation and the exporters.)


def test_off_the_sdk_is_never_imported() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", OFF_IMPORTS], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120, check=True,
    )  # fmt: skip
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


BLOCKED = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith("opentelemetry.sdk"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Block())
from service.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_configured_without_the_extra_names_it(command: str, tiny_checkpoints: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "COLORIZE_"))}
    env.update(PYTHONPATH=str(ROOT), OTEL_TRACES_EXPORTER="console", COLORIZE_QUEUE="redis")
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED, command, "--checkpoints", str(tiny_checkpoints),
         "--no-detector", "--device", "cpu", "--port" if command == "serve" else "--consumer",
         str(free_port()) if command == "serve" else "c"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "pip install -e '.[tracing]'" in result.stderr
    assert "tracing extra" in result.stderr


def test_configuration_from_the_standard_variables() -> None:
    def config(env: dict[str, str], **flags: Any) -> TracingConfig | None:
        return TracingConfig.from_env(env, default_service_name="svc", **flags)

    assert config({}) is None
    assert config({"OTEL_TRACES_EXPORTER": "none"}) is None
    assert config({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"}) is None
    on = config({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert on == TracingConfig(("otlp",), "svc", None, "http/protobuf")  # the SDK reads the URL
    both = config({"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "mine"},
                  otlp_endpoint="http://jaeger:4318/")  # fmt: skip
    assert both == TracingConfig(
        ("console", "otlp"), "mine", "http://jaeger:4318/v1/traces", "http/protobuf"
    )
    grpc = config({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, otlp_endpoint="http://c:4317")
    assert grpc is not None and grpc.otlp_endpoint == "http://c:4317"
    assert config({"OTEL_TRACES_EXPORTER": "console"}, service_name="flag") == TracingConfig(
        ("console",), "flag", None, "http/protobuf"
    )
    with pytest.raises(TracingConfigError, match="unknown exporter 'zipkin'"):
        config({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(TracingConfigError, match="http/protobuf or grpc"):
        config({"OTEL_EXPORTER_OTLP_ENDPOINT": "x", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


# -- Redis mode: real API and worker processes --------------------------------------------------


def console_spans(path: Path) -> list[dict[str, Any]]:
    """The spans the console exporter wrote, one JSON object per line."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_one_trace_across_api_and_worker_processes(
    tmp_path: Path, redis_url: str, redis_prefix: str, tiny_checkpoints: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "COLORIZE_"))}
    env.update(
        OMP_NUM_THREADS="1", COLORIZE_QUEUE="redis", COLORIZE_REDIS_URL=redis_url,
        COLORIZE_REDIS_PREFIX=redis_prefix, COLORIZE_HOST="127.0.0.1", COLORIZE_DEVICE="cpu",
        COLORIZE_WORKER_THREADS="2", COLORIZE_WARMUP="false", OTEL_TRACES_EXPORTER="console",
    )  # fmt: skip
    api_port, metrics_port = free_port(), free_port()
    commands = {
        "api": ["serve", "--port", str(api_port)],
        "worker": ["worker", "--checkpoints", str(tiny_checkpoints), "--no-detector",
                   "--metrics-port", str(metrics_port), "--consumer", "w1"],
    }  # fmt: skip
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "service", *args],
            cwd=ROOT,
            env=env,
            stdout=(tmp_path / f"{name}.out").open("wb"),
            stderr=(tmp_path / f"{name}.err").open("wb"),
        )
        for name, args in commands.items()
    }
    try:
        deadline = time.monotonic() + 90
        while True:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    pytest.fail(f"{name} exited: {(tmp_path / f'{name}.err').read_text()}")
            try:
                if httpx.get(f"http://127.0.0.1:{api_port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "worker.err").read_text()
            time.sleep(0.2)
        request_id = uuid.uuid4().hex
        response = httpx.post(
            f"http://127.0.0.1:{api_port}/colorize", params={"boxes": json.dumps(BOXES)},
            content=png(64, 48), timeout=60,
            headers={"content-type": "image/png", "x-request-id": request_id},
        )  # fmt: skip
        assert response.status_code == 200, response.text
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            proc.wait(30)
    assert procs["api"].returncode == 0 and procs["worker"].returncode == 0
    api_spans = console_spans(tmp_path / "api.out")
    worker_spans = console_spans(tmp_path / "worker.out")
    [server] = [s for s in api_spans if s["kind"] == "SpanKind.SERVER" and "/colorize" in s["name"]]
    trace_id = server["context"]["trace_id"]
    [submit] = [s for s in api_spans if s["name"] == "redis submit"]
    assert submit["kind"] == "SpanKind.PRODUCER"
    assert submit["parent_id"] == server["context"]["span_id"]
    traced = [s for s in worker_spans if s["context"]["trace_id"] == trace_id]
    by_name = {s["name"]: s for s in traced}
    assert set(by_name) == {"colorize", *STAGES}, sorted(by_name)
    assert len(traced) == 1 + len(STAGES)
    job = by_name["colorize"]
    assert job["parent_id"] == submit["context"]["span_id"]  # across Redis, via traceparent
    assert job["attributes"]["colorize.request_id"] == request_id
    assert job["attributes"]["colorize.instances"] == 2
    for name in STAGES:
        assert by_name[name]["parent_id"] == job["context"]["span_id"], name
    assert server["resource"]["attributes"]["service.name"] == "instcolor-serve"
    assert job["resource"]["attributes"]["service.name"] == "instcolor-worker"
    # the worker leaves no entry behind: the job's trace context travelled inside its meta
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.xlen(f"{redis_prefix}:jobs") == 0
    finally:
        client.close()


# -- deployment: the Jaeger overlay and the image's extra ---------------------------------------


def test_jaeger_overlay_sends_api_and_worker_traces_to_jaeger() -> None:
    from deploy_support import compose_command

    env = {k: v for k, v in os.environ.items() if not k.startswith(("COLORIZE_", "OTEL_"))}
    result = subprocess.run(
        [*compose_command(), "-f", "docker-compose.yml", "-f", "docker-compose.tracing.yml",
         "config", "--format", "json"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    jaeger = services["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/all-in-one:")
    assert "4318" in jaeger["expose"]  # OTLP over HTTP
    assert [p["target"] for p in jaeger["ports"]] == [16686]  # the UI, on the monitoring bind
    names = {}
    for role in ("api", "worker"):
        environment = services[role]["environment"]
        assert environment["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
        assert "jaeger" in services[role]["depends_on"]
        names[role] = environment["OTEL_SERVICE_NAME"]
        # what the processes will do with these variables
        config = TracingConfig.from_env(environment, default_service_name="unset")
        assert config is not None and config.exporters == ("otlp",)
    assert names == {"api": "instcolor-api", "worker": "instcolor-worker"}


def test_the_image_installs_the_tracing_extra(tmp_path: Path) -> None:
    import tomllib

    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG IMAGE_EXTRAS=tracing$", dockerfile, re.M)
    assert '--extras "${IMAGE_EXTRAS}"' in dockerfile
    subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "requirements_from_pyproject.py"),
         str(ROOT / "pyproject.toml"), "--out", str(tmp_path), "--extras", "tracing"],
        check=True, timeout=60,
    )  # fmt: skip
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [r for r in (tmp_path / "requirements.txt").read_text().split("\n") if r]
    tracing_extra = project["optional-dependencies"]["tracing"]
    assert requirements == project["dependencies"] + tracing_extra
    assert any(r.startswith("opentelemetry-exporter-otlp") for r in tracing_extra)
    [own] = [
        r for r in project["optional-dependencies"]["dev"] if r.startswith("instcolor-service[")
    ]
    assert "tracing" in own.removeprefix("instcolor-service[").rstrip("]").split(",")
