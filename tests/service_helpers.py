"""Helpers shared by the service tests: jobs, metric reads, fault injection, running apps.

Fault injection wraps the real engine: ``FaultyColorizer`` raises before delegating to the real
``predict`` (errors a CPU cannot produce, such as CUDA out-of-memory); ``GatedEngine`` holds the
real engine's batches until the test opens its gate (to fill or overflow the queue on purpose).
"""

from __future__ import annotations

import asyncio
import io
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import torch
from fastapi import FastAPI
from PIL import Image
from prometheus_client import REGISTRY

from models.pipeline import Colorizer, Prediction, PreparedImage, StopCheck
from service.app import create_app, default_queue_factory
from service.core.errors import ServiceError
from service.core.jobs import Job, JobOptions, JobResult
from service.core.metrics import METRICS
from service.core.queue import JobQueue
from service.engine.batch import BatchEngine
from service.queues.memory import InProcessQueue
from service.settings import ServiceSettings

# The in-process tests run queues and engines without building an app (which registers the
# process's role): show every metric on the default registry, as the memory-mode server does.
METRICS.register("memory")


def make_job(image: bytes, request_id: str = "r", timeout: float = 30.0, **options: Any) -> Job:
    now = time.time()
    return Job(request_id, image, JobOptions(**options), deadline=now + timeout, enqueued_at=now)


def size_of(body: bytes | JobResult) -> tuple[int, int]:
    data = body.body if isinstance(body, JobResult) else body
    return Image.open(io.BytesIO(data)).size


def sample(name: str, **labels: str) -> float:
    """A sample of the default registry (0 when absent)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def batches_over_one() -> float:
    """Batches of more than one request the engine has seen so far (process-wide)."""
    return sample("colorize_batch_size_count") - sample("colorize_batch_size_bucket", le="1.0")


class FaultyColorizer(Colorizer):
    """The real colorizer, with faults injected in ``predict`` and every call's size recorded."""

    def __init__(
        self, base: Colorizer, *, oom_above: int = 0, poison_size: tuple[int, int] | None = None
    ) -> None:
        self.__dict__.update(base.__dict__)
        self.oom_above = oom_above
        self.poison_size = poison_size
        self.calls: list[int] = []

    def predict(
        self, batch: Sequence[PreparedImage], should_stop: StopCheck | None = None
    ) -> list[Prediction | None]:
        self.calls.append(len(batch))
        if self.oom_above and len(batch) > self.oom_above:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        if self.poison_size is not None and any(p.source.size == self.poison_size for p in batch):
            raise RuntimeError("kernel failure (injected)")
        return super().predict(batch, should_stop)


class GatedEngine:
    """The real engine behind a gate the test opens: holds batches to fill or overflow the queue."""

    def __init__(self, engine: BatchEngine) -> None:
        self.engine = engine
        self.gate = asyncio.Event()
        self.batches: list[int] = []

    async def run_batch(
        self, jobs: Sequence[Job], abandoned: Callable[[Job], bool] | None = None
    ) -> list[JobResult | ServiceError]:
        self.batches.append(len(jobs))
        await self.gate.wait()
        return await self.engine.run_batch(jobs, abandoned)

    def describe(self) -> dict[str, Any]:
        return self.engine.describe()

    def close(self) -> None:
        self.engine.close()


def service_settings(checkpoints: Path, **overrides: Any) -> ServiceSettings:
    """Settings for tests: tiny checkpoints, no detector, CPU, no warm-up unless asked."""
    values: dict[str, Any] = {
        "checkpoints": checkpoints,
        "detector": False,
        "device": "cpu",
        "precision": "fp32",
        "warmup": False,
        "max_batch_delay_ms": 20.0,
        "max_batch_size": 8,  # batching is what these tests exercise (unset, a CPU gets 1)
        "worker_threads": 2,
        "drain_timeout_s": 10.0,
        **overrides,
    }
    if "state_dir" not in values:  # the batch API's database: never the checkout's state/
        state = Path(tempfile.mkdtemp(prefix="colorize-state-"))
        values.update(state_dir=state, batch_output_dir=state / "batch-output")
    return ServiceSettings(**values)


def gated_factory(
    colorizer: Colorizer, holder: dict[str, GatedEngine], loaded: asyncio.Event | None = None
) -> Callable[[ServiceSettings], JobQueue]:
    """A memory queue whose engine is the real one behind a gate (put in ``holder['engine']``);
    with ``loaded``, loading itself waits until that event is set."""

    def factory(settings: ServiceSettings) -> JobQueue:
        async def load() -> GatedEngine:
            if loaded is not None:
                await loaded.wait()
            pool = ThreadPoolExecutor(settings.worker_threads)
            engine = GatedEngine(BatchEngine(colorizer, pool, max_pixels=settings.max_pixels))
            holder["engine"] = engine
            return engine

        return InProcessQueue.from_settings(load, settings)

    return factory


def engine_factory(colorizer: Colorizer) -> Callable[[ServiceSettings], JobQueue]:
    """A memory queue on a given (e.g. fault-injected) colorizer."""

    def factory(settings: ServiceSettings) -> JobQueue:
        async def load() -> BatchEngine:
            pool = ThreadPoolExecutor(settings.worker_threads)
            return BatchEngine(colorizer, pool, max_pixels=settings.max_pixels)

        return InProcessQueue(
            load,
            max_batch_size=settings.max_batch_size,
            max_batch_delay_ms=settings.max_batch_delay_ms,
            queue_size=settings.queue_size,
        )

    return factory


async def wait_ready(client: httpx.AsyncClient, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while (await client.get("/readyz")).status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError("the app did not become ready")
        await asyncio.sleep(0.05)


@asynccontextmanager
async def running_app(
    settings: ServiceSettings,
    queue_factory: Callable[[ServiceSettings], JobQueue] = default_queue_factory,
    *,
    ready: bool = True,
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app with its lifespan running, and an HTTP client talking to it in-process."""
    app = create_app(settings, queue_factory)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", timeout=60
        ) as client:
            if ready:
                await wait_ready(client)
            yield app, client
