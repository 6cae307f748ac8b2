"""Builds the colorization engine from settings: the one place a process loads weights."""

from __future__ import annotations

import logging
import os
from typing import Any

from models.pipeline import Colorizer
from models.precision import precision_reason
from models.registry import LARSSON_ECCV16, get_model
from models.zoo import ModelColorizer, load_colorizer
from service.settings import ModelSettings

log = logging.getLogger(__name__)


class ModelSetupError(RuntimeError):
    """The models named by the settings cannot be loaded (the message says why and what to do)."""


class MissingWeightsError(ModelSetupError):
    """Weight files are absent; the message names them and the command that fetches them."""


class UnknownModelsError(ModelSetupError):
    """A model name that is not in the registry; the message lists the known ones."""


def check_model_names(settings: ModelSettings) -> None:
    from models.registry import UnknownModelError

    for name in settings.model_list():
        try:
            get_model(name)
        except UnknownModelError as exc:
            raise UnknownModelsError(f"{exc} (COLORIZE_MODELS / --models / --model)") from None


def check_weight_files(settings: ModelSettings, models: list[str] | None = None) -> None:
    """Raise ``MissingWeightsError`` (naming the files and fetch-weights) if any is absent, or
    ``UnknownModelsError`` for a name that is not a model."""
    check_model_names(settings)
    missing = settings.missing_weight_files(models)
    if missing:
        names = "\n  ".join(str(p) for p in missing)
        chosen = models or settings.model_list()
        trained = [m for m in chosen if not get_model(m).published]
        wanted = " ".join(f"--model {m}" for m in chosen if m not in trained)
        how = (
            f"Download them with `python -m service fetch-weights --dir {settings.weights_dir}` "
            f"({wanted}; needs internet; offline: copy the files to exactly these paths, see "
            "docs/weights.md and docs/models.md), point COLORIZE_WEIGHTS_DIR (--weights-dir), "
            "COLORIZE_CHECKPOINTS / COLORIZE_DETECTOR_WEIGHTS (or --checkpoints / "
            "--detector-weights) at existing files, or pass --no-detector to run without "
            "detector."
            if wanted
            else ""
        )
        if trained:  # no published weights: nothing to download
            how += (
                f"{' ' if how else ''}{', '.join(trained)}: no published weights; train them "
                f"with `python -m service train --model {trained[0]} ...` and point "
                "--weights-dir at the run's weights/ folder (docs/models.md)."
            )
        raise MissingWeightsError(f"missing weight files:\n  {names}\n{how}")


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


def build_colorizer(settings: ModelSettings, model: str | None = None) -> ModelColorizer:
    """Load ``model`` (default: the settings' default model) as ``settings`` say."""
    name = model or settings.default_model
    check_weight_files(settings, [name])
    device = settings.resolved_device()
    precision = settings.resolved_precision()
    spec = get_model(name)
    colorizer = load_colorizer(
        name,
        settings.weights_dir,
        device,
        precision,
        channels_last=settings.channels_last,
        checkpoints=settings.checkpoints,
        detector_weights=settings.detector_weights if settings.detector else None,
        detector_version=settings.detector_version,
        detector_size=(settings.detector_min_size, settings.detector_max_size),
        instance_limit=settings.instance_limit,
        network_size=settings.larsson_size if name == LARSSON_ECCV16.name else None,
    )
    if isinstance(colorizer, Colorizer):  # the instance-aware pipeline: its crops
        colorizer.device_crops = settings.resolved_device_crops()
    log.info("%s on %s", precision_reason(settings.precision, device), device)
    where = settings.checkpoints if spec.uses_detector else spec.folder(settings.weights_dir)
    if spec.uses_detector:
        log.info("loaded %s", model_summary(colorizer.describe(), where))
    else:
        log.info("loaded %s (%s) from %s", name, colorizer.version, where)
    return colorizer
