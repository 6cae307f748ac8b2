"""Builds the colorization engine from settings: the one place a process loads weights."""

from __future__ import annotations

import logging

from models.pipeline import Colorizer
from service.settings import ModelSettings

log = logging.getLogger(__name__)


class MissingWeightsError(RuntimeError):
    """Weight files are absent; the message names them and the command that fetches them."""


def check_weight_files(settings: ModelSettings) -> None:
    """Raise ``MissingWeightsError`` (naming the files and fetch-weights) if any is absent."""
    missing = settings.missing_weight_files()
    if missing:
        names = "\n  ".join(str(p) for p in missing)
        raise MissingWeightsError(
            f"missing weight files:\n  {names}\n"
            "Download them with `python -m service fetch-weights --dir weights` (needs internet), "
            "point COLORIZE_CHECKPOINTS / COLORIZE_DETECTOR_WEIGHTS (or --checkpoints / "
            "--detector-weights) at existing files, or pass --no-detector to run without detector."
        )


def build_colorizer(settings: ModelSettings) -> Colorizer:
    check_weight_files(settings)
    device = settings.resolved_device()
    precision = settings.resolved_precision()
    colorizer = Colorizer.load(
        settings.checkpoints,
        settings.detector_weights if settings.detector else None,
        detector_version=settings.detector_version,
        detector_size=(settings.detector_min_size, settings.detector_max_size),
        device=device,
        precision=precision,
        instance_limit=settings.instance_limit,
    )
    log.info(
        "loaded %s from %s (detector file %s)",
        colorizer.describe(), settings.checkpoints, settings.detector_weights if settings.detector else None,
    )  # fmt: skip
    return colorizer
