"""Per-stage samples from the manifest: the grey image's L in, the colour image's ab as target.

The network input is the L of the training grey version of the photo (``models.grey``, spec §6),
the target the ab of the colour photo, both at 256x256 (PIL bilinear, no augmentation), crops cut
from the original-resolution images and squashed the same way as at inference (``models.preprocess``).

* ``full``: the whole image.
* ``instance``: one detected box per image, chosen at random per epoch (seeded by the run seed,
  the epoch and the image, so every process and every resumed run picks the same box; the
  training sampler passes the epoch with each index, so persistent workers see it too).
* ``fusion``: the whole image plus all its boxes (at most 8) as crops, with their ``box_info``.

Stages ``instance`` and ``fusion`` use only the images with at least one box. With
``crop_targets`` (hint training), fusion samples also carry each crop's ab (``crops_ab``), the
ground truth its random hints are taken from.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from models.boxes import (
    DEFAULT_MAX_INSTANCES,
    FUSION_SCALES,
    Detections,
    IntBox,
    box_info,
    choose_boxes,
)
from models.grey import training_grey
from models.image_input import to_input_image
from models.lab import AB_NORM, rgb_to_lab
from models.preprocess import crop_l, normalized_l, resize_to_network, to_tensor
from training.manifest import ManifestRow

Stage = Literal["full", "instance", "fusion"]
STAGE_NAMES: tuple[Stage, ...] = ("full", "instance", "fusion")


def load_photo(row: ManifestRow) -> Image.Image:
    """The manifest image as upright 8-bit RGB, checked against the size the boxes refer to."""
    with Image.open(row.file) as opened:
        rgb = to_input_image(opened).rgb
    if rgb.size != (row.width, row.height):
        raise ValueError(
            f"{row.file}: is {rgb.size[0]}x{rgb.size[1]} but the manifest says "
            f"{row.width}x{row.height}; the file changed, run prepare-data again"
        )
    return rgb


def colour_target(image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised ab (2, 256, 256) and the uint8 RGB (3, 256, 256) of the squashed colour image."""
    small = resize_to_network(image)
    rgb = torch.from_numpy(np.array(small, dtype=np.uint8, copy=True)).permute(2, 0, 1)
    return rgb_to_lab(to_tensor(small))[1:] / AB_NORM, rgb


def row_boxes(row: ManifestRow) -> list[IntBox]:
    """The manifest's boxes as the integer boxes inference cuts (clipped, at most 8)."""
    detections = Detections(tuple((b[0], b[1], b[2], b[3]) for b in row.boxes), tuple(row.scores))
    return choose_boxes(detections, row.width, row.height, DEFAULT_MAX_INSTANCES)[0]


class StageDataset(Dataset[dict[str, Any]]):
    """The samples of one stage; ``set_epoch`` before each epoch (the instance box choice)."""

    def __init__(
        self, rows: Sequence[ManifestRow], stage: Stage, seed: int = 0, crop_targets: bool = False
    ) -> None:
        self.stage = stage
        self.crop_targets = crop_targets
        self.rows = [r for r in rows if stage == "full" or row_boxes(r)]
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """``dataset[index]`` in the epoch of ``set_epoch``, or ``dataset[epoch, index]``."""
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        row = self.rows[index]
        colour = load_photo(row)
        grey = training_grey(colour)
        if self.stage == "instance":
            boxes = row_boxes(row)
            rng = random.Random(f"{self.seed}:{epoch}:{index}")  # noqa: S311 (not crypto)
            box = boxes[rng.randrange(len(boxes))]
            colour, grey = colour.crop(box), grey.crop(box)
        ab, rgb = colour_target(colour)
        sample: dict[str, Any] = {"l": normalized_l(resize_to_network(grey)), "ab": ab, "rgb": rgb}
        if self.stage == "fusion":
            boxes = row_boxes(row)
            sample["crops"] = crop_l(grey, boxes)
            if self.crop_targets:
                sample["crops_ab"] = torch.stack([colour_target(colour.crop(b))[0] for b in boxes])
            sample["box_info"] = [
                {s: box_info(box, row.width, row.height, s) for s in FUSION_SCALES} for box in boxes
            ]
        return sample


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the 256x256 tensors; crops of all images are concatenated, box_info kept per image."""
    batch: dict[str, Any] = {k: torch.stack([s[k] for s in samples]) for k in ("l", "ab", "rgb")}
    if "crops" in samples[0]:
        batch["crops"] = torch.cat([s["crops"] for s in samples])
        if "crops_ab" in samples[0]:
            batch["crops_ab"] = torch.cat([s["crops_ab"] for s in samples])
        batch["box_info"] = [s["box_info"] for s in samples]
    return batch


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }
