"""Object boxes from torchvision's Mask R-CNN, run the way the reference detector runs (spec §5.1).

The detector sees the image's L channel replicated to three channels. Only boxes and scores are
used, so the mask head is removed after the weights load strictly: no mask RoI pooling, no mask
convolutions, no mask paste-back. A whole batch of differently sized images is one call.

Shape buckets: torchvision pads a batch to its largest resized image (rounded up to 32), so the
convolutions' input shape changes with nearly every batch and ``cudnn.benchmark`` re-tunes each
new one. With buckets on (the default on CUDA) a batch is padded instead to the smallest of three
fixed canvases for the configured ``min_size``/``max_size`` (``detector_canvases``): landscape
(min x max), portrait (max x min) and, for a batch mixing both, square (max x max), each rounded
up to 32. Every resized image fits one: torchvision scales the shorter side to at most
``min_size`` and the longer to at most ``max_size``. Boxes stay in each image's own coordinates
(postprocessing uses the resized image sizes, not the canvas).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.models.detection import (
    MaskRCNN,
    MaskRCNN_ResNet50_FPN_V2_Weights,
    MaskRCNN_ResNet50_FPN_Weights,
    maskrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn_v2,
)
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from models.boxes import Detections
from models.checkpoints import (
    CheckpointError,
    LoadedFile,
    load_strict,
    read_state_dict,
    sha256_file,
)

DetectorVersion = Literal["v1", "v2"]
COCO_CLASSES = 91
DEFAULT_MIN_SIZE = 800  # shorter side the detector resizes to (torchvision and detectron2 default)
DEFAULT_MAX_SIZE = 1333  # cap on the longer side


@dataclass(frozen=True)
class DetectorWeights:
    """One torchvision COCO checkpoint: its file name carries the sha256 prefix torchvision checks."""

    version: DetectorVersion
    url: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def sha256_prefix(self) -> str:
        return self.filename.rsplit("-", 1)[-1].split(".")[0]


DETECTOR_WEIGHTS: dict[DetectorVersion, DetectorWeights] = {
    "v1": DetectorWeights("v1", MaskRCNN_ResNet50_FPN_Weights.COCO_V1.url),
    "v2": DetectorWeights("v2", MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1.url),
}


def detector_canvases(
    min_size: int, max_size: int, size_divisible: int = 32
) -> tuple[tuple[int, int], ...]:
    """The padded (height, width) a batch can take with shape buckets: landscape, portrait and,
    for batches mixing both, square; each side rounded up to ``size_divisible``."""
    short = math.ceil(min_size / size_divisible) * size_divisible
    long = math.ceil(max(min_size, max_size) / size_divisible) * size_divisible
    return tuple(dict.fromkeys(((short, long), (long, short), (long, long))))


def detector_canvas(
    sizes: Sequence[tuple[int, int]], min_size: int, max_size: int, size_divisible: int = 32
) -> tuple[int, int]:
    """The smallest canvas of ``detector_canvases`` that holds every resized (height, width)."""
    for height, width in detector_canvases(min_size, max_size, size_divisible):
        if all(h <= height and w <= width for h, w in sizes):
            return height, width
    raise ValueError(
        f"resized images {list(sizes)} exceed the detector's canvases for min_size {min_size}, "
        f"max_size {max_size}"
    )


class BucketedTransform(GeneralizedRCNNTransform):
    """torchvision's transform, with the batch padded to a fixed canvas (``detector_canvas``)
    instead of to its largest image; normalisation and resizing are torchvision's own."""

    def batch_images(self, images: list[torch.Tensor], size_divisible: int = 32) -> torch.Tensor:
        if torchvision._is_tracing():
            return super().batch_images(images, size_divisible)
        height, width = detector_canvas(
            [(int(img.shape[-2]), int(img.shape[-1])) for img in images],
            self.min_size[-1],
            self.max_size,
            size_divisible,
        )
        batched = images[0].new_zeros((len(images), images[0].shape[0], height, width))
        for target, img in zip(batched, images, strict=True):
            target[:, : img.shape[-2], : img.shape[-1]].copy_(img)
        return batched


def default_shape_buckets(device: torch.device) -> bool:
    """Buckets pay off where a new shape costs a tuning run (cudnn.benchmark on CUDA); on a CPU
    the larger canvas is only extra work (oneDNN tunes nothing per shape)."""
    return device.type == "cuda"


def build_maskrcnn(version: DetectorVersion) -> MaskRCNN:
    """The architecture alone: no weights are downloaded, ever."""
    builder = maskrcnn_resnet50_fpn if version == "v1" else maskrcnn_resnet50_fpn_v2
    return builder(weights=None, weights_backbone=None, num_classes=COCO_CLASSES)


