"""OpenTelemetry tracing, off unless configured; the OpenTelemetry SDK is imported only when on.

On when ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``, ``console``), or an OTLP endpoint is
given (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or the commands'
``--otlp-endpoint``). ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` keeps it off.
The SDK reads the other standard variables itself (``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``, ``OTEL_EXPORTER_OTLP_HEADERS``...). docs/tracing.md.

Off, every helper here is a constant-time no-op: ``carrier()`` is ``{}``, ``stage_span`` a null
context, ``job_trace`` a shared object whose methods do nothing.

The engine's stages run on thread pools, where the request's context does not follow; so a job
carries its trace context (``Job.trace_context``, W3C ``traceparent``) from the queue that admitted
it, across Redis too, and ``JobTrace`` records the stage spans under it with the times the engine
measured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from service.core.errors import ServiceError
    from service.core.jobs import Job, JobResult

EXTRA = "tracing"
EXPORTERS = ("otlp", "console")
STAGES = ("queue wait", "decode", "detect", "instance", "fusion", "merge", "encode")
"""The span names of one job's stages, in the order they run (children of its ``colorize`` span)."""


class TracingConfigError(RuntimeError):
    """Tracing is configured but cannot start (extra missing, unknown exporter or protocol)."""


@dataclasses.dataclass(frozen=True)
class TracingConfig:
    exporters: tuple[str, ...]  # some of EXPORTERS
    service_name: str
    otlp_endpoint: str | None  # the full traces URL; None: the SDK's (from OTEL_EXPORTER_OTLP_*)
    protocol: str  # http/protobuf or grpc

    @staticmethod
    def from_env(
        environ: Mapping[str, str],
        *,
        default_service_name: str,
        otlp_endpoint: str | None = None,
        service_name: str | None = None,
    ) -> TracingConfig | None:
        """The configuration ``environ`` and the flags ask for; None when tracing is off.

        ``otlp_endpoint``: the ``--otlp-endpoint`` flag, the collector's base URL (as
        ``OTEL_EXPORTER_OTLP_ENDPOINT``); it wins over the variables.
        """
        if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return None
        named = environ.get("OTEL_TRACES_EXPORTER", "").strip()
        exporters = [n.strip().lower() for n in named.split(",") if n.strip()]
        unknown = [n for n in exporters if n not in (*EXPORTERS, "none")]
        if unknown:
            raise TracingConfigError(
                f"OTEL_TRACES_EXPORTER={named!r}: unknown exporter {unknown[0]!r}; "
                f"use {', '.join(EXPORTERS)} or none (comma-separated)"
            )
        chosen = [n for n in exporters if n != "none"]
        endpoint_set = otlp_endpoint or any(
            environ.get(v)
            for v in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        )
        if otlp_endpoint and "otlp" not in chosen:
            chosen.append("otlp")  # the flag asks for OTLP whatever the variable says
        elif not exporters and endpoint_set:
            chosen = ["otlp"]
        if not chosen:
            return None
        protocol = (
            environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf"
        ).strip()
        if protocol not in ("http/protobuf", "grpc"):
            raise TracingConfigError(
                f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: use http/protobuf or grpc"
            )
        url = None
        if otlp_endpoint:  # a base URL, as OTEL_EXPORTER_OTLP_ENDPOINT: the signal path added
            base = otlp_endpoint.rstrip("/")
            url = base if protocol == "grpc" else f"{base}/v1/traces"
        resource_attrs = environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
        name = (
            service_name
            or environ.get("OTEL_SERVICE_NAME")
            or ("" if "service.name=" in resource_attrs else default_service_name)
        )
        return TracingConfig(tuple(dict.fromkeys(chosen)), name, url, protocol)


@dataclasses.dataclass
class _State:
    provider: TracerProvider | None = None
    tracer: Tracer | None = None


_STATE = _State()


def enabled() -> bool:
    return _STATE.tracer is not None


def setup(config: TracingConfig | None) -> bool:
    """Install the tracer provider ``config`` describes (nothing when None); whether tracing is on.

    Raises ``TracingConfigError`` naming the ``tracing`` extra when the SDK is not installed.
    """
    if config is None:
        return False
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
            SpanExporter,
        )
    except ImportError as exc:
        raise TracingConfigError(_missing_extra(exc)) from exc
    attributes = {SERVICE_NAME: config.service_name} if config.service_name else {}
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in config.exporters:
        if name == "console":  # one JSON object per line on stdout, written as each span ends
            console = ConsoleSpanExporter(formatter=lambda span: span.to_json(indent=None) + "\n")
            provider.add_span_processor(SimpleSpanProcessor(console))
            continue
        exporter: SpanExporter
        try:
            if config.protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                    OTLPSpanExporter as GrpcExporter,
                )

                exporter = GrpcExporter(endpoint=config.otlp_endpoint)
            else:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

                exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint)
        except ImportError as exc:
            raise TracingConfigError(_missing_extra(exc)) from exc
        provider.add_span_processor(BatchSpanProcessor(exporter))  # exports off the hot path
    install(provider)
    return True


def _missing_extra(exc: ImportError) -> str:
    grpc = "grpc" in str(exc.name or exc)
    package = "opentelemetry-exporter-otlp-proto-grpc" if grpc else f"the {EXTRA} extra"
    how = "pip install opentelemetry-exporter-otlp-proto-grpc" if grpc else (
        f"pip install -e '.[{EXTRA}]'"
    )  # fmt: skip
    return (
        f"tracing is configured (OTEL_* variables or --otlp-endpoint) but {package} is not "
        f"installed ({exc}): {how}, or unset the OTEL_* variables to run without tracing"
    )


