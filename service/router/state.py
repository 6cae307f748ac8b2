"""What the routes share: settings, the queue once started, and whether the server drains."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from service.core.queue import JobQueue
from service.settings import ServiceSettings

if TYPE_CHECKING:
    from service.batches.runner import BatchScheduler

log = logging.getLogger(__name__)


@dataclass
class ServiceState:
    settings: ServiceSettings
    queue: JobQueue | None = None
    batches: BatchScheduler | None = None  # the batch API, once started
    draining: bool = False
    started: float = field(default_factory=time.time)

    def begin_drain(self) -> None:
        """Readiness goes 503 and /colorize refuses new work (called on SIGTERM)."""
        if not self.draining:
            log.info("draining: no new work is admitted")
        self.draining = True