class BoxDetector:
    """Mask R-CNN reduced to its box branch."""

    def __init__(
        self,
        model: MaskRCNN,
        version: DetectorVersion,
        device: torch.device,
        min_size: int = DEFAULT_MIN_SIZE,
        max_size: int = DEFAULT_MAX_SIZE,
        shape_buckets: bool | None = None,
    ) -> None:
        """``shape_buckets``: pad batches to the fixed canvases of ``detector_canvases``; None:
        on for CUDA, off elsewhere (``default_shape_buckets``)."""
        roi_heads = model.roi_heads
        roi_heads.mask_roi_pool = None
        roi_heads.mask_head = None
        roi_heads.mask_predictor = None
        self.model = model.to(device).eval().requires_grad_(False)
        self.version = version
        self.device = device
        self.model.transform.min_size = (min_size,)
        self.model.transform.max_size = max_size
        self.shape_buckets = (
            default_shape_buckets(self.device) if shape_buckets is None else shape_buckets
        )
        if self.shape_buckets:  # eval(): a transform in training mode would not map boxes back
            stock = self.model.transform
            self.model.transform = BucketedTransform(
                min_size, max_size, stock.image_mean, stock.image_std, stock.size_divisible
            ).eval()
        self._warmed: set[tuple[int, ...]] = (
            set()
        )  # (canvas height, width, images) run by warm_buckets
        self.min_size = min_size
        self.max_size = max_size
        self.file: LoadedFile | None = None  # where the weights came from (set by from_file)
        # Mixed precision for the detector on CUDA (set by the pipeline in fp16 mode): boxes only
        # feed crop selection, so half-precision convolutions cost nothing that matters.
        self.autocast_dtype: torch.dtype | None = None

    @classmethod
    def from_file(
        cls,
        path: Path | str,
        version: DetectorVersion = "v1",
        device: torch.device | str = "cpu",
        min_size: int = DEFAULT_MIN_SIZE,
        max_size: int = DEFAULT_MAX_SIZE,
        shape_buckets: bool | None = None,
    ) -> BoxDetector:
        """Load COCO weights from a local file, strictly; ``min_size``/``max_size`` set its input size."""
        path = Path(path)
        model = build_maskrcnn(version)
        state = read_state_dict(path)
        try:
            load_strict(model, state, f"{path} (Mask R-CNN {version})")
        except CheckpointError as exc:
            other = "v2" if version == "v1" else "v1"
            raise CheckpointError(
                f"{exc}. Is this the {other} detector? (--detector-version)"
            ) from exc
        detector = cls(model, version, torch.device(device), min_size, max_size, shape_buckets)
        detector.file = LoadedFile(path, sha256_file(path))
        return detector

    @torch.inference_mode()
    def detect(self, images: Sequence[Image.Image], score_threshold: float) -> list[Detections]:
        """Boxes at or above ``score_threshold`` for each 8-bit L image, highest score first."""
        if not images:
            return []
        heads = self.model.roi_heads
        heads.score_thresh = score_threshold
        batch = []
        for image in images:
            plane = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
            batch.append(plane.to(self.device).float().div(255).expand(3, -1, -1))
        with torch.autocast(
            self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        ):
            outputs = self.model(batch)
        # roi_heads.score_thresh already dropped every box under the threshold. Boxes, scores and
        # classes of every image go to the host in one copy (one synchronisation per batch); the
        # class ids (< 100) are exact in float32.
        counts = [int(output["boxes"].shape[0]) for output in outputs]
        rows = torch.cat(
            [
                torch.cat(
                    (
                        o["boxes"].float(),
                        o["scores"].float()[:, None],
                        o["labels"].float()[:, None],
                    ),
                    dim=1,
                )
                for o in outputs
            ]
        )
        found = rows.cpu().tolist()
        detections, start = [], 0
        for count in counts:
            part = found[start : start + count]
            start += count
            detections.append(
                Detections(
                    tuple((r[0], r[1], r[2], r[3]) for r in part),
                    tuple(r[4] for r in part),
                    tuple(int(r[5]) for r in part),
                )
            )
        return detections

    def warm_buckets(self, max_batch: int) -> list[tuple[int, int, int]]:
        """Run the detector at every canvas and every image count up to ``max_batch`` (the
        square canvas from 2 images: it needs a landscape and a portrait image), so cudnn tunes
        each shape before a request needs it. Returns the (height, width, images) run now;
        shapes already run are skipped. Nothing to do without shape buckets."""
        if not self.shape_buckets:
            return []
        landscape = Image.new("L", (self.max_size, self.min_size), 128)  # PIL sizes are (w, h)
        portrait = Image.new("L", (self.min_size, self.max_size), 128)
        # each resizes to itself (scale 1); their batches take the three canvases
        patterns = ([landscape], [portrait], [landscape, portrait])
        ran = []
        for pattern in patterns:
            sizes = [(image.height, image.width) for image in pattern]
            height, width = detector_canvas(sizes, self.min_size, self.max_size)
            for count in range(len(pattern), max_batch + 1):
                key = (height, width, count)
                if key in self._warmed:
                    continue
                self._warmed.add(key)
                images = [pattern[i % len(pattern)] for i in range(count)]
                self.detect(images, score_threshold=1.0)
                ran.append(key)
        return ran
