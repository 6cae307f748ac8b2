"""Builds the colorization engine from settings: the one place a process loads weights."""

from __future__ import annotations

import logging
import os
from typing import Any

from models.pipeline import Colorizer
from models.precision import precision_reason
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
            "Download them with `python -m service fetch-weights --dir weights` (needs internet; "
            "offline: copy the files to exactly these paths, see docs/weights.md), "
            "point COLORIZE_CHECKPOINTS / COLORIZE_DETECTOR_WEIGHTS (or --checkpoints / "
            "--detector-weights) at existing files, or pass --no-detector to run without detector."
        )


def model_summary(description: dict[str, Any], checkpoints: os.PathLike[str] | str) -> str:
    """One readable line from ``Colorizer.describe()`` (the full record is in ``/info``).

    ``describe()`` names files without their folders (``/info`` shows no paths); the log line
    says where the weights were loaded from.
    """
    return (
        f"model {description.get('model_version')} ({description.get('checkpoint_layout')}, "
        f"width {description.get('network_width')}, from {checkpoints}), "
        f"detector {description.get('detector') or 'none'}, "
        f"{description.get('device')} {description.get('precision')}, "
        f"at most {description.get('instance_limit')} instances"
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
        channels_last=settings.channels_last,
    )
    log.info("%s on %s", precision_reason(settings.precision, device), device)
    log.info("loaded %s", model_summary(colorizer.describe(), settings.checkpoints))
    return colorizer
