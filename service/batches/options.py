"""Batch and item options: the /colorize query's options as JSON, checked at submit (422)."""

from __future__ import annotations

from typing import Any

from service.core.boxes import BoxesError, validate_boxes
from service.core.errors import InvalidParameterError
from service.core.hints import validate_hints
from service.core.jobs import (
    SATURATION_RANGE,
    TEMPERATURE_RANGE,
    JobOptions,
    temperature_refusal,
    unknown_model_message,
)
from service.settings import ServiceSettings

OPTION_NAMES = (
    "format",
    "quality",
    "resolution",
    "max_instances",
    "score_threshold",
    "boxes",
    "saturation",
    "model",
    "hints",
    "temperature",
)


def parse_boxes(value: Any, max_boxes: int) -> tuple[list[list[float]] | None, list[float] | None]:
    """Boxes as on /colorize (a list, or {"boxes", "scores"}), already parsed from JSON."""
    try:
        return validate_boxes(value, max_boxes)
    except BoxesError as exc:
        raise InvalidParameterError(f"boxes: {exc}") from None


def _number(name: str, value: Any, low: float, high: float, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidParameterError(f"option {name!r} must be a number, got {value!r}")
    if integer and not float(value).is_integer():
        raise InvalidParameterError(f"option {name!r} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise InvalidParameterError(f"option {name!r} must be in [{low:g}, {high:g}], got {value}")
    return value


def check_options(
    options: Any, settings: ServiceSettings, where: str = "options"
) -> dict[str, Any]:
    """The options as given, once each is known and valid; else 422 naming what to fix."""
    if not isinstance(options, dict):
        raise InvalidParameterError(f"{where} must be a JSON object")
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise InvalidParameterError(
            f"{where}: unknown option(s) {', '.join(map(repr, unknown))}; valid: "
            f"{', '.join(OPTION_NAMES)}"
        )
    if "format" in options and options["format"] not in (None, "jpeg", "png", "webp"):
        raise InvalidParameterError(f"{where}: format must be jpeg, png or webp")
    if "resolution" in options and options["resolution"] not in ("original", "network"):
        raise InvalidParameterError(f"{where}: resolution must be original or network")
    if "quality" in options:
        _number("quality", options["quality"], 1, 100, integer=True)
    if "max_instances" in options:
        _number("max_instances", options["max_instances"], 0, settings.instance_limit, True)
    if "score_threshold" in options:
        _number("score_threshold", options["score_threshold"], 0.0, 1.0)
    if "saturation" in options:
        _number("saturation", options["saturation"], *SATURATION_RANGE)
    if options.get("boxes") is not None:
        parse_boxes(options["boxes"], settings.max_boxes)
    if "model" in options and options["model"] not in settings.model_list():
        raise InvalidParameterError(
            f"{where}: " + unknown_model_message(options["model"], settings.model_list())
        )
    if options.get("hints") is not None:
        validate_hints(options["hints"])
    if options.get("temperature") is not None:
        _number("temperature", options["temperature"], *TEMPERATURE_RANGE)
    return dict(options)


def check_item_model(
    batch_options: dict[str, Any],
    item_options: dict[str, Any],
    settings: ServiceSettings,
    where: str,
) -> None:
    """An item's options merged over the batch's, checked against the model they choose: 422 for
    ``temperature`` on a model that does not decode by the annealed mean."""
    merged = {**batch_options, **item_options}
    if merged.get("temperature") is not None:
        refusal = temperature_refusal(job_model(merged, settings))
        if refusal is not None:
            raise InvalidParameterError(f"{where}: {refusal}")


def job_model(options: dict[str, Any], settings: ServiceSettings) -> str:
    """The model checked options ask for (default: the server's first)."""
    return str(options.get("model") or settings.default_model)


def job_options(options: dict[str, Any], settings: ServiceSettings) -> JobOptions:
    """Checked options as the engine's ``JobOptions``."""
    values = dict(options)
    values.pop("model", None)  # the job's, not its options' (``job_model``)
    boxes = values.pop("boxes", None)
    if boxes is not None:
        values["boxes"], values["scores"] = parse_boxes(boxes, settings.max_boxes)
    if values.get("hints") is not None:
        values["hints"] = validate_hints(values["hints"]) or None
    values.setdefault("max_instances", settings.instance_limit)
    return JobOptions(**values)
