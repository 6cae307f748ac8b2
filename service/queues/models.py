"""Several models behind one ``JobQueue``: one queue per model, each batching its own jobs.

``ModelQueues`` routes a job to the queue of ``job.model`` (memory mode: an ``InProcessQueue`` with
that model's engine; Redis mode: a ``RedisJobQueue`` on that model's stream), so a batch only ever
holds one model's jobs. Readiness needs every model ready; ``describe()`` is the default model's
description (what ``/info`` always showed) plus ``models``: each model's own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from service.core.errors import InvalidParameterError
from service.core.jobs import Job, JobResult, unknown_model_message
from service.core.queue import JobQueue

log = logging.getLogger(__name__)


class ModelQueues:
    """``JobQueue`` over one queue per model; the first model is the default."""

    def __init__(
        self, queues: Mapping[str, JobQueue], on_close: Callable[[], None] | None = None
    ) -> None:
        if not queues:
            raise ValueError("ModelQueues needs at least one model")
        self.queues = dict(queues)
        self.default_model = next(iter(self.queues))
        self._on_close = on_close

    @property
    def models(self) -> list[str]:
        return list(self.queues)

    def queue_for(self, model: str) -> JobQueue:
        try:
            return self.queues[model]
        except KeyError:
            raise InvalidParameterError(unknown_model_message(model, self.models)) from None

    async def start(self) -> None:
        for queue in self.queues.values():
            await queue.start()

    async def wait_loaded(self) -> None:
        for queue in self.queues.values():
            wait = getattr(queue, "wait_loaded", None)
            if wait is not None:
                await wait()

    async def submit(self, job: Job) -> JobResult:
        return await self.queue_for(job.model).submit(job)

    async def drain(self) -> None:
        await asyncio.gather(*(queue.drain() for queue in self.queues.values()))

    async def close(self) -> None:
        for queue in self.queues.values():
            await queue.close()
        if self._on_close is not None:
            await asyncio.to_thread(self._on_close)

    def depth(self) -> int:
        return sum(queue.depth() for queue in self.queues.values())

    async def ready(self) -> bool:
        for queue in self.queues.values():
            if not await queue.ready():
                return False
        return True

    def describe(self) -> dict[str, Any]:
        default = self.queues[self.default_model].describe()
        return {
            **default,
            "models": {name: queue.describe() for name, queue in self.queues.items()},
        }

    def failure(self) -> str | None:
        for name, queue in self.queues.items():
            reason = queue.failure()
            if reason:
                return reason if len(self.queues) == 1 else f"{name}: {reason}"
        return None
