"""Ground-truth photos and their instances: what is scored, under which name, at which size.

Files and folders (recursively) become ``GroundTruth`` items keyed by their path relative to the
folder argument (the file name for a file argument); each is scored as ``images/<key>.png``.
``load_pair`` applies the product's input policy (EXIF orientation, any mode to RGB), makes the
training grey input from the full-resolution photo and the target at the scored resolution.
COCO annotations (``instances_val2017.json``) give the ground-truth boxes of Table 2's protocol.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from models.grey import training_grey
from models.image_files import PHOTO_EXTENSIONS, scan_images
from models.image_input import to_input_image
from models.merge import Resolution
from models.preprocess import resize_to_network

MIN_INSTANCE_SIDE = 16
"""Instance crops narrower or shorter than this (px, in the scored image) are not scored: VGG16's
four poolings leave nothing of them for LPIPS, and SSIM needs its 7x7 window."""


class DatasetError(ValueError):
    """The inputs or the annotation file cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class GroundTruth:
    source: Path
    key: str  # the path relative to its folder argument (posix), or the file name

    @property
    def image_name(self) -> str:
        """``images/<key with extension .png>``, relative to the report folder."""
        return (Path("images") / Path(self.key).with_suffix(".png")).as_posix()


def collect_ground_truth(
    inputs: Sequence[Path], report_dir: Path | None = None, limit: int | None = None
) -> list[GroundTruth]:
    """Expand files and folders (skipping ``report_dir``); refuse two inputs with one output."""
    skip = report_dir.resolve() if report_dir is not None else None
    found: list[GroundTruth] = []
    seen: set[Path] = set()
    for given in inputs:
        if given.is_dir():
            pairs = [
                (p, p.relative_to(given).as_posix())
                for p in scan_images(given, PHOTO_EXTENSIONS, skip)
            ]
        elif given.is_file():
            pairs = [(given, given.name)]
        else:
            raise DatasetError(f"{given}: no such file or folder")
        for source, key in pairs:
            if source.resolve() not in seen:
                seen.add(source.resolve())
                found.append(GroundTruth(source, key))
    if not found:
        raise DatasetError(
            "no images found in "
            + ", ".join(map(str, inputs))
            + " (looked for "
            + ", ".join(sorted(PHOTO_EXTENSIONS))
            + ")"
        )
    by_output: dict[str, list[str]] = defaultdict(list)
    for item in found:
        by_output[item.image_name].append(str(item.source))
    clashes = [f"  {name}: {', '.join(s)}" for name, s in by_output.items() if len(s) > 1]
    if clashes:
        raise DatasetError(
            "several inputs would be scored under the same name:\n"
            + "\n".join(clashes)
            + "\npass their common folder instead (sub-folders are kept) or rename them"
        )
    return found[:limit] if limit is not None else found


@dataclass(frozen=True)
class Pair:
    """One photo ready to colorize: the grey input and the target it is compared with."""

    grey: Image.Image  # training grey of the full-resolution photo, RGB
    target: Image.Image  # the colour photo at the scored resolution, RGB
    original_size: tuple[int, int]


def load_pair(path: Path, resolution: Resolution) -> Pair:
    """Decode ``path`` and build its grey input and its target (``network``: 256x256)."""
    with Image.open(path) as image:
        image.load()
        rgb = to_input_image(image).rgb
    target = resize_to_network(rgb) if resolution == "network" else rgb
    return Pair(grey=training_grey(rgb), target=target, original_size=rgb.size)


# -- COCO instances -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    annotation_id: int
    category: str
    box: tuple[float, float, float, float]  # x, y, width, height in original pixels (COCO)


def load_coco_instances(path: Path) -> dict[str, list[Instance]]:
    """``file_name`` -> its non-crowd ground-truth instances, from a COCO annotation file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DatasetError(f"--instances {path}: cannot read ({exc.strerror or exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"--instances {path}: not valid JSON ({exc})") from exc
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise DatasetError(
            f'--instances {path}: expected a COCO object with "images" and "annotations" lists '
            "(e.g. annotations/instances_val2017.json)"
        )
    try:
        names = {int(img["id"]): str(img["file_name"]) for img in data["images"]}
        categories = {int(c["id"]): str(c["name"]) for c in data.get("categories", [])}
        found: dict[str, list[Instance]] = defaultdict(list)
        for ann in data["annotations"]:
            if ann.get("iscrowd", 0):
                continue  # crowd regions are not instances (COCO's own evaluation ignores them)
            x, y, w, h = (float(v) for v in ann["bbox"])
            category = categories.get(int(ann.get("category_id", -1)), "unknown")
            found[names[int(ann["image_id"])]].append(
                Instance(int(ann["id"]), category, (x, y, w, h))
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetError(
            f"--instances {path}: malformed entry ({type(exc).__name__}: {exc}); images need "
            "id and file_name, annotations id, image_id and bbox [x, y, width, height]"
        ) from exc
    return dict(found)


def instance_box(
    instance: Instance, original_size: tuple[int, int], scored_size: tuple[int, int]
) -> tuple[int, int, int, int] | None:
    """The instance's box in the scored image (outward-rounded, clipped), None if too small."""
    sx = scored_size[0] / original_size[0]
    sy = scored_size[1] / original_size[1]
    x, y, w, h = instance.box
    x1, y1 = max(0, math.floor(x * sx)), max(0, math.floor(y * sy))
    x2 = min(scored_size[0], math.ceil((x + w) * sx))
    y2 = min(scored_size[1], math.ceil((y + h) * sy))
    if x2 - x1 < MIN_INSTANCE_SIDE or y2 - y1 < MIN_INSTANCE_SIDE:
        return None
    return x1, y1, x2, y2
