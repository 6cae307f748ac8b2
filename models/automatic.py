"""The batched pipeline of the zoo models (no detector, no boxes; hints for those taking them).

``AutomaticPipeline`` has the interface of ``models.pipeline.Colorizer`` (prepare -> predict ->
merge, ``check_options``, ``describe``, ``warmup``, ``version``), so the engine, the offline runner
and the commands drive any registered model the same way. It wraps a model that follows
``models.registry.AutomaticColorizer``: ``predict_ab`` from Lab L at the model's input size to Lab
ab at the same size. What is shared with InstColorization: the input policy (``to_input_image``),
the full-resolution L, the saturation control and the Lab merge at the original resolution.

Per batch: one call of the model on every image's L (stacked), in the pipeline's precision and
memory format (with the hint planes of ``models.hints`` when the batch carries hints and the
model takes them: ``takes_hints``); the output is converted to float32 normalised ab (ab / 110) on the CPU, the
``Prediction`` form the merge expects. The network's time is reported as the ``fusion`` stage (the
stage that produces ab), with ``detect`` and ``instance`` 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, overload

import torch
from PIL import Image
from torch import nn

from models.checkpoints import sha256_file
from models.constants import TEMPERATURE_RANGE
from models.hints import HintError, check_hints, hint_planes
from models.image_input import InputImage, to_input_image
from models.lab import AB_NORM, normalize_l, rgb_to_lab
from models.merge import SATURATION_RANGE, merge_network, merge_original, scale_saturation
from models.pipeline import (
    ColorizedImage,
    ColorizeOptions,
    OptionsError,
    Prediction,
    PreparedImage,
    StopCheck,
    check_no_temperature,
    check_single_sample,
)
from models.precision import DTYPES, Precision, PrecisionSetting, probe_cpu, resolve_precision
from models.preprocess import lightness, to_tensor


@dataclass
class AutomaticPreparedImage(PreparedImage):
    """A ``PreparedImage`` plus the model's own input: Lab L (0..100) at its input size."""

    network_l: torch.Tensor | None = None  # (1, S, S)
    hint_ab: torch.Tensor | None = None  # (2, S, S) Lab ab of the hints, 0 elsewhere (None: none)
    hint_mask: torch.Tensor | None = None  # (1, S, S) 1 where hinted, 0 elsewhere


@dataclass(frozen=True)
class WeightRecord:
    name: str
    sha256: str


