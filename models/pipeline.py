"""The batched colorization pipeline: prepare (CPU) -> predict (device) -> merge (CPU).

``Colorizer.colorize`` runs all three for a list of images of any sizes. A server calls the
stages separately so CPU work (decode, full-resolution merge) overlaps device work. Per batch:
one detector call for every image that needs boxes, one instance-net call on all crops of all
images, one fusion-net call on every image with boxes and one full-image-net call on the rest.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import torch
from PIL import Image

from models.boxes import (
    DEFAULT_MAX_INSTANCES,
    FUSION_SCALES,
    Detections,
    IntBox,
    box_info,
    choose_boxes,
)
from models.checkpoints import ColorizationNetworks, load_networks
from models.detector import DEFAULT_MAX_SIZE, DEFAULT_MIN_SIZE, BoxDetector, DetectorVersion
from models.fusion import build_layout
from models.hints import Hint
from models.image_input import InputImage, to_input_image
from models.merge import (
    SATURATION_RANGE,
    Resolution,
    merge_network,
    merge_original,
    scale_saturation,
)
from models.networks import FullImageGenerator, FusionGenerator, InstanceGenerator
from models.precision import DTYPES, Precision, PrecisionSetting, probe_cpu, resolve_precision
from models.preprocess import (
    crop_l,
    crop_l_on_device,
    detector_lightness,
    lightness,
    network_input,
    normalized_l,
    resize_to_network,
)

log = logging.getLogger(__name__)

PIPELINE_STAGES: tuple[str, ...] = ("preprocess", "detect", "instance", "fusion", "merge")
DEFAULT_SCORE_THRESHOLD = 0.7


class OptionsError(ValueError):
    """A colorization option is out of range; the message says which and what is allowed."""


@dataclass(frozen=True)
class ColorizeOptions:
    """Per-image options. ``boxes`` (input pixel coordinates) skip the detector for that image.

    ``saturation`` scales the predicted ab before the merge (1.0: the model's own colours).
    ``hints``: colour points (``models.hints``) for the models that take them.
    """

    resolution: Resolution = "original"
    max_instances: int = DEFAULT_MAX_INSTANCES
    score_threshold: float = DEFAULT_SCORE_THRESHOLD
    boxes: Detections | None = None
    saturation: float = 1.0
    hints: tuple[Hint, ...] = ()


@dataclass
class PreparedImage:
    """Everything the device stage needs from one image, computed on the CPU."""

    source: InputImage
    options: ColorizeOptions
    l_norm: torch.Tensor  # (1, 256, 256) normalised L of the squashed image
    lightness: torch.Tensor | None  # (1, H, W) Lab L of the original (original merge, detector)
    detector_input: Image.Image | None  # 8-bit L at the detector's size
    detector_scale: tuple[float, float]
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Prediction:
    ab: torch.Tensor  # (2, 256, 256) normalised ab, float32, CPU
    boxes: list[IntBox]
    scores: list[float]
    timings: dict[str, float]
    nonfinite: int = 0  # non-finite values in the reduced-precision ab (0 at fp32)
    fallback: bool = False  # True: ``ab`` is from the fp32 re-run of this image (``nonfinite`` > 0)


@dataclass(frozen=True)
class _Networks:
    """G, GF and GComp on the device in one dtype: the batch's networks or the fp32 fallback."""

    instance: InstanceGenerator
    full_image: FullImageGenerator
    fusion: FusionGenerator
    dtype: torch.dtype


StopCheck = Callable[[PreparedImage], bool]
"""``predict``'s per-stage check: True once an image's result is no longer wanted (a server's
deadline passed, its client left). Checked before the detector and before each network."""


@dataclass(frozen=True)
class ColorizedImage:
    image: Image.Image
    boxes: list[IntBox]
    scores: list[float]
    timings: dict[str, float]  # seconds per stage in PIPELINE_STAGES


class Colorizer:
    """G, GF and GComp (and optionally a detector) on one device, ready for batches."""

    def __init__(
        self,
        networks: ColorizationNetworks,
        detector: BoxDetector | None = None,
        device: torch.device | str = "cpu",
        precision: PrecisionSetting = "fp32",
        instance_limit: int = DEFAULT_MAX_INSTANCES,
        crop_threads: int = 4,
        channels_last: bool = True,
        precision_fallback: bool = True,
        device_crops: bool = False,
    ) -> None:
        """``device_crops``: cut, resize and convert instance crops on the device
        (``crop_l_on_device``) instead of with PIL on the crop pool; not bit-equal to PIL.
        ``precision_fallback``: at fp16/bf16 keep an fp32 copy of the networks on the device
        and re-run in fp32 any image whose reduced-precision ab has a non-finite value."""
        self.device = torch.device(device)
        # ``auto`` follows the command line's rule; an unknown value is a ValueError naming the
        # valid ones (before any thread or weight is touched).
        resolved = resolve_precision(precision, self.device)
        # Cutting and resizing crops is PIL work that releases the GIL: spread it over threads.
        self._crop_pool = ThreadPoolExecutor(max(1, crop_threads), thread_name_prefix="crops")
        self.precision: Precision = resolved
        self.dtype = DTYPES[resolved]
        self.instance_limit = instance_limit
        self.device_crops = device_crops
        self.networks = networks
        self.detector = detector
        # NHWC: what oneDNN and tensor-core convolutions prefer; at fp32 the same results as NCHW
        # to float rounding (tests/test_precision.py).
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        fmt = self.memory_format
        self._fp32: _Networks | None = None
        if resolved != "fp32" and precision_fallback:
            # copied before the cast: a copy cast back from fp16 would have lost the weights' bits
            self._fp32 = _Networks(
                copy.deepcopy(networks.instance)
                .to(self.device, torch.float32)
                .to(memory_format=fmt),
                copy.deepcopy(networks.full_image)
                .to(self.device, torch.float32)
                .to(memory_format=fmt),
                copy.deepcopy(networks.fusion).to(self.device, torch.float32).to(memory_format=fmt),
                torch.float32,
            )
        self.instance_net = networks.instance.to(self.device, self.dtype).to(memory_format=fmt)
        self.full_image_net = networks.full_image.to(self.device, self.dtype).to(memory_format=fmt)
        self.fusion_net = networks.fusion.to(self.device, self.dtype).to(memory_format=fmt)
        for generator in self.fusion_net.weight_generators():
            generator.float()  # fusion logits and softmax stay float32 (spec §7 quirk 5)
        if detector is not None:
            detector.model.to(memory_format=self.memory_format)
            # Boxes only feed crop selection: the detector runs under autocast (bf16 anywhere,
            # fp16 on CUDA) rather than with cast weights.
            mixed = resolved == "bf16" or (resolved == "fp16" and self.device.type == "cuda")
            detector.autocast_dtype = self.dtype if mixed else None
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            if resolved == "fp32":  # parity: no TF32 (spec §8)
                torch.backends.cudnn.allow_tf32 = False
                torch.backends.cuda.matmul.allow_tf32 = False

    @classmethod
    def load(
        cls,
        checkpoints: Path | str,
        detector_weights: Path | str | None = None,
        *,
        detector_version: DetectorVersion = "v1",
        detector_size: tuple[int, int] = (DEFAULT_MIN_SIZE, DEFAULT_MAX_SIZE),
        device: torch.device | str = "cpu",
        precision: PrecisionSetting = "fp32",
        instance_limit: int = DEFAULT_MAX_INSTANCES,
        channels_last: bool = True,
        precision_fallback: bool = True,
    ) -> Colorizer:
        """``precision``: fp32, fp16, bf16 or ``auto`` (the command line's rule, see
        ``models.precision.resolve_precision``); anything else is a ``ValueError``."""
        resolve_precision(precision, device)  # refuse a bad value before reading any weights
        networks = load_networks(checkpoints)
        detector = None
        if detector_weights is not None:
            detector = BoxDetector.from_file(
                detector_weights, detector_version, device, *detector_size
            )
        return cls(
            networks,
            detector,
            device,
            precision,
            instance_limit,
            channels_last=channels_last,
            precision_fallback=precision_fallback,
        )

    @property
    def version(self) -> str:
        return self.networks.version

    def describe(self) -> dict[str, Any]:
        """What is loaded, for /info and logs: file names and sha256, never filesystem paths."""
        return {
            "model_version": self.version,
            "checkpoint_layout": self.networks.layout,
            "network_width": self.networks.width,
            "files": [{"name": f.path.name, "sha256": f.sha256} for f in self.networks.files],
            "detector": None
            if self.detector is None
            else f"maskrcnn_resnet50_fpn_{self.detector.version}",
            "detector_file": None
            if self.detector is None or self.detector.file is None
            else {"name": self.detector.file.path.name, "sha256": self.detector.file.sha256},
            "device": str(self.device),
            "precision": self.precision,
            "channels_last": self.memory_format == torch.channels_last,
            "cpu": probe_cpu().describe(),
            "instance_limit": self.instance_limit,
        }

    # -- stage 1: CPU ---------------------------------------------------------------------------

    def check_options(self, options: ColorizeOptions) -> None:
        if options.hints:
            raise OptionsError(
                "model 'instcolor' takes no colour hints (its released checkpoints were trained "
                "without them); use --model zhang-siggraph17 / ?model=zhang-siggraph17"
            )
        if not 0 <= options.max_instances <= self.instance_limit:
            raise OptionsError(
                f"max_instances must be between 0 and {self.instance_limit}, got {options.max_instances}"
            )
        if not 0.0 <= options.score_threshold <= 1.0:
            raise OptionsError(
                f"score_threshold must be between 0 and 1, got {options.score_threshold}"
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

    def prepare(
        self, image: Image.Image | InputImage, options: ColorizeOptions | None = None
    ) -> PreparedImage:
        """Input policy, the 256x256 L, full-resolution L and the detector's input."""
        options = options or ColorizeOptions()
        self.check_options(options)
        start = time.perf_counter()
        source = image if isinstance(image, InputImage) else to_input_image(image)
        detect = self.detector is not None and options.boxes is None and options.max_instances > 0
        # Full-resolution L feeds the `original` merge and the detector; skip it otherwise.
        l_full = lightness(source.rgb) if detect or options.resolution == "original" else None
        detector_input, scale = None, (1.0, 1.0)
        if detect and self.detector is not None and l_full is not None:
            small, sx, sy = detector_lightness(
                l_full, self.detector.min_size, self.detector.max_size
            )
            detector_input, scale = small, (sx, sy)
        prepared = PreparedImage(
            source=source,
            options=options,
            l_norm=normalized_l(resize_to_network(source.rgb)),
            lightness=l_full,
            detector_input=detector_input,
            detector_scale=scale,
        )
        prepared.timings["preprocess"] = time.perf_counter() - start
        return prepared

    # -- stage 2: device ------------------------------------------------------------------------

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _detect(self, batch: Sequence[PreparedImage]) -> list[Detections]:
        found = [p.options.boxes or Detections((), ()) for p in batch]
        todo = [(i, p.detector_input) for i, p in enumerate(batch) if p.detector_input is not None]
        if not todo or self.detector is None:
            return found
        threshold = min(batch[i].options.score_threshold for i, _ in todo)
        results = self.detector.detect([image for _, image in todo], threshold)
        for (i, _), result in zip(todo, results, strict=True):
            sx, sy = batch[i].detector_scale
            own = batch[i].options.score_threshold
            kept = [
                ((x1 * sx, y1 * sy, x2 * sx, y2 * sy), s)
                for (x1, y1, x2, y2), s in zip(result.boxes, result.scores, strict=True)
                if s >= own
            ]
            found[i] = Detections(tuple(b for b, _ in kept), tuple(s for _, s in kept))
        return found

    def _network_input(self, l_norm: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(N, 4, 256, 256) on the device, in the networks' dtype and memory format."""
        x = network_input(l_norm.to(self.device, dtype, non_blocking=True))
        return x.contiguous(memory_format=self.memory_format)

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
        """Boxes, instance net, fusion net (or full-image net) for a batch; ab at 256x256.

        ``should_stop`` is asked about each image still in the batch before the detector and
        before each network; an image it stops is left out of every later stage and gets None.
        """
        if not batch:
            return []

        def wanted(indices: Sequence[int]) -> list[int]:
            if should_stop is None:
                return list(indices)
            return [i for i in indices if not should_stop(batch[i])]

        t0 = time.perf_counter()
        alive = wanted(range(len(batch)))
        found = self._detect([batch[i] for i in alive])
        chosen: dict[int, tuple[list[IntBox], list[float]]] = {
            i: choose_boxes(d, *batch[i].source.size, batch[i].options.max_instances)
            for i, d in zip(alive, found, strict=True)
        }
        t1 = time.perf_counter()

        nets = _Networks(self.instance_net, self.full_image_net, self.fusion_net, self.dtype)
        ab: list[torch.Tensor | None] = [None] * len(batch)
        nonfinite = [0] * len(batch)
        t2 = self._run_networks(nets, batch, chosen, ab, nonfinite, wanted)
        redo = [i for i in range(len(batch)) if nonfinite[i] and ab[i] is not None]
        if redo and self._fp32 is not None:
            # an fp16 overflow (or a bf16 NaN): this batch's affected images again in fp32, with
            # the same boxes; the others keep their reduced-precision result
            self._run_networks(self._fp32, batch, chosen, ab, [0] * len(batch), list, redo)
        t3 = time.perf_counter()

        stage = {"detect": t1 - t0, "instance": t2 - t1, "fusion": t3 - t2}
        predictions: list[Prediction | None] = []
        for i, p in enumerate(batch):
            result = ab[i]
            if result is None:
                assert should_stop is not None  # only a stopped image has no result
                predictions.append(None)
                continue
            boxes, scores = chosen[i]
            predictions.append(
                Prediction(
                    result,
                    boxes,
                    scores,
                    {**p.timings, **stage},
                    nonfinite=nonfinite[i],
                    fallback=nonfinite[i] > 0 and self._fp32 is not None,
                )
            )
        return predictions

    def _run_networks(
        self,
        nets: _Networks,
        batch: Sequence[PreparedImage],
        chosen: dict[int, tuple[list[IntBox], list[float]]],
        ab: list[torch.Tensor | None],
        nonfinite: list[int],
        wanted: Callable[[Sequence[int]], list[int]],
        only: Sequence[int] | None = None,
    ) -> float:
        """Instance net, then fusion (images with boxes) or the full-image net, writing each
        image's ab (float32, CPU) and its count of non-finite values into ``ab``/``nonfinite``.

        ``only``: the images to run (default all in ``chosen``). Returns the time the instance
        stage ended.
        """
        todo = set(chosen if only is None else only)
        with_boxes = wanted([i for i in chosen if i in todo and chosen[i][0]])
        features: dict[str, torch.Tensor] = {}
        if with_boxes and self.device_crops:
            crops = torch.cat(
                [
                    crop_l_on_device(batch[i].source.rgb, chosen[i][0], self.device)
                    for i in with_boxes
                ]
            )
        elif with_boxes:
            crops = torch.cat(
                list(
                    self._crop_pool.map(
                        lambda i: crop_l(batch[i].source.rgb, chosen[i][0]), with_boxes
                    )
                )
            )
        if with_boxes:
            _, features = nets.instance(self._network_input(crops, nets.dtype))
        self._sync()
        t2 = time.perf_counter()

        still = wanted(with_boxes)
        if still != with_boxes:  # leave the crops of stopped images out of the fusion
            kept = [i in still for i in with_boxes for _ in chosen[i][0]]
            index = torch.tensor(kept, device=self.device).nonzero().flatten()
            features = {name: value.index_select(0, index) for name, value in features.items()}
            with_boxes = still
        if with_boxes:
            infos = [
                [
                    {s: box_info(box, *batch[i].source.size, s) for s in FUSION_SCALES}
                    for box in chosen[i][0]
                ]
                for i in with_boxes
            ]
            layout = build_layout(infos, self.device)
            full = torch.stack([batch[i].l_norm for i in with_boxes])
            fused = nets.fusion(self._network_input(full, nets.dtype), features, layout)
            self._collect(fused, with_boxes, ab, nonfinite)
        del features
        without = wanted([i for i in chosen if i in todo and not chosen[i][0]])
        if without:
            full = torch.stack([batch[i].l_norm for i in without])
            plain = nets.full_image(self._network_input(full, nets.dtype))
            self._collect(plain, without, ab, nonfinite)
        self._sync()
        return t2

    def _collect(
        self,
        out: torch.Tensor,
        indices: Sequence[int],
        ab: list[torch.Tensor | None],
        nonfinite: list[int],
    ) -> None:
        """Copy a network's ab to the host; at fp16/bf16 count each image's non-finite values
        (on the device, one small extra copy)."""
        counts = None
        if out.dtype != torch.float32:
            counts = (~torch.isfinite(out)).flatten(1).sum(1).cpu().tolist()
        for k, (i, image_ab) in enumerate(zip(indices, out.float().cpu(), strict=True)):
            ab[i] = image_ab
            nonfinite[i] = 0 if counts is None else int(counts[k])

    # -- stage 3: CPU ---------------------------------------------------------------------------

    def merge(
        self,
        prepared: PreparedImage,
        prediction: Prediction,
        should_stop: Callable[[], bool] | None = None,
    ) -> ColorizedImage:
        """``should_stop``: asked between the chunks of a full-resolution merge; True raises
        ``models.merge.Stopped`` (the result is no longer wanted)."""
        start = time.perf_counter()
        alpha = prepared.source.alpha
        ab = scale_saturation(prediction.ab, prepared.options.saturation)
        if prepared.options.resolution == "network":
            image = merge_network(prepared.l_norm, ab, alpha)
        else:
            assert prepared.lightness is not None  # computed by prepare() for this resolution
            image = merge_original(prepared.lightness, ab, alpha, should_stop)
        timings = {**prediction.timings, "merge": time.perf_counter() - start}
        return ColorizedImage(image, prediction.boxes, prediction.scores, timings)

    def colorize(
        self,
        images: Sequence[Image.Image | InputImage],
        options: ColorizeOptions | Sequence[ColorizeOptions] | None = None,
    ) -> list[ColorizedImage]:
        """Colorize a batch of images of any sizes in one pass through the networks."""
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
        """Run one batch through every network (and the detector) so first requests are not slow.

        ``instances`` per image with boxes (default: the instance limit).
        """
        gradient = Image.linear_gradient("L").resize((320, 240)).convert("RGB")
        k = self.instance_limit if instances is None else instances
        boxes = Detections.from_boxes([[10 + 20 * j, 10, 100 + 20 * j, 200] for j in range(k)])
        options = [
            ColorizeOptions(resolution="network", boxes=None if i % 2 else boxes)
            for i in range(batch_size)
        ]
        if batch_size > 1:  # one image without boxes: the full-image net too
            options[-1] = ColorizeOptions(resolution="network", max_instances=0)
        self.colorize([gradient] * batch_size, options)
