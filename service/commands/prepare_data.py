"""``prepare-data``: scan colour photos, drop near-grey ones, detect boxes, write the manifest.

The work is in ``training.prepare``. Exit codes: 0 every image handled; 1 some files could not be
read (each is listed; the others are in the manifest); 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from service.commands.arg_types import fraction, positive_int

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "prepare-data",
        help="build a training manifest (boxes, splits) from folders of colour photos",
        description="Scan INPUT files and folders (recursively) for colour photos, drop near-grey "
        "ones, detect object boxes and write DATA_DIR/manifest.jsonl (one row per image). "
        "Re-running resumes: images already handled are skipped. Exit code 0: done; 1: some "
        "files could not be read (listed, skipped); 2: usage error.",
    )
    parser.add_argument(
        "inputs", nargs="+", type=Path, metavar="INPUT", help="photo file or folder"
    )
    parser.add_argument("--output", type=Path, required=True, metavar="DATA_DIR",
                        help="where manifest.jsonl and skipped.jsonl go")  # fmt: skip
    parser.add_argument("--val-fraction", type=fraction, default=0.05,
                        help="share of images held out for validation (default 0.05; "
                        "chosen by a hash of the path, stable across re-runs)")  # fmt: skip
    detector = parser.add_mutually_exclusive_group(required=True)
    detector.add_argument("--detector-weights", type=Path, metavar="FILE",
                          help="torchvision Mask R-CNN COCO weights (fetch-weights downloads them)")  # fmt: skip
    detector.add_argument("--no-detector", action="store_true",
                          help="no boxes: the manifest serves stage 1 (full) only")  # fmt: skip
    parser.add_argument("--detector-version", choices=["v1", "v2"], default="v1",
                        help="Mask R-CNN ResNet-50-FPN v1 (default) or v2")  # fmt: skip
    parser.add_argument("--score-threshold", type=float, default=0.7,
                        help="keep boxes scoring at least this (default 0.7, the reference's)")  # fmt: skip
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N"
    )
    parser.add_argument("--batch-size", type=positive_int, default=4,
                        help="images per detector call (default 4)")  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the train/val split (default 0)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from models.checkpoints import CheckpointError
    from training.distributed import resolve_device
    from training.prepare import prepare_data

    missing = [p for p in args.inputs if not p.exists()]
    if missing:
        sys.stderr.write("no such file or folder: " + ", ".join(map(str, missing)) + "\n")
        return EXIT_USAGE
    detector = None
    if args.detector_weights is not None:
        from models.detector import BoxDetector

        try:
            detector = BoxDetector.from_file(
                args.detector_weights, args.detector_version, resolve_device(args.device)
            )
        except CheckpointError as exc:
            sys.stderr.write(f"{exc}\n")
            return EXIT_USAGE
    report = prepare_data(
        args.inputs, args.output, detector=detector, val_fraction=args.val_fraction,
        batch_size=args.batch_size, seed=args.seed, score_threshold=args.score_threshold,
        progress=not args.no_progress,
    )  # fmt: skip
    sys.stderr.write(
        f"{report.found} images found: {report.added} added, {report.already_done} already done, "
        f"{report.near_grey} near-grey dropped, {len(report.failed)} unreadable\n"
    )
    for path, reason in report.failed:
        sys.stderr.write(f"  skipped {path}: {reason}\n")
    return EXIT_FAILED if report.failed else EXIT_OK
