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
    Detections,
    IntBox,
    box_info_table,
    choose_boxes,
)
from models.checkpoints import ColorizationNetworks, load_networks
from models.constants import ANNEALED_MEAN_MODELS
from models.detector import DEFAULT_MAX_SIZE, DEFAULT_MIN_SIZE, BoxDetector, DetectorVersion
from models.fusion import FusionLayout, layout_from_rows
from models.hints import (
    Hint,
    HintError,
    check_hints,
    hinted_input,
    hints_in_box,
    instcolor_hint_planes,
)
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
    NETWORK_SIZE,
    crop_l,
    crop_l_on_device,
    detector_lightness,
    lightness,
    network_input,
    normalized_l,
    resize_to_network,
    rgb_uint8,
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
    samples: int = 1  # colourings to draw (only a sampling model, zhao-pixelated, takes > 1)
    seed: int | None = None  # a sampling model's seed (None: a fresh one, reported back)
    hints: tuple[Hint, ...] = ()
    # the annealed mean's temperature for the models that decode by it (zhang-eccv16, li-dcnn);
    # None: the model's own default
    temperature: float | None = None


def check_no_temperature(name: str, options: ColorizeOptions) -> None:
    """A model that does not decode by the annealed mean refuses ``temperature``."""
    if options.temperature is not None:
        raise OptionsError(
            f"model {name!r} does not decode by the annealed mean; temperature needs a model that "
            f"does ({', '.join(ANNEALED_MEAN_MODELS)}): leave temperature out or choose one of them"
        )


def check_single_sample(name: str, options: ColorizeOptions) -> None:
    """A model that does not sample refuses ``samples`` > 1 (and ignores ``seed``)."""
    if options.samples != 1:
        raise OptionsError(
            f"model {name!r} gives one colouring per image; samples={options.samples} needs a "
            "sampling model (zhao-pixelated)"
        )


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
    pixels: torch.Tensor | None = None  # (H, W, 3) uint8 RGB for device crops, made by prepare

    def rgb_uint8(self) -> torch.Tensor:
        """The source's (H, W, 3) uint8 RGB: ``pixels`` if prepare made it, else made now."""
        return self.pixels if self.pixels is not None else rgb_uint8(self.source.rgb)


@dataclass(frozen=True)
class Prediction:
    ab: torch.Tensor  # (2, 256, 256) normalised ab, float32, CPU
    boxes: list[IntBox]
    scores: list[float]
    timings: dict[str, float]
    nonfinite: int = 0  # non-finite values in the reduced-precision ab (0 at fp32)
    fallback: bool = False  # True: ``ab`` is from the fp32 re-run of this image (``nonfinite`` > 0)
    samples: tuple[torch.Tensor, ...] = ()  # a sampling model's further samples (ab is the first)
    seed: int | None = None  # the seed the samples were drawn with


@dataclass(frozen=True)
class _Networks:
    """G, GF and GComp on the device in one dtype: the batch's networks or the fp32 fallback."""

    instance: InstanceGenerator
    full_image: FullImageGenerator
    fusion: FusionGenerator
    dtype: torch.dtype


INSTANCE_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
"""Sizes the instance batch is padded to (zero crops, dropped after the instance net), so the
device sees a few shapes, each tuned once at warm-up; beyond the last, multiples of it."""


