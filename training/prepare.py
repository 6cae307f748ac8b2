"""prepare-data: folders of colour photos -> ``DATA_DIR/manifest.jsonl`` with detected boxes.

Per batch of images: decode (EXIF orientation applied, any mode to RGB, as at inference), drop
near-grey images (spec §6 filter on the 256x256 version), run the product's detector once on the
batch (on the image's L, as at inference) and append one manifest row per kept image. A re-run
skips every image already in the manifest or in ``skipped.jsonl``; a file that cannot be read is
reported and skipped (and tried again on the next run).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from models.boxes import DEFAULT_MAX_INSTANCES
from models.detector import BoxDetector
from models.image_input import to_input_image
from models.preprocess import detector_lightness, lightness
from training.data import colour_target
from training.losses import is_near_grey
from training.manifest import (
    MANIFEST_NAME,
    SKIPPED_NAME,
    ManifestRow,
    SourceFile,
    append_jsonl,
    read_manifest,
    read_skipped,
    repair_jsonl,
    row_dict,
    scan_inputs,
    split_of,
)

log = logging.getLogger(__name__)


@dataclass
class PrepareReport:
    found: int = 0
    already_done: int = 0
    added: int = 0
    near_grey: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)


@dataclass(frozen=True)
class _Decoded:
    source: SourceFile
    rgb: Image.Image


def _decode(source: SourceFile) -> Image.Image:
    with Image.open(source.file) as opened:
        return to_input_image(opened).rgb


def _detect(
    detector: BoxDetector, images: Sequence[Image.Image], threshold: float, max_boxes: int
) -> list[tuple[list[list[float]], list[float], list[int]]]:
    """Boxes in input pixels, the ``max_boxes`` best first, all at or above ``threshold``, with
    their scores and COCO classes."""
    small, scales = [], []
    for image in images:
        plane, sx, sy = detector_lightness(lightness(image), detector.min_size, detector.max_size)
        small.append(plane)
        scales.append((sx, sy))
    found = []
    for result, (sx, sy) in zip(detector.detect(small, threshold), scales, strict=True):
        classes = result.labels or (0,) * len(result.boxes)
        ranked = sorted(
            zip(result.boxes, result.scores, classes, strict=True), key=lambda p: -p[1]
        )[:max_boxes]
        found.append(
            (
                [[x1 * sx, y1 * sy, x2 * sx, y2 * sy] for (x1, y1, x2, y2), _, _ in ranked],
                [s for _, s, _ in ranked],
                [c for _, _, c in ranked],
            )
        )
    return found


def prepare_data(
    inputs: Sequence[Path],
    output: Path,
    *,
    detector: BoxDetector | None,
    val_fraction: float = 0.05,
    batch_size: int = 4,
    seed: int = 0,
    score_threshold: float = 0.7,
    max_boxes: int = DEFAULT_MAX_INSTANCES,
    progress: bool = True,
) -> PrepareReport:
    output.mkdir(parents=True, exist_ok=True)
    manifest, skipped_file = output / MANIFEST_NAME, output / SKIPPED_NAME
    repair_jsonl(manifest)
    repair_jsonl(skipped_file)
    done = {row.key for row in read_manifest(output)} if manifest.exists() else set()
    done |= {(row["root"], row["path"]) for row in read_skipped(output)}
    sources = scan_inputs(inputs)
    report = PrepareReport(found=len(sources))
    todo = [s for s in sources if s.key not in done]
    report.already_done = len(sources) - len(todo)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="image", desc="prepare-data", dynamic_ncols=True)
    for start in range(0, len(todo), batch_size):
        decoded: list[_Decoded] = []
        grey_rows = []
        for source in todo[start : start + batch_size]:
            try:
                rgb = _decode(source)
            except Exception as exc:  # any decode failure: report, keep going
                report.failed.append((source.file, f"{type(exc).__name__}: {exc}"))
                continue
            ab, _ = colour_target(rgb)
            if bool(is_near_grey(ab)):
                report.near_grey += 1
                grey_rows.append(
                    {"root": str(source.root), "path": source.relative, "reason": "near-grey"}
                )
            else:
                decoded.append(_Decoded(source, rgb))
        boxes: list[tuple[list[list[float]], list[float], list[int]]] = [
            ([], [], []) for _ in decoded
        ]
        if detector is not None and decoded:
            boxes = _detect(detector, [d.rgb for d in decoded], score_threshold, max_boxes)
        rows = [
            ManifestRow(
                root=str(d.source.root), path=d.source.relative, width=d.rgb.width,
                height=d.rgb.height, boxes=b, scores=s,
                split=split_of(d.source.relative, val_fraction, seed), labels=c,
            )
            for d, (b, s, c) in zip(decoded, boxes, strict=True)
        ]  # fmt: skip
        append_jsonl(manifest, [row_dict(r) for r in rows])
        append_jsonl(skipped_file, grey_rows)
        report.added += len(rows)
        if bar is not None:
            bar.update(len(todo[start : start + batch_size]))
    if bar is not None:
        bar.close()
    if not manifest.exists():
        manifest.touch()
    return report
