"""``fetch-weights``: download the checkpoints and detector weights, verify them, prove they load.

The work is in ``service.weights.fetch``; this module is the command line around it. Exit codes:
0 all files present and verified; 1 a download or verification failed (nothing half-written is
left); 2 usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.settings import DEFAULT_WEIGHTS_DIR

if TYPE_CHECKING:
    from service.weights.sources import FetchReport

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "fetch-weights",
        help="download and verify the model weights (needs internet)",
        description="Download the colorization checkpoints (the authors' zip from Google Drive, "
        "or OpenMMLab's single-file conversion) and torchvision's COCO Mask R-CNN into DIR, "
        "verify checksums where known, and load every file to prove it is usable. Files already "
        "present and verified are kept.",
    )
    parser.add_argument(
        "--dir",
        "--weights-dir",
        dest="dir",
        type=Path,
        default=DEFAULT_WEIGHTS_DIR,
        help=f"destination folder (default {DEFAULT_WEIGHTS_DIR}); official checkpoints go to "
        "DIR/checkpoints/coco_finetuned_mask_256_ffs/, other files to DIR/<file name>",
    )
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="NAME",
        help="the model(s) to fetch, repeatable or comma-separated: instcolor (default), "
        "zhang-eccv16, zhang-siggraph17, larsson-eccv16 (downloaded as Caffe HDF5 and converted); "
        "each into DIR/<model>/<official file>",
    )
    parser.add_argument(
        "--all-models", action="store_true", help="every model of the registry (docs/models.md)"
    )
    parser.add_argument(
        "--from",
        dest="from_path",
        type=Path,
        metavar="PATH",
        help="install a copy of a single-file model's official file brought by hand (with one "
        "--model other than instcolor): checked against its sha256 (Larsson's .h5 is converted), "
        "then loaded",
    )
    parser.add_argument(
        "--variant",
        choices=["official", "mmagic"],
        default="official",
        help="official: the authors' three files (default); mmagic: OpenMMLab's one-file copy",
    )
    parser.add_argument(
        "--detector",
        choices=["v1", "v2", "none"],
        default="v1",
        help="Mask R-CNN weights to fetch (default v1, the reference's detector); none: skip",
    )
    parser.add_argument(
        "--lpips-vgg16",
        action="store_true",
        help="also fetch torchvision's ImageNet VGG16 (528 MB, vgg16-397923af.pth), the LPIPS "
        "backbone `evaluate` needs for its LPIPS column",
    )
    parser.add_argument(
        "--base-url",
        help="download every file from this mirror by its usual name (the zip as "
        "checkpoints.zip) instead of the original hosts [COLORIZE_WEIGHTS_BASE_URL]",
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds without data before giving up"
    )
    parser.add_argument(
        "--no-verify-load",
        action="store_true",
        help="skip loading the files after download (checksums are still verified)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    parser.set_defaults(func=run)


def _settings_hint(report: FetchReport, detector: str) -> list[str]:
    """The COLORIZE_* variables to set where the files are not at the settings' defaults."""
    from service.settings import ModelSettings

    def is_default(path: Path, field: str) -> bool:
        default = ModelSettings.model_fields[field].default
        return Path(os.path.abspath(path)) == Path(os.path.abspath(default))

    hints = []
    if report.checkpoints is not None and not is_default(report.checkpoints, "checkpoints"):
        hints.append(f"COLORIZE_CHECKPOINTS={report.checkpoints}")
    if report.detector_weights is not None:
        if not is_default(report.detector_weights, "detector_weights"):
            hints.append(f"COLORIZE_DETECTOR_WEIGHTS={report.detector_weights}")
        if detector == "v2":
            hints.append("COLORIZE_DETECTOR_VERSION=v2")
    elif detector == "none":
        hints.append("COLORIZE_DETECTOR=false")
    return hints


def _chosen_models(args: argparse.Namespace) -> list[str] | str:
    """The models to fetch (default instcolor), or a usage error's message."""
    from models.registry import MODELS

    names = [n.strip() for value in args.models or [] for n in value.split(",") if n.strip()]
    if args.all_models:  # the models with published weights
        names = [name for name, spec in MODELS.items() if not spec.trained_here]
    names = names or ["instcolor"]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        return f"unknown model {unknown[0]!r}; known models: {', '.join(MODELS)}"
    trained = [n for n in names if MODELS[n].trained_here]
    if trained:
        return (
            f"{trained[0]} has no published weights: train them with "
            f"`train --model {trained[0]}` (docs/models.md)"
        )
    if args.from_path is not None:
        if names == ["instcolor"] or len(names) != 1:
            return (
                "--from installs one file of one single-file model: give one --model other than "
                "instcolor (InstColorization's files: copy them in by hand, docs/weights.md)"
            )
        if not args.from_path.is_file():
            return f"--from {args.from_path}: no such file"
    return names


def run(args: argparse.Namespace) -> int:
    from service.weights.fetch import fetch_weights
    from service.weights.sources import DownloadError, WeightSources

    if args.timeout <= 0:
        sys.stderr.write("fetch-weights: error: --timeout must be positive\n")
        return EXIT_USAGE
    models = _chosen_models(args)
    if isinstance(models, str):
        sys.stderr.write(f"fetch-weights: error: {models}\n")
        return EXIT_USAGE
    sources = WeightSources.from_environment(args.base_url)
    others = [m for m in models if m != "instcolor"]
    if others:
        from service.weights.fetch import fetch_model

        try:
            for name in others:
                for item in fetch_model(
                    name, args.dir, sources=sources, from_path=args.from_path,
                    timeout=args.timeout, progress=not args.no_progress,
                    verify=not args.no_verify_load,
                ):  # fmt: skip
                    state = "downloaded" if item.downloaded else "present   "
                    sys.stdout.write(f"{state} {item.path}  sha256 {item.sha256}\n")
        except (DownloadError, OSError) as exc:
            sys.stderr.write(f"fetch-weights: error: {exc}\n")
            return EXIT_FAILED
        if "instcolor" not in models:
            return EXIT_OK
    try:
        report = fetch_weights(
            args.dir,
            args.variant,
            args.detector,
            sources=sources,
            timeout=args.timeout,
            progress=not args.no_progress,
            verify=not args.no_verify_load,
            lpips_vgg16=args.lpips_vgg16,
        )
    except (DownloadError, OSError) as exc:  # OSError: the destination (permissions, disk full)
        sys.stderr.write(f"fetch-weights: error: {exc}\n")
        return EXIT_FAILED
    for item in report.files:
        state = "downloaded" if item.downloaded else "present   "
        sys.stdout.write(f"{state} {item.path}  sha256 {item.sha256}\n")
    hints = _settings_hint(report, args.detector)
    if hints:
        sys.stdout.write("to use them, set: " + " ".join(hints) + "\n")
    default_vgg16 = Path(os.path.abspath(DEFAULT_WEIGHTS_DIR / "vgg16-397923af.pth"))
    if (
        report.lpips_vgg16 is not None
        and Path(os.path.abspath(report.lpips_vgg16)) != default_vgg16
    ):
        sys.stdout.write(f"for evaluate's LPIPS, pass: --lpips-weights {report.lpips_vgg16}\n")
    return EXIT_OK