def instance_bucket(count: int, buckets: Sequence[int] = INSTANCE_BUCKETS) -> int:
    """The padded instance-batch size for ``count`` crops: the smallest bucket >= ``count``, or
    beyond the largest bucket the next multiple of it (0 stays 0)."""
    if count <= 0:
        return 0
    for size in buckets:
        if size >= count:
            return size
    largest = buckets[-1]
    return -(-count // largest) * largest


def instance_buckets_up_to(count: int, buckets: Sequence[int] = INSTANCE_BUCKETS) -> list[int]:
    """Every padded size ``instance_bucket`` returns for 1..``count`` crops (what warm-up runs)."""
    sizes = sorted({instance_bucket(n, buckets) for n in (*buckets, count) if 0 < n <= count})
    largest = buckets[-1]
    sizes += range(2 * largest, instance_bucket(count, buckets) + 1, largest)
    return sorted(set(sizes))


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with zero rows appended along the first axis up to ``rows``."""
    if x.shape[0] >= rows:
        return x
    return torch.cat((x, x.new_zeros(rows - x.shape[0], *x.shape[1:])))


class _StageClock:
    """Stage boundaries of one predict: CUDA events on a GPU (read once the final copy to the
    host has waited for them), ``perf_counter`` elsewhere (CPU work is synchronous)."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._points: list[Any] = [self._now()]

    def _now(self) -> Any:
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def mark(self) -> None:
        self._points.append(self._now())

    def seconds(self) -> list[float]:
        """Seconds between consecutive marks (call after the device work is copied back)."""
        pairs = zip(self._points, self._points[1:], strict=False)
        if self._cuda:
            return [start.elapsed_time(end) / 1000.0 for start, end in pairs]
        return [end - start for start, end in pairs]


@dataclass(frozen=True)
class _BoxLayout:
    """Every box of the images with boxes, flattened, as host tensors: built once per batch
    from the chosen boxes without per-box work beyond flattening the lists."""

    boxes: torch.Tensor  # (K, 4) long x1, y1, x2, y2
    sizes: torch.Tensor  # (K, 2) long (width, height) of each box's image
    image_index: torch.Tensor  # (K,) position of each box's image in the list given to ``of``
    slot_index: torch.Tensor  # (K,) position of the box in its image's list
    rows: torch.Tensor  # (K,) row of each box in the instance batch
    counts: tuple[int, ...]  # boxes per image

    @classmethod
    def of(cls, boxes: Sequence[Sequence[IntBox]], sizes: Sequence[tuple[int, int]]) -> _BoxLayout:
        counts = torch.tensor([len(b) for b in boxes], dtype=torch.long)
        flat = torch.tensor([box for image in boxes for box in image], dtype=torch.long)
        image_index = torch.repeat_interleave(torch.arange(len(boxes)), counts)
        starts = torch.cumsum(counts, 0) - counts
        total = flat.shape[0]
        return cls(
            boxes=flat.view(total, 4),
            sizes=torch.tensor(sizes, dtype=torch.long)[image_index],
            image_index=image_index,
            slot_index=torch.arange(total) - starts[image_index],
            rows=torch.arange(total),
            counts=tuple(len(b) for b in boxes),
        )

    def images(self, keep: Sequence[int]) -> _BoxLayout:
        """The layout of the images at positions ``keep`` (in order) only."""
        renumber = torch.full((len(self.counts),), -1, dtype=torch.long)
        renumber[list(keep)] = torch.arange(len(keep))
        mask = renumber[self.image_index] >= 0
        return _BoxLayout(
            boxes=self.boxes[mask],
            sizes=self.sizes[mask],
            image_index=renumber[self.image_index[mask]],
            slot_index=self.slot_index[mask],
            rows=self.rows[mask],
            counts=tuple(self.counts[k] for k in keep),
        )

    def fusion_layout(self, device: torch.device) -> FusionLayout:
        """The fusion layout on ``device``: ``box_info`` rows at every scale in tensor ops."""
        boxes = self.boxes.to(device, non_blocking=True)
        sizes = self.sizes.to(device, non_blocking=True)
        return layout_from_rows(
            box_info_table(boxes, sizes),
            self.image_index.to(device, non_blocking=True),
            self.slot_index.to(device, non_blocking=True),
            len(self.counts),
            max(self.counts),
        )


class _Outputs:
    """Each image's ab (and, below fp32, its count of non-finite values) gathered on the device
    in one buffer, so a batch ends with one copy to the host."""

    _AB = 2 * NETWORK_SIZE * NETWORK_SIZE

    def __init__(self, size: int, device: torch.device) -> None:
        self._buffer = torch.zeros(size, self._AB + 1, dtype=torch.float32, device=device)
        self._filled = [False] * size

    def put(self, indices: Sequence[int], out: torch.Tensor) -> None:
        flat = out.float().flatten(1)
        if out.dtype != torch.float32:
            count = (~torch.isfinite(out)).flatten(1).sum(1, keepdim=True).float()
        else:
            count = flat.new_zeros(flat.shape[0], 1)
        index = torch.tensor(indices, dtype=torch.long).to(self._buffer.device, non_blocking=True)
        self._buffer.index_copy_(0, index, torch.cat((flat, count), dim=1))
        for i in indices:
            self._filled[i] = True

    def to_host(self) -> tuple[list[torch.Tensor | None], list[int]]:
        """The one copy: each image's (2, 256, 256) float32 ab (None if never put) and count."""
        host = self._buffer.cpu()
        counts = host[:, -1].long().tolist()
        ab = [
            host[i, : self._AB].view(2, NETWORK_SIZE, NETWORK_SIZE) if filled else None
            for i, filled in enumerate(self._filled)
        ]
        return ab, [int(c) for c in counts]


StopCheck = Callable[[PreparedImage], bool]
"""``predict``'s per-stage check: True once an image's result is no longer wanted (a server's
deadline passed, its client left). Checked before the detector and before each network."""


@dataclass(frozen=True)
class ColorizedImage:
    image: Image.Image
    boxes: list[IntBox]
    scores: list[float]
    timings: dict[str, float]  # seconds per stage in PIPELINE_STAGES
    samples: tuple[Image.Image, ...] = ()  # a sampling model's further samples (image is the first)
    seed: int | None = None


def default_device_crops(device: torch.device | str) -> bool:
    """Device crops on CUDA (PIL on the host would cap the GPU); on a CPU the PIL crops, which
    are the reference's resampling (tests/test_parity.py) and cost little beside the networks."""
    return torch.device(device).type == "cuda"


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
        device_crops: bool | None = None,
    ) -> None:
        """``device_crops``: cut, resize and convert instance crops on the device in one batched
        call (``crop_l_on_device``) instead of with PIL on the crop pool; not bit-equal to PIL
        (docs/performance.md). None: on for CUDA, off elsewhere (``default_device_crops``).
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
        self._warmed: set[tuple[int, int]] = set()  # (images, crops) run by warm_shapes
        self.device_crops = (
            default_device_crops(self.device) if device_crops is None else device_crops
        )
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
        device_crops: bool | None = None,
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
            device_crops=device_crops,
        )

    @property
    def version(self) -> str:
        return self.networks.version

    @property
    def takes_hints(self) -> bool:
        """Whether the loaded networks were trained with hints (``models.checkpoints.HINTS_MARKER``)."""
        return self.networks.takes_hints

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
            "device_crops": self.device_crops,
            "takes_hints": self.takes_hints,
        }

    # -- stage 1: CPU ---------------------------------------------------------------------------

    def check_options(self, options: ColorizeOptions) -> None:
        if options.hints and not self.takes_hints:
            raise OptionsError(
                "model 'instcolor' takes no colour hints: its loaded checkpoints were trained "
                "without them (the released ones are). Use ?model=zhang-siggraph17 / --model "
                "zhang-siggraph17, or serve a checkpoint trained with `train --hint-sample-p P` "
                "(its checkpoints folder holds hints.json, docs/hints.md)"
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
        check_single_sample("instcolor", options)
        check_no_temperature("instcolor", options)

    def prepare(
        self, image: Image.Image | InputImage, options: ColorizeOptions | None = None
    ) -> PreparedImage:
        """Input policy, the 256x256 L, full-resolution L and the detector's input."""
        options = options or ColorizeOptions()
        self.check_options(options)
        start = time.perf_counter()
        source = image if isinstance(image, InputImage) else to_input_image(image)
        if options.hints:
            try:
                check_hints(options.hints, *source.size)
            except HintError as exc:
                raise OptionsError(str(exc)) from None
        detect = self.detector is not None and options.boxes is None and options.max_instances > 0
        # Full-resolution L feeds the `original` merge and the detector; skip it otherwise.
        l_full = lightness(source.rgb) if detect or options.resolution == "original" else None
        detector_input, scale = None, (1.0, 1.0)
        if detect and self.detector is not None and l_full is not None:
            small, sx, sy = detector_lightness(
                l_full, self.detector.min_size, self.detector.max_size
            )
            detector_input, scale = small, (sx, sy)
        crops = options.max_instances > 0 and (detect or bool(options.boxes))
        prepared = PreparedImage(
            source=source,
            options=options,
            l_norm=normalized_l(resize_to_network(source.rgb)),
            lightness=l_full,
            detector_input=detector_input,
            detector_scale=scale,
            pixels=self._pixels(source.rgb) if crops and self.device_crops else None,
        )
        prepared.timings["preprocess"] = time.perf_counter() - start
        return prepared

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        """The RGB device crops upload; on CUDA in pinned memory (from torch's caching host
        allocator), so the copy in ``predict`` is asynchronous. Made on the CPU pool."""
        pixels = rgb_uint8(image)
        return pixels.pin_memory() if self.device.type == "cuda" else pixels

    # -- stage 2: device ------------------------------------------------------------------------

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

    def _network_input(
        self,
        l_norm: torch.Tensor,
        dtype: torch.dtype,
        hints: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """(N, 4, 256, 256) on the device, in the networks' dtype and memory format; with
        ``hints`` (hint ab / 110 and 0/1 mask) the training's ``hinted_input``."""
        l_dev = l_norm.to(self.device, dtype, non_blocking=True)
        if hints is None:
            x = network_input(l_dev)
        else:
            ab, mask = (t.to(self.device, dtype, non_blocking=True) for t in hints)
            x = hinted_input(l_dev, ab, mask)
        return x.contiguous(memory_format=self.memory_format)

    @staticmethod
    def _full_hints(
        batch: Sequence[PreparedImage], images: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Stacked full-image hint planes of ``images`` at 256x256; None if none has hints."""
        if not any(batch[i].options.hints for i in images):
            return None
        planes = [
            instcolor_hint_planes(batch[i].options.hints, *batch[i].source.size, NETWORK_SIZE)
            for i in images
        ]
        return torch.stack([p[0] for p in planes]), torch.stack([p[1] for p in planes])

    @staticmethod
    def _crop_hints(
        batch: Sequence[PreparedImage],
        chosen: dict[int, tuple[list[IntBox], list[float]]],
        images: Sequence[int],
        rows: int,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every crop's hint planes (the hints inside its box, in the crop's coordinates), in
        the instance batch's order, padded to ``rows``; None if no image has hints."""
        if not any(batch[i].options.hints for i in images):
            return None
        planes = []
        for i in images:
            for box in chosen[i][0]:
                inside = hints_in_box(batch[i].options.hints, box)
                x1, y1, x2, y2 = box
                planes.append(instcolor_hint_planes(inside, x2 - x1, y2 - y1, NETWORK_SIZE))
        ab = pad_rows(torch.stack([p[0] for p in planes]), rows)
        mask = pad_rows(torch.stack([p[1] for p in planes]), rows)
        return ab, mask

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
        Nothing waits for the device between the detector and the one copy of every image's ab
        to the host at the end (stage times come from CUDA events on a GPU).
        """
        if not batch:
            return []

        def wanted(indices: Sequence[int]) -> list[int]:
            if should_stop is None:
                return list(indices)
            return [i for i in indices if not should_stop(batch[i])]

        clock = _StageClock(self.device)
        alive = wanted(range(len(batch)))
        found = self._detect([batch[i] for i in alive])
        chosen: dict[int, tuple[list[IntBox], list[float]]] = {
            i: choose_boxes(d, *batch[i].source.size, batch[i].options.max_instances)
            for i, d in zip(alive, found, strict=True)
        }
        clock.mark()  # detect

        nets = _Networks(self.instance_net, self.full_image_net, self.fusion_net, self.dtype)
        out = _Outputs(len(batch), self.device)
        self._run_networks(nets, batch, chosen, out, wanted, clock)
        ab, nonfinite = out.to_host()
        redo = [i for i in range(len(batch)) if nonfinite[i] and ab[i] is not None]
        detect, instance, fusion = clock.seconds()
        if redo and self._fp32 is not None:
            # an fp16 overflow (or a bf16 NaN): this batch's affected images again in fp32, with
            # the same boxes; the others keep their reduced-precision result
            start = time.perf_counter()
            again = _Outputs(len(batch), self.device)
            self._run_networks(self._fp32, batch, chosen, again, list, None, redo)
            fixed, _ = again.to_host()
            for i in redo:
                ab[i] = fixed[i]
            fusion += time.perf_counter() - start  # the fallback counts as network time

        stage = {"detect": detect, "instance": instance, "fusion": fusion}
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

    def _crops(
        self, batch: Sequence[PreparedImage], chosen: dict[int, tuple[list[IntBox], list[float]]],
        images: Sequence[int], layout: _BoxLayout,
    ) -> torch.Tensor:  # fmt: skip
        """(K, 1, 256, 256) L_norm of every box of ``images``: on the device in one batched call
        (``device_crops``) or with PIL on the crop pool (the reference's resampling)."""
        if self.device_crops:
            sources = [batch[i].rgb_uint8() for i in images]
            return crop_l_on_device(sources, layout.boxes, layout.image_index, self.device)
        parts = self._crop_pool.map(lambda i: crop_l(batch[i].source.rgb, chosen[i][0]), images)
        return torch.cat(list(parts))

    def _run_networks(
        self,
        nets: _Networks,
        batch: Sequence[PreparedImage],
        chosen: dict[int, tuple[list[IntBox], list[float]]],
        out: _Outputs,
        wanted: Callable[[Sequence[int]], list[int]],
        clock: _StageClock | None,
        only: Sequence[int] | None = None,
    ) -> None:
        """Instance net, then fusion (images with boxes) or the full-image net, writing each
        image's ab and its count of non-finite values into ``out`` (on the device).

        ``only``: the images to run (default all in ``chosen``). ``clock`` is marked when the
        instance stage ends and when the fusion stage ends.
        """
        todo = set(chosen if only is None else only)
        with_boxes = wanted([i for i in chosen if i in todo and chosen[i][0]])
        features: dict[str, torch.Tensor] = {}
        if with_boxes:
            layout = _BoxLayout.of(
                [chosen[i][0] for i in with_boxes], [batch[i].source.size for i in with_boxes]
            )
            crops = self._crops(batch, chosen, with_boxes, layout)
            # padded to its bucket; the fusion drops the padding rows (models/fusion.py)
            padded = pad_rows(crops, instance_bucket(crops.shape[0]))
            crop_hints = self._crop_hints(batch, chosen, with_boxes, padded.shape[0])
            _, features = nets.instance(self._network_input(padded, nets.dtype, crop_hints))
        if clock is not None:
            clock.mark()  # instance

        still = wanted(with_boxes)
        if still != with_boxes:  # leave the crops of stopped images out of the fusion
            keep = [k for k, i in enumerate(with_boxes) if i in still]
            layout = layout.images(keep)
            rows = layout.rows.to(self.device, non_blocking=True)
            bucket = instance_bucket(int(rows.shape[0]))
            features = {
                name: pad_rows(value.index_select(0, rows), bucket)
                for name, value in features.items()
            }
            with_boxes = still
        if with_boxes:
            fusion_layout = layout.fusion_layout(self.device)
            full = torch.stack([batch[i].l_norm for i in with_boxes])
            x = self._network_input(full, nets.dtype, self._full_hints(batch, with_boxes))
            fused = nets.fusion(x, features, fusion_layout)
            out.put(with_boxes, fused)
        del features
        without = wanted([i for i in chosen if i in todo and not chosen[i][0]])
        if without:
            full = torch.stack([batch[i].l_norm for i in without])
            x = self._network_input(full, nets.dtype, self._full_hints(batch, without))
            plain = nets.full_image(x)
            out.put(without, plain)
        if clock is not None:
            clock.mark()  # fusion

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
        if self.device.type == "cuda":  # cudnn.benchmark tunes each new shape once: all now
            self.warm_shapes(batch_size, k)

    @torch.inference_mode()
    def warm_shapes(self, max_batch: int, instances: int) -> None:
        """Run each network at every input shape a batch of up to ``max_batch`` images with up
        to ``instances`` boxes each can give it: the instance net and the fusion's weight convs
        at every instance bucket, the fusion and full-image nets at every image count, the
        detector at every canvas and image count (``BoxDetector.warm_buckets``). Shapes already
        run are skipped (``warmup`` calls this once per batch size)."""
        if self.detector is not None:
            self.detector.warm_buckets(max_batch)
        dtype = self.dtype
        runs: list[tuple[int, int]] = [(b, b) for b in range(1, max_batch + 1)]  # images, crops
        if instances > 0:
            for bucket in instance_buckets_up_to(max_batch * instances):
                runs.append((min(max_batch, -(-bucket // instances)), bucket))
        for images, crops in runs:
            if (images, crops) in self._warmed:
                continue
            self._warmed.add((images, crops))
            l_norm = torch.zeros(images, 1, NETWORK_SIZE, NETWORK_SIZE)
            full = self._network_input(l_norm, dtype)
            self.full_image_net(full)
            if instances == 0:
                continue
            per_image = [
                [(0, 0, 8, 8)] * (crops // images + (i < crops % images)) for i in range(images)
            ]
            layout = _BoxLayout.of(per_image, [(8, 8)] * images).fusion_layout(self.device)
            padded = torch.zeros(instance_bucket(crops), 1, NETWORK_SIZE, NETWORK_SIZE)
            _, features = self.instance_net(self._network_input(padded, dtype))
            self.fusion_net(full, features, layout)