class AutomaticPipeline:
    """One automatic model on one device, ready for batches (``Colorizer``'s interface)."""

    def __init__(
        self,
        model: nn.Module,
        name: str,
        *,
        input_size: int,
        files: Sequence[WeightRecord] = (),
        device: torch.device | str = "cpu",
        precision: PrecisionSetting = "fp32",
        channels_last: bool = True,
    ) -> None:
        self.device = torch.device(device)
        resolved = resolve_precision(precision, self.device)
        self.precision: Precision = resolved
        self.dtype = DTYPES[resolved]
        self.name = name
        self.input_size = input_size
        self.files = tuple(files)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(self.device, self.dtype).to(memory_format=self.memory_format)
        self.model.eval().requires_grad_(False)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            if resolved == "fp32":  # parity: no TF32
                torch.backends.cudnn.allow_tf32 = False
                torch.backends.cuda.matmul.allow_tf32 = False

    @classmethod
    def from_files(
        cls, model: nn.Module, name: str, input_size: int, paths: Sequence[Path], **kwargs: Any
    ) -> AutomaticPipeline:
        """The pipeline, with the name and sha256 of each weight file for ``describe``."""
        files = [WeightRecord(p.name, sha256_file(p)) for p in paths]
        return cls(model, name, input_size=input_size, files=files, **kwargs)

    @property
    def version(self) -> str:
        """The model's name and a short content hash of its weight files."""
        import hashlib

        digest = hashlib.sha256("".join(f.sha256 for f in self.files).encode()).hexdigest()
        return f"{self.name}-{digest[:12]}"

    @property
    def network_resolution(self) -> int:
        """The side of a ``resolution="network"`` result: the model's input size."""
        return self.input_size

    def describe(self) -> dict[str, Any]:
        """What is loaded, for /info, /models and logs: file names and sha256, never paths."""
        return {
            "model_version": self.version,
            "input_size": self.input_size,
            "network_resolution": self.network_resolution,
            "files": [{"name": f.name, "sha256": f.sha256} for f in self.files],
            "detector": None,
            "detector_file": None,
            "device": str(self.device),
            "precision": self.precision,
            "channels_last": self.memory_format == torch.channels_last,
            "cpu": probe_cpu().describe(),
            "instance_limit": 0,
        }

    # -- stage 1: CPU ---------------------------------------------------------------------------

    @property
    def takes_hints(self) -> bool:
        """Whether the model follows colour hints (``predict_ab(l, ab_hints, hint_mask)``)."""
        return bool(getattr(self.model, "takes_hints", False))

    def check_options(self, options: ColorizeOptions) -> None:
        """Saturation and resolution as for every model; boxes are refused (no instance path),
        hints too unless the model takes them.

        ``max_instances`` and ``score_threshold`` concern the detector and are ignored.
        """
        if options.hints and not self.takes_hints:
            raise OptionsError(
                f"model {self.name!r} takes no colour hints; leave hints out or choose a model "
                "that follows them (zhang-siggraph17)"
            )
        if options.boxes is not None and len(options.boxes.boxes) > 0:
            raise OptionsError(
                f"model {self.name!r} does not use boxes (it colorizes the whole image from L); "
                "leave boxes out or choose a model that uses them (instcolor)"
            )
        low, high = SATURATION_RANGE
        if not low <= options.saturation <= high:
            raise OptionsError(
                f"saturation must be between {low} and {high}, got {options.saturation}"
            )
        if options.resolution not in ("original", "network"):
            raise OptionsError(
                f"resolution must be 'original' or 'network', got {options.resolution!r}"
            )
        self.check_samples(options)
        self.check_temperature(options)

    @property
    def decodes_by_annealed_mean(self) -> bool:
        """Whether the model decodes by the annealed mean (``predict_ab_each``, a temperature
        per image: zhang-eccv16, li-dcnn)."""
        return bool(getattr(self.model, "decodes_by_annealed_mean", False))

    def check_temperature(self, options: ColorizeOptions) -> None:
        """``temperature``: only for a model that decodes by the annealed mean, within
        ``TEMPERATURE_RANGE``."""
        if options.temperature is None:
            return
        if not self.decodes_by_annealed_mean:
            check_no_temperature(self.name, options)
        low, high = TEMPERATURE_RANGE
        if not low <= options.temperature <= high:  # NaN fails too
            raise OptionsError(
                f"temperature must be between {low:g} and {high:g} (1: the plain mean of the bin "
                f"distribution, smaller: closer to its mode), got {options.temperature}"
            )

    def check_samples(self, options: ColorizeOptions) -> None:
        check_single_sample(self.name, options)

    def prepare(
        self, image: Image.Image | InputImage, options: ColorizeOptions | None = None
    ) -> AutomaticPreparedImage:
        """Input policy, L at the model's input size, and full-resolution L for the merge."""
        options = options or ColorizeOptions()
        self.check_options(options)
        start = time.perf_counter()
        source = image if isinstance(image, InputImage) else to_input_image(image)
        size = (self.input_size, self.input_size)
        small = source.rgb.resize(size, Image.Resampling.BILINEAR)
        network_l = rgb_to_lab(to_tensor(small))[0:1]
        hint_ab = hint_mask = None
        if options.hints:
            width, height = source.rgb.size
            try:
                check_hints(options.hints, width, height)
            except HintError as exc:
                raise OptionsError(str(exc)) from None
            hint_ab, hint_mask = hint_planes(options.hints, width, height, self.input_size)
        prepared = AutomaticPreparedImage(
            source=source,
            options=options,
            l_norm=normalize_l(network_l),
            lightness=lightness(source.rgb) if options.resolution == "original" else None,
            detector_input=None,
            detector_scale=(1.0, 1.0),
            network_l=network_l,
            hint_ab=hint_ab,
            hint_mask=hint_mask,
        )
        prepared.timings["preprocess"] = time.perf_counter() - start
        return prepared

    # -- stage 2: device ------------------------------------------------------------------------

    @overload
    def predict(
        self, batch: Sequence[PreparedImage], should_stop: None = None
    ) -> list[Prediction]: ...

    @overload
    def predict(
        self, batch: Sequence[PreparedImage], should_stop: StopCheck
    ) -> list[Prediction | None]: ...

    @torch.inference_mode()
    def predict(
        self, batch: Sequence[PreparedImage], should_stop: StopCheck | None = None
    ) -> list[Prediction] | list[Prediction | None]:
        """One model call on the images still wanted; None for an image ``should_stop`` stopped."""
        if not batch:
            return []
        alive = [i for i, p in enumerate(batch) if should_stop is None or not should_stop(p)]
        start = time.perf_counter()
        made = self._predict_images([batch[i] for i in alive]) if alive else []
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        stage = {"detect": 0.0, "instance": 0.0, "fusion": time.perf_counter() - start}
        by_index = dict(zip(alive, made, strict=True))
        predictions: list[Prediction | None] = []
        for i, p in enumerate(batch):
            prediction = by_index.get(i)
            if prediction is not None:
                prediction = replace(prediction, timings={**p.timings, **stage})
            predictions.append(prediction)
        return predictions

    def _predict_images(self, batch: Sequence[PreparedImage]) -> list[Prediction]:
        """The device stage on the images still wanted (timings are filled in by ``predict``)."""
        stacked = torch.stack([self._network_l(p) for p in batch])
        x = stacked.to(self.device, self.dtype, non_blocking=True)
        x = x.contiguous(memory_format=self.memory_format)
        hints = self._hint_batch(batch)
        temperatures = [p.options.temperature for p in batch]
        if hints is None and any(t is not None for t in temperatures):
            out = self.model.predict_ab_each(x, temperatures)  # type: ignore[operator]
        elif hints is None:
            out = self.model.predict_ab(x)  # type: ignore[operator]
        else:
            ab_hints, mask = (t.to(self.device, self.dtype, non_blocking=True) for t in hints)
            ab_hints = ab_hints.contiguous(memory_format=self.memory_format)
            mask = mask.contiguous(memory_format=self.memory_format)
            out = self.model.predict_ab(x, ab_hints, mask)  # type: ignore[operator]
        normalised = (out.float() / AB_NORM).cpu()
        return [Prediction(normalised[k], [], [], {}) for k in range(len(batch))]

    def _hint_batch(
        self, batch: Sequence[PreparedImage]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Stacked hint ab (Lab) and mask planes in the model's convention, or None if no image
        of the batch has hints (then the model's own no-hint input is used)."""
        planes = [(getattr(p, "hint_ab", None), getattr(p, "hint_mask", None)) for p in batch]
        if all(ab is None for ab, _ in planes):
            return None
        on_value, off_value = self.model.hint_mask_values  # type: ignore[misc]
        s = self.input_size
        abs_, masks = [], []
        for ab, mask in planes:
            abs_.append(ab if ab is not None else torch.zeros((2, s, s)))
            on = mask if mask is not None else torch.zeros((1, s, s))
            masks.append(torch.where(on > 0, float(on_value), float(off_value)))
        return torch.stack(abs_), torch.stack(masks)

    def _network_l(self, prepared: PreparedImage) -> torch.Tensor:
        network_l = getattr(prepared, "network_l", None)
        if network_l is None:
            raise ValueError(f"{self.name}: the image was not prepared by this model's pipeline")
        return network_l

    # -- stage 3: CPU ---------------------------------------------------------------------------

    def merge(
        self,
        prepared: PreparedImage,
        prediction: Prediction,
        should_stop: Callable[[], bool] | None = None,
    ) -> ColorizedImage:
        """The Lab merge of ``Colorizer.merge``: ab (scaled by the saturation) joined to the L of
        the model's input (``network``) or upsampled onto the original's L (``original``)."""
        start = time.perf_counter()
        alpha = prepared.source.alpha
        ab = scale_saturation(prediction.ab, prepared.options.saturation)
        if prepared.options.resolution == "network":
            image = merge_network(prepared.l_norm, ab, alpha)
        else:
            assert prepared.lightness is not None  # computed by prepare() for this resolution
            image = merge_original(prepared.lightness, ab, alpha, should_stop)
        timings = {**prediction.timings, "merge": time.perf_counter() - start}
        return ColorizedImage(image, [], [], timings)

    def colorize(
        self,
        images: Sequence[Image.Image | InputImage],
        options: ColorizeOptions | Sequence[ColorizeOptions] | None = None,
    ) -> list[ColorizedImage]:
        if options is None or isinstance(options, ColorizeOptions):
            per_image = [options or ColorizeOptions()] * len(images)
        else:
            per_image = list(options)
            if len(per_image) != len(images):
                raise OptionsError(f"{len(images)} images but {len(per_image)} options")
        prepared = [self.prepare(img, opt) for img, opt in zip(images, per_image, strict=True)]
        predictions = self.predict(prepared)
        return [self.merge(p, r) for p, r in zip(prepared, predictions, strict=True)]

    def warmup(self, batch_size: int, instances: int | None = None) -> None:
        """One batch of ``batch_size`` through the model (``instances`` is unused: no boxes)."""
        gradient = Image.linear_gradient("L").resize((320, 240)).convert("RGB")
        self.colorize([gradient] * batch_size, ColorizeOptions(resolution="network"))
