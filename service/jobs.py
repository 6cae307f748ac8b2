"""What one colorization request is, and what comes back: plain data that crosses processes.

A job carries the raw image bytes and the request's options; decoding happens in the worker's CPU
pool, so the in-process batcher and the Redis worker run the same code (``BatchEngine``).
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

OutputFormat = Literal["jpeg", "png", "webp"]


@dataclass(frozen=True)
class JobOptions:
    format: OutputFormat | None = None  # None: jpeg for jpeg input, otherwise png
    quality: int = 90
    resolution: Literal["original", "network"] = "original"
    max_instances: int = 8
    score_threshold: float = 0.7
    boxes: list[list[float]] | None = None  # caller-supplied [x1, y1, x2, y2] in input pixels
    scores: list[float] | None = None


@dataclass(frozen=True)
class Job:
    request_id: str
    image: bytes
    options: JobOptions
    deadline: float  # time.time() after which the result is useless (504)
    enqueued_at: float  # time.time() when admitted

    def to_json(self) -> str:
        data = asdict(self)
        data["image"] = base64.b64encode(self.image).decode("ascii")
        return json.dumps(data)

    @staticmethod
    def from_json(text: str | bytes) -> Job:
        data = json.loads(text)
        return Job(
            request_id=data["request_id"],
            image=base64.b64decode(data["image"]),
            options=JobOptions(**data["options"]),
            deadline=float(data["deadline"]),
            enqueued_at=float(data["enqueued_at"]),
        )


@dataclass(frozen=True)
class JobResult:
    body: bytes  # the encoded image
    media_type: str  # image/jpeg, image/png, image/webp
    boxes: list[list[int]]
    scores: list[float]
    timings: dict[str, float]  # seconds: decode, queue, detect, instance, fusion, merge, encode
    model_version: str
    cached: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data["body"] = base64.b64encode(self.body).decode("ascii")
        return json.dumps(data)

    @staticmethod
    def from_json(text: str | bytes) -> JobResult:
        data = json.loads(text)
        data["body"] = base64.b64decode(data["body"])
        return JobResult(**data)
