"""Any registered model as one interface: ``ModelColorizer`` and the factory ``load_colorizer``.

``load_colorizer(name, weights_dir, ...)`` returns ``models.pipeline.Colorizer`` for InstColorization
(networks + optional detector) and ``models.automatic.AutomaticPipeline`` for every other entry of
``models.registry.MODELS``; both have the same stages, so the engine, the offline runner and the
commands never ask which model they run. ``model_card`` is what ``GET /models`` lists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, overload

import torch
from PIL import Image

from models.automatic import AutomaticPipeline
from models.detector import DEFAULT_MAX_SIZE, DEFAULT_MIN_SIZE, DetectorVersion
from models.image_input import InputImage
from models.pipeline import (
    ColorizedImage,
    ColorizeOptions,
    Colorizer,
    Prediction,
    PreparedImage,
    StopCheck,
)
from models.precision import PrecisionSetting, resolve_precision
from models.registry import DEFAULT_MODEL, ModelSpec, get_model
from models.zhao_pipeline import ZhaoPipeline


class ModelColorizer(Protocol):
    """What the engine, the offline runner and the commands use of a loaded model."""

    @property
    def device(self) -> torch.device: ...

    @property
    def precision(self) -> str: ...

    @property
    def version(self) -> str: ...

    def describe(self) -> dict[str, Any]: ...

    def check_options(self, options: ColorizeOptions) -> None: ...

    def prepare(
        self, image: Image.Image | InputImage, options: ColorizeOptions | None = None
    ) -> PreparedImage: ...

    @overload
    def predict(
        self, batch: Sequence[PreparedImage], should_stop: None = None
    ) -> list[Prediction]: ...

    @overload
    def predict(
        self, batch: Sequence[PreparedImage], should_stop: StopCheck
    ) -> list[Prediction | None]: ...

    def predict(
        self, batch: Sequence[PreparedImage], should_stop: StopCheck | None = None
    ) -> list[Prediction] | list[Prediction | None]: ...

    def merge(
        self,
        prepared: PreparedImage,
        prediction: Prediction,
        should_stop: Callable[[], bool] | None = None,
    ) -> ColorizedImage: ...

    def colorize(
        self,
        images: Sequence[Image.Image | InputImage],
        options: ColorizeOptions | Sequence[ColorizeOptions] | None = None,
    ) -> list[ColorizedImage]: ...

    def warmup(self, batch_size: int, instances: int | None = None) -> None: ...


def instcolor_checkpoints(weights_dir: Path | str) -> Path:
    """InstColorization's default ``--checkpoints`` under a weights dir (the unzipped folder)."""
    return Path(weights_dir) / "checkpoints"


def load_colorizer(
    model_name: str = DEFAULT_MODEL,
    weights_dir: Path | str = "weights",
    device: torch.device | str = "cpu",
    precision: PrecisionSetting = "fp32",
    *,
    channels_last: bool = True,
    checkpoints: Path | str | None = None,
    detector_weights: Path | str | None = None,
    detector_version: DetectorVersion = "v1",
    detector_size: tuple[int, int] = (DEFAULT_MIN_SIZE, DEFAULT_MAX_SIZE),
    instance_limit: int = 8,
    network_size: int | None = None,
) -> ModelColorizer:
    """Load ``model_name`` strictly from ``<weights_dir>/<its folder>`` onto ``device``.

    InstColorization reads ``checkpoints`` (default ``<weights_dir>/checkpoints``) and, when
    ``detector_weights`` is given, the detector; the other models ignore those arguments.
    ``network_size`` sets the processing size of a model whose release has one (Larsson ECCV16:
    512 by default, input size half of it); the other models ignore it.
    Raises ``UnknownModelError`` (naming the known models), ``CheckpointError`` or ``ValueError``
    (a bad precision) before anything is moved to the device.
    """
    spec = get_model(model_name)
    resolve_precision(precision, device)  # refuse a bad value before reading any weights
    if spec.uses_detector:
        return Colorizer.load(
            checkpoints if checkpoints is not None else instcolor_checkpoints(weights_dir),
            detector_weights,
            detector_version=detector_version,
            detector_size=detector_size,
            device=device,
            precision=precision,
            instance_limit=instance_limit,
            channels_last=channels_last,
        )
    sized = network_size is not None and spec.sized_loader is not None
    model = spec.load(weights_dir, "cpu", network_size if sized else None)
    pipeline = ZhaoPipeline if spec.max_samples > 1 else AutomaticPipeline
    return pipeline.from_files(
        model,
        spec.name,
        int(getattr(model, "input_size", spec.input_size)),
        spec.weight_paths(weights_dir),
        device=device,
        precision=precision,
        channels_last=channels_last,
    )


def model_card(spec: ModelSpec[Any], description: dict[str, Any]) -> dict[str, Any]:
    """One model as ``GET /models`` lists it: the registry's facts and what is loaded.

    ``description`` is the loaded colorizer's ``describe()``; its weight files (and the detector's
    file, for InstColorization) are listed by name and sha256.
    """
    files = list(description.get("files", []))
    detector_file = description.get("detector_file")
    if detector_file:
        files.append(detector_file)
    return {
        "name": spec.name,
        "title": spec.title,
        "paper": spec.paper,
        "model_version": description.get("model_version"),
        "input_size": description.get("input_size", spec.input_size),
        "uses_boxes": spec.uses_detector,
        "takes_hints": description.get("takes_hints", spec.takes_hints),
        "detector": description.get("detector"),
        "files": files,
        "preprocessing": spec.preprocessing,
        "decoding": spec.decoding,
        "device": description.get("device"),
        "precision": description.get("precision"),
        "max_samples": spec.max_samples,
    }
