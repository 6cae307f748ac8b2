"""The one queue protocol: what the HTTP router submits to, and what a queue runs batches on.

``JobQueue`` is implemented by the in-process batcher (``service.queues.memory``) and by the Redis
client (``service.queues.redis.client``); ``BatchRunner`` by ``service.engine.batch.BatchEngine``,
which both the in-process batcher and the Redis worker call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from service.core.errors import ServiceError
from service.core.jobs import Job, JobResult


class JobQueue(Protocol):
    """What the HTTP app needs from a queue: admit, await the result, report, drain."""

    async def start(self) -> None:
        """Begin (loading may continue in the background: ``ready()`` says when it is done)."""

    async def submit(self, job: Job) -> JobResult:
        """The job's result; raises ``OverloadedError`` (queue full, with retry_after),
        ``DeadlineExceededError``, ``UnavailableError`` (loading or draining) or the job's own
        ``ServiceError``. Cancelling the call withdraws the job if it has not started."""
        ...

    async def drain(self) -> None:
        """Stop admitting; return once queued and in-flight jobs have finished."""

    async def close(self) -> None:
        """Release everything (after ``drain``, or at once on a failed start)."""

    def depth(self) -> int:
        """Jobs waiting to be processed."""
        ...

    async def ready(self) -> bool:
        """True when jobs can be served now (model loaded and warm, not draining)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Model facts for /info: version, files and sha256, device, ... (empty before loading)."""
        ...

    def failure(self) -> str | None:
        """Why the queue can never become ready (e.g. weights failed to load), else None."""
        ...


class BatchRunner(Protocol):
    """The engine side of the batcher (``service.engine.batch.BatchEngine``)."""

    async def run_batch(
        self, jobs: Sequence[Job], abandoned: Callable[[Job], bool] | None = None
    ) -> list[JobResult | ServiceError]:
        """``abandoned(job)`` is true once nobody waits for that job: skip its remaining work."""
        ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...
