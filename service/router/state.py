"""What the routes share: settings, the queue once started, and whether the server drains."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from service.core.queue import JobQueue
from service.settings import ServiceSettings

log = logging.getLogger(__name__)


@dataclass
class ServiceState:
    settings: ServiceSettings
    queue: JobQueue | None = None
    draining: bool = False
    started: float = field(default_factory=time.time)

    def begin_drain(self) -> None:
        """Readiness goes 503 and /colorize refuses new work (called on SIGTERM)."""
        if not self.draining:
            log.info("draining: no new work is admitted")
        self.draining = True
