"""What one colorization request is, and what comes back: plain data that crosses processes.

A job carries the raw image bytes and the request's options; decoding happens in the worker's CPU
pool, so the in-process batcher and the Redis worker run the same code (``BatchEngine``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from models.constants import ANNEALED_MEAN_MODELS, SATURATION_RANGE, TEMPERATURE_RANGE

OutputFormat = Literal["jpeg", "png", "webp"]
DEFAULT_MODEL = "instcolor"  # models.registry.DEFAULT_MODEL, without importing torch
SAMPLES_LIMIT = 8  # models.zhao_pixelated.MAX_SAMPLES, without importing torch
# The sampling models and their most samples per image (models.registry's max_samples > 1)
SAMPLING_MODELS = {"zhao-pixelated": SAMPLES_LIMIT}


def samples_limit(models: list[str]) -> int:
    """The most ``samples`` any of ``models`` takes (1 when none of them samples)."""
    return max((SAMPLING_MODELS.get(m, 1) for m in models), default=1)


def temperature_refusal(model: str) -> str | None:
    """The 422 detail for ``temperature`` on ``model``, or None if the model takes it."""
    if model in ANNEALED_MEAN_MODELS:
        return None
    return (
        f"model {model!r} does not decode by the annealed mean; temperature needs a model that "
        f"does ({', '.join(ANNEALED_MEAN_MODELS)}): leave temperature out or choose one of them"
    )


def unknown_model_message(name: str, loaded: list[str]) -> str:
    """The 422 detail for a model that is not loaded (or not a model at all)."""
    return (
        f"model {name!r} is not loaded here; loaded models: {', '.join(loaded)} "
        "(GET /models lists them; the server loads those named by --models / COLORIZE_MODELS)"
    )


@dataclass(frozen=True)
class JobOptions:
    format: OutputFormat | None = None  # None: jpeg for jpeg input, otherwise png
    quality: int = 90
    resolution: Literal["original", "network"] = "original"
    max_instances: int = 8
    score_threshold: float = 0.7
    boxes: list[list[float]] | None = None  # caller-supplied [x1, y1, x2, y2] in input pixels
    scores: list[float] | None = None
    saturation: float = 1.0  # colour strength: scales the predicted ab (1.0: the model's own)
    samples: int = 1  # colourings per image (a sampling model: zhao-pixelated)
    seed: int | None = None  # a sampling model's seed (None: drawn, and returned)
    # colour hints as checked by service.core.hints ({"x", "y", "color" | "ab", "size"}): part of
    # the result-cache key (protocol.cache_digest hashes every option)
    hints: list[dict[str, Any]] | None = None
    # the annealed mean's temperature (zhang-eccv16, li-dcnn; None: the model's default): only
    # sent, and only part of the cache key, when given
    temperature: float | None = None


@dataclass(frozen=True)
class Job:
    request_id: str
    image: bytes
    options: JobOptions
    deadline: float  # time.time() after which the result is useless (504)
    enqueued_at: float  # time.time() when admitted
    pixels: int = 0  # width x height from the image header (0: unknown), for cost admission
    # W3C trace context (traceparent) of the request, set by the queue that admitted the job when
    # tracing is on (service.core.tracing): the engine's spans join the request's trace
    trace_context: dict[str, str] = field(default_factory=dict)
    model: str = DEFAULT_MODEL  # the registry name of the model that must run it


@dataclass(frozen=True)
class JobResult:
    body: bytes  # the encoded image
    media_type: str  # image/jpeg, image/png, image/webp
    boxes: list[list[int]]
    scores: list[float]
    timings: dict[str, float]  # seconds: decode, queue, detect, instance, fusion, merge, encode
    model_version: str
    cached: bool = False
    input_size: list[int] | None = None  # [width, height] of the upright input: the boxes' frame
    truncated: bool = False  # the input was cut short and decoded as far as it went (opt-in)
    model: str = DEFAULT_MODEL  # the model that produced it
    # A sampling model's answer: the seed used (None for the other models) and the base64 of the
    # encoded samples after the first (the first is ``body``), in the same media type.
    seed: int | None = None
    samples_base64: list[str] = field(default_factory=list)


__all__ = [
    "ANNEALED_MEAN_MODELS",
    "DEFAULT_MODEL",
    "SAMPLES_LIMIT",
    "SAMPLING_MODELS",
    "SATURATION_RANGE",
    "TEMPERATURE_RANGE",
    "Job",
    "JobOptions",
    "JobResult",
    "OutputFormat",
    "samples_limit",
    "temperature_refusal",
]
