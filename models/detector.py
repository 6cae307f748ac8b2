"""Object boxes from torchvision's Mask R-CNN, run the way the reference detector runs (spec §5.1).

The detector sees the image's L channel replicated to three channels. Only boxes and scores are
used, so the mask head is removed after the weights load strictly: no mask RoI pooling, no mask
convolutions, no mask paste-back. A whole batch of differently sized images is one call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torchvision.models.detection import (
    MaskRCNN,
    MaskRCNN_ResNet50_FPN_V2_Weights,
    MaskRCNN_ResNet50_FPN_Weights,
    maskrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn_v2,
)

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
    ) -> None:
        roi_heads = model.roi_heads
        roi_heads.mask_roi_pool = None
        roi_heads.mask_head = None
        roi_heads.mask_predictor = None
        self.model = model.to(device).eval().requires_grad_(False)
        self.version = version
        self.device = device
        self.model.transform.min_size = (min_size,)
        self.model.transform.max_size = max_size
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
        detector = cls(model, version, torch.device(device), min_size, max_size)
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
        # roi_heads.score_thresh already dropped every box under the threshold. Boxes and scores
        # of every image go to the host in one copy (one synchronisation per batch).
        counts = [int(output["boxes"].shape[0]) for output in outputs]
        rows = torch.cat(
            [torch.cat((o["boxes"].float(), o["scores"].float()[:, None]), dim=1) for o in outputs]
        )
        found = rows.cpu().tolist()
        detections, start = [], 0
        for count in counts:
            part = found[start : start + count]
            start += count
            detections.append(
                Detections(tuple((r[0], r[1], r[2], r[3]) for r in part), tuple(r[4] for r in part))
            )
        return detections
