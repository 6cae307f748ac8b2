"""What a batch and its items are: plain data, the same in SQLite and in Redis.

The batch object follows the OpenAI Batch API's shape (statuses, ``request_counts``, one output
file and one error file keyed by the caller's ``custom_id``).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Literal

BatchStatus = Literal[
    "validating",
    "in_progress",
    "finalizing",
    "completed",
    "failed",
    "expired",
    "cancelling",
    "cancelled",
]
STATUSES: tuple[str, ...] = (
    "validating",
    "in_progress",
    "finalizing",
    "completed",
    "failed",
    "expired",
    "cancelling",
    "cancelled",
)
OPEN_STATUSES = frozenset({"validating", "in_progress", "finalizing", "cancelling"})
TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
EVENTS = ("batch.completed", "batch.failed", "batch.cancelled", "batch.expired", "batch.progress")
TERMINAL_EVENT = {s: f"batch.{s}" for s in TERMINAL_STATUSES}

ItemState = Literal["pending", "ok", "failed"]


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(12)


@dataclass
class Item:
    """One image of a batch: ``seq`` orders it, ``custom_id`` names it for the caller."""

    seq: int
    custom_id: str
    source: str  # absolute path of the input image
    options: dict[str, Any] = field(default_factory=dict)  # per-item options (over the batch's)


@dataclass
class BatchRecord:
    id: str
    owner: str  # the API key's name ("anonymous" when keys are off)
    status: str
    created_at: float
    total: int
    completed: int = 0
    failed: int = 0
    # everything else: timestamps (<status>_at), expires_at, options, metadata, output_dir,
    # input_dir, webhook {url, events, deliveries, delivered}, idempotency_key, errors
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATUSES

    def mark(self, status: str, now: float | None = None) -> None:
        self.status = status
        self.info[f"{status}_at"] = int(now if now is not None else time.time())

    def to_object(self) -> dict[str, Any]:
        """The batch object the API returns."""
        info = self.info
        webhook = info.get("webhook")
        base = f"/batches/{self.id}"
        return {
            "id": self.id,
            "object": "batch",
            "status": self.status,
            "input_type": info.get("input_type"),
            "created_at": int(self.created_at),
            **{
                f"{s}_at": info.get(f"{s}_at")
                for s in (
                    "in_progress",
                    "finalizing",
                    "completed",
                    "failed",
                    "expired",
                    "cancelling",
                    "cancelled",
                )
            },
            "expires_at": info.get("expires_at"),
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "options": info.get("options", {}),
            "metadata": info.get("metadata", {}),
            "output_file": base + "/output",
            "error_file": base + "/errors",
            "archive_file": base + "/archive",
            "errors": info.get("errors"),
            "webhook": None
            if webhook is None
            else {
                "url": webhook["url"],
                "events": webhook["events"],
                "deliveries": webhook.get("deliveries", [])[-20:],
            },
        }
