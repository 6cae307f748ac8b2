"""Detector boxes at reduced precision against fp32 on the same device and images.

A benchmark, not a test. The detector is torchvision's Mask R-CNN v1 with seeded random weights
(no file, no download), run as the pipeline runs it (``BoxDetector``, autocast at the mode's
dtype). For each mode it prints, over all images, the fp32 boxes, the mode's boxes, the mean IoU
of each fp32 box with its best match among the mode's boxes, the share matched at IoU >= 0.9 and
the non-finite box coordinates. Random weights score boxes alike, so top-k ties can swap under
rounding: the best-match IoU, not box order, is the figure.

    python loadtests/bench_detector_precision.py --device cuda --modes fp16,bf16
    python loadtests/bench_detector_precision.py --device cpu --modes bf16 --size 96 --images 1
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_iou

from models.detector import BoxDetector, build_maskrcnn
from models.precision import DTYPES


def images(count: int, size: int) -> list[Image.Image]:
    """Seeded smooth L images (blurred noise: shapes, not pixel noise), landscape and portrait."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        w, h = (size, size * 3 // 4) if i % 2 == 0 else (size * 3 // 4, size)
        small = rng.integers(0, 255, size=(max(1, h // 16), max(1, w // 16)), dtype=np.uint8)
        out.append(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modes", default="fp16,bf16", help="comma-separated: fp16, bf16")
    parser.add_argument("--size", type=int, default=800, help="detector min_size; max is 5/3 of it")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=0.05, help="score threshold")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_maskrcnn("v1")
    size = (args.size, args.size * 5 // 3)
    batch = images(args.images, args.size)
    reference = BoxDetector(copy.deepcopy(model), "v1", device, *size)
    base = reference.detect(batch, args.threshold)
    print(f"detector v1 (seeded random weights), {args.images} images, min/max size {size}, "
          f"threshold {args.threshold}, device {device}")  # fmt: skip
    print(
        "| mode vs fp32 | fp32 boxes | mode boxes | mean best IoU | share IoU >= 0.9 | non-finite |"
    )
    print("|---|---|---|---|---|---|")
    for mode in args.modes.split(","):
        detector = BoxDetector(copy.deepcopy(model), "v1", device, *size)
        detector.autocast_dtype = DTYPES[mode]  # type: ignore[index]
        found = detector.detect(batch, args.threshold)
        ious, total, nonfinite = [], 0, 0
        for ours, theirs in zip(base, found, strict=True):
            total += len(theirs.boxes)
            mine = torch.tensor(theirs.boxes, dtype=torch.float64).reshape(-1, 4)
            nonfinite += int((~torch.isfinite(mine)).sum())
            if not ours.boxes:
                continue
            ref = torch.tensor(ours.boxes, dtype=torch.float64).reshape(-1, 4)
            best = box_iou(ref, mine).max(dim=1).values if len(mine) else torch.zeros(len(ref))
            ious.append(best)
        every = torch.cat(ious) if ious else torch.zeros(0, dtype=torch.float64)
        count = sum(len(d.boxes) for d in base)
        mean = float(every.mean()) if len(every) else float("nan")
        share = float((every >= 0.9).double().mean()) if len(every) else float("nan")
        print(f"| {mode} | {count} | {total} | {mean:.4f} | {share:.3f} | {nonfinite} |")


if __name__ == "__main__":
    main()