def install(provider: TracerProvider | None) -> None:
    """Trace with ``provider`` (None: tracing off). Tests install one with an in-memory exporter."""
    _STATE.provider = provider
    _STATE.tracer = None if provider is None else provider.get_tracer("instcolor-service")


def shutdown() -> None:
    """Export what is buffered and stop (a process's last step)."""
    if _STATE.provider is not None:
        _STATE.provider.shutdown()
    install(None)


def instrument_app(app: Any) -> None:
    """The FastAPI instrumentation (a server span per request), when tracing is on."""
    if _STATE.provider is None:
        return
    try:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    except ImportError as exc:
        raise TracingConfigError(_missing_extra(exc)) from exc
    # the ASGI receive/send spans are one per body chunk: noise, not stages
    FastAPIInstrumentor.instrument_app(
        app, tracer_provider=_STATE.provider, exclude_spans=["receive", "send"]
    )


def carrier() -> dict[str, str]:
    """The current trace context as W3C headers (``traceparent``...); ``{}`` when off."""
    if _STATE.tracer is None:
        return {}
    from opentelemetry import propagate

    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers


def carried(job: Job) -> Job:
    """``job`` carrying the current trace context (the same job when tracing is off)."""
    if _STATE.tracer is None:
        return job
    return dataclasses.replace(job, trace_context=carrier())


_NULL = contextlib.nullcontext()


def stage_span(
    name: str, *, kind: str = "internal", **attributes: Any
) -> contextlib.AbstractContextManager[Span | None]:
    """A span around a block, child of the current span; a null context when tracing is off.

    ``kind``: internal, producer, consumer, client or server. Attributes with None values are
    left out.
    """
    if _STATE.tracer is None:
        return _NULL
    from opentelemetry.trace import SpanKind

    return _STATE.tracer.start_as_current_span(
        name,
        kind=SpanKind[kind.upper()],
        attributes={k: v for k, v in attributes.items() if v is not None},
    )


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class JobTrace:
    """The spans of one job in the engine: ``colorize`` (from admission to answer) under the span
    the job's ``trace_context`` names, and one child per stage, with the times the engine measured
    (epoch seconds)."""

    def __init__(self, tracer: Tracer, job: Job, *, model: str, batch_size: int) -> None:
        from opentelemetry import propagate, trace

        self._tracer = tracer
        self.enqueued_at = job.enqueued_at
        self.common: dict[str, Any] = {"colorize.model": model, "colorize.batch_size": batch_size}
        self.span = tracer.start_span(
            "colorize",
            context=propagate.extract(job.trace_context) if job.trace_context else None,
            start_time=_ns(job.enqueued_at),
            attributes={"colorize.request_id": job.request_id, **self.common},
        )
        self._context = trace.set_span_in_context(self.span)

    def stage(self, name: str, start: float, end: float, **attributes: Any) -> None:
        span = self._tracer.start_span(
            name, context=self._context, start_time=_ns(start), attributes=attributes
        )
        span.end(end_time=_ns(max(start, end)))

    def decoded(self, seconds: float) -> None:
        """Decode (and prepare) just ended after ``seconds``; the job waited before it."""
        end = time.time()
        self.stage("queue wait", self.enqueued_at, end - seconds)
        self.stage("decode", end - seconds, end)

    def predicted(self, device_start: float, timings: Mapping[str, float], instances: int) -> None:
        """detect, instance, fusion: one after the other from ``device_start``."""
        at = device_start
        for name in ("detect", "instance", "fusion"):
            extra = {"colorize.instances": instances} if name == "instance" else {}
            took = timings.get(name, 0.0)
            self.stage(name, at, at + took, **self.common, **extra)
            at += took

    def finished(self, timings: Mapping[str, float]) -> None:
        """Merge then encode have just ended."""
        end = time.time()
        encode = timings.get("encode", 0.0)
        self.stage("encode", end - encode, end)
        self.stage("merge", end - encode - timings.get("merge", 0.0), end - encode)

    def end(self, answer: JobResult | ServiceError | BaseException) -> None:
        from opentelemetry.trace import Status, StatusCode

        from service.core.errors import ServiceError
        from service.core.jobs import JobResult

        if isinstance(answer, JobResult):
            self.span.set_attribute("colorize.instances", len(answer.boxes))
        elif isinstance(answer, ServiceError):
            self.span.set_attribute("colorize.error", answer.kind)
            self.span.set_attribute("http.response.status_code", answer.status)
            self.span.set_status(Status(StatusCode.ERROR, answer.detail))
        else:
            self.span.record_exception(answer)
            self.span.set_status(Status(StatusCode.ERROR, type(answer).__name__))
        self.span.end()


class _NoTrace(JobTrace):
    """``JobTrace`` when tracing is off: every method does nothing."""

    def __init__(self) -> None:
        pass

    def stage(self, name: str, start: float, end: float, **attributes: Any) -> None:
        pass

    def decoded(self, seconds: float) -> None:
        pass

    def predicted(self, device_start: float, timings: Mapping[str, float], instances: int) -> None:
        pass

    def finished(self, timings: Mapping[str, float]) -> None:
        pass

    def end(self, answer: JobResult | ServiceError | BaseException) -> None:
        pass


NO_TRACE = _NoTrace()


def job_trace(job: Job, *, model: str, batch_size: int) -> JobTrace:
    """The job's trace, started at its admission; ``NO_TRACE`` when tracing is off."""
    if _STATE.tracer is None:
        return NO_TRACE
    return JobTrace(_STATE.tracer, job, model=model, batch_size=batch_size)
