"""``evaluate``: colorize held-out colour photos from their grey version and score the results.

The work is in the ``evaluation`` package; this module is the command line around it: planning
(inputs, ``--compare`` configurations, annotation file) happens before any weights load, so a
usage mistake fails in a second. Exit codes: 0 every image scored; 1 some images failed (each is
listed, the others are scored); 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from service.commands.arg_types import (
    batch_size,
    hint_counts,
    non_negative_int,
    positive_int,
    temperature,
    temperature_help,
    unit_float,
)
from service.commands.model_flags import add_model_arguments, add_model_choice, model_overrides
from service.settings import DEFAULT_WEIGHTS_DIR, auto_batch_size

if TYPE_CHECKING:
    from evaluation.metrics import LpipsMetric
    from evaluation.run import EvaluationRun

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
LPIPS_VGG16_FILENAME = "vgg16-397923af.pth"  # evaluation.metrics.VGG16_FILENAME (checked by a test)
DEFAULT_LPIPS_WEIGHTS = DEFAULT_WEIGHTS_DIR / LPIPS_VGG16_FILENAME
FID_INCEPTION_FILENAME = "pt_inception-2015-12-05-6726825d.pth"  # evaluation.fid.FID_FILENAME
DEFAULT_FID_WEIGHTS = DEFAULT_WEIGHTS_DIR / FID_INCEPTION_FILENAME
CONFIG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RESERVED_NAMES = frozenset({"images", "report_files"})
MAX_SEED = 2**32 - 1


def hint_seed_value(text: str) -> int:
    value = non_negative_int(text)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_SEED}, got {value}")
    return value


class UsageError(Exception):
    """A mistake in the arguments, found before any work (exit code 2)."""


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags a ``--compare`` configuration may change, besides the model flags.

    ``--batch-size`` is one of them so that one command can hold a large model (Larsson ECCV16:
    about 0.8 GB of hypercolumn per image at its 512 px) at batch size 1 beside the others."""
    parser.add_argument("--batch-size", type=batch_size, default=None, metavar="B",
                        help="images per network call, or auto (default): 1 on a CPU, 8 on a "
                        "GPU, as for colorize and serve")  # fmt: skip
    parser.add_argument(
        "--resolution",
        choices=["network", "original"],
        default="network",
        help="network: 256x256, the paper's protocol (default); original: the photo's size",
    )
    parser.add_argument("--max-instances", type=non_negative_int, default=8, metavar="K",
                        help="instances colorized per image (default 8); 0: full-image network only")  # fmt: skip
    parser.add_argument("--score-threshold", type=unit_float, default=0.7, metavar="T",
                        help="detector score threshold (default 0.7)")  # fmt: skip
    parser.add_argument("--hints", type=hint_counts, default=(0,), metavar="N[,N...]",
                        help="N colour hints per photo sampled from its ground truth (the "
                        "SIGGRAPH17 protocol; a model that takes hints, e.g. zhang-siggraph17); "
                        "a list such as 0,1,2,5,10 runs every count on the same photos and "
                        "writes quality against the number of hints to REPORT_DIR/hints.html, "
                        ".md and .json (one report per count in REPORT_DIR/hints-N/) "
                        "(default 0: automatic)")  # fmt: skip
    parser.add_argument("--seed", type=hint_seed_value, default=0, metavar="S",
                        help="seed of the hint sampling (and of a sampling model's draw): the "
                        "same seed reveals the same points (default 0)")  # fmt: skip
    parser.add_argument("--temperature", type=temperature, metavar="T",
                        help=temperature_help() + "; compare with --compare release='--model "
                        "zhang-eccv16' paper='--model zhang-eccv16 --temperature 0.38'")  # fmt: skip
    add_model_choice(parser)
    add_model_arguments(parser)


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "evaluate",
        help="score colorization quality on colour photos (LPIPS, PSNR, SSIM, colorfulness)",
        description="Make each colour photo grey the way training does, colorize it with the "
        "chosen weights and settings, and compare with the original: PSNR, SSIM, LPIPS v0.1 "
        "(VGG) and colorfulness per image and, with --instances, per ground-truth instance. "
        "Writes REPORT_DIR/images/, metrics.csv, summary.json and report.html. Exit code 0: all "
        "scored; 1: some images failed; 2: usage or configuration error.",
    )
    parser.add_argument("inputs", nargs="+", type=Path, metavar="GROUND_TRUTH",
                        help="colour photo or folder of photos (scanned recursively)")  # fmt: skip
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="REPORT_DIR",
                        help="report folder (created; files in it are replaced)")  # fmt: skip
    parser.add_argument("--instances", type=Path, metavar="COCO_ANNOTATIONS.json",
                        help="COCO annotations (e.g. instances_val2017.json): also score each "
                        "ground-truth instance crop (Table 2's protocol); matched by file name")  # fmt: skip
    parser.add_argument("--lpips-weights", type=Path, metavar="FILE",
                        help="torchvision VGG16 file for LPIPS (default "
                        f"<weights dir>/{LPIPS_VGG16_FILENAME} if it exists, else no LPIPS)")  # fmt: skip
    parser.add_argument(
        "--fid-weights",
        type=Path,
        metavar="FILE",
        help="pytorch-fid's Inception file: also FID of the whole set (default "
        f"<weights dir>/{FID_INCEPTION_FILENAME} if it exists, else no FID)",
    )
    parser.add_argument(
        "--fid-dims",
        type=int,
        choices=[64, 192, 768, 2048],
        default=2048,
        help="Inception features for FID (default 2048, the standard; pytorch-fid "
        "advises fewer for sets of fewer than 2048 images)",
    )
    parser.add_argument("--limit", type=positive_int, metavar="N",
                        help="score only the first N photos (in sorted order)")  # fmt: skip
    parser.add_argument("--compare", nargs="+", metavar="NAME=FLAGS",
                        help="run several configurations on the same images, e.g. "
                        "'base=' nodet=--no-detector 'zhang=--model zhang-siggraph17'; FLAGS are "
                        "--model, model flags, --resolution, --batch-size, --max-instances, "
                        "--score-threshold, --hints N (one count) or --seed added to "
                        "those given outside --compare; reports go to REPORT_DIR/NAME/ and the "
                        "side-by-side table (differences to the first) to "
                        "REPORT_DIR/comparison.html")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_run_arguments(parser)
    parser.set_defaults(func=run)


class _FlagsParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


@dataclass(frozen=True)
class Configuration:
    name: str
    flags: str
    args: argparse.Namespace


def parse_compare(base: argparse.Namespace, entries: list[str]) -> list[Configuration]:
    """``NAME=FLAGS`` entries -> configurations; FLAGS override the base command's flags."""
    configurations: list[Configuration] = []
    for entry in entries:
        name, sep, flags = entry.partition("=")
        if not sep:
            raise UsageError(f"--compare {entry!r}: expected NAME=FLAGS (FLAGS may be empty)")
        if not CONFIG_NAME.match(name) or name in RESERVED_NAMES:
            raise UsageError(
                f"--compare {entry!r}: NAME must be letters, digits, '_', '.' or '-' (not "
                f"{', '.join(sorted(RESERVED_NAMES))}); it names the folder REPORT_DIR/NAME/"
            )
        if any(c.name == name for c in configurations):
            raise UsageError(f"--compare: the name {name!r} is used twice")
        parser = _FlagsParser(prog=f"--compare {name}", add_help=False)
        add_run_arguments(parser)
        namespace = copy.copy(base)
        try:
            tokens = shlex.split(flags)
        except ValueError as exc:
            raise UsageError(f"--compare {entry!r}: {exc}") from exc
        parser.parse_args(tokens, namespace=namespace)
        if len(namespace.hints) > 1:
            raise UsageError(
                f"--compare {entry!r}: one --hints count per configuration (a list of counts "
                "is a sweep of its own: run it without --compare)"
            )
        if namespace.detector_weights != base.detector_weights:
            namespace.no_detector = False  # --detector-weights in FLAGS turns the detector on
        configurations.append(Configuration(name, flags, namespace))
    return configurations


def _config(
    args: argparse.Namespace,
    lpips_weights: Path | None,
    fid_weights: Path | None,
    flags: str | None,
    hints: int | list[int],
) -> dict[str, Any]:
    described: dict[str, Any] = {
        "model": args.models or "instcolor",
        "resolution": args.resolution,
        "max_instances": args.max_instances,
        "score_threshold": args.score_threshold,
        "hints": hints,
        "seed": args.seed,
        "temperature": args.temperature,  # None: the model's default
        "batch_size": args.batch_size or "auto",
        "model_flags": {k: str(v) for k, v in model_overrides(args).items()},
        "lpips_weights": None if lpips_weights is None else str(lpips_weights),
        "fid_weights": None if fid_weights is None else str(fid_weights),
        "fid_dims": args.fid_dims if fid_weights is not None else None,
        "instances": None if args.instances is None else str(args.instances),
        "limit": args.limit,
        "grey_input": "skimage rgb2gray x255 rounded, 3 channels (spec §6)",
    }
    if flags is not None:
        described["compare_flags"] = flags
    return described


def _usage_error(message: str) -> int:
    sys.stderr.write(f"evaluate: error: {message}\n")
    return EXIT_USAGE


def _summary_line(name: str, run: EvaluationRun, summary: dict[str, Any], page: Path) -> str:
    parts = []
    for metric in ("psnr", "ssim", "lpips"):
        stats = summary["metrics"][metric]
        if stats["count"]:
            parts.append(f"{metric.upper()} {stats['mean']:.4f}")
    if summary["fid"] is not None and summary["fid"]["value"] is not None:
        parts.append(f"FID {summary['fid']['value']:.3f}")
    infinite = summary["metrics"]["psnr"]["infinite"]
    if infinite:
        parts.append(f"{infinite} identical (PSNR inf, left out)")
    return (
        f"{name}: {len(run.scores)} scored, {len(run.failures)} failed, "
        f"{run.images_per_second:.2f} images/s; " + ", ".join(parts) + f" -> {page}\n"
    )


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from evaluation.dataset import DatasetError, collect_ground_truth, load_coco_instances
    from evaluation.fid import FidError
    from evaluation.metrics import LpipsError
    from models.checkpoints import CheckpointError
    from models.registry import get_model
    from service.core.jobs import temperature_refusal
    from service.engine.loading import ModelSetupError, check_model_names
    from service.settings import ModelSettings, describe_validation_error

    started = time.perf_counter()
    try:
        items = collect_ground_truth(args.inputs, args.output, args.limit)
        if args.compare and len(args.hints) > 1:
            raise UsageError(
                f"--hints {','.join(map(str, args.hints))} (several counts) writes its own "
                "table (REPORT_DIR/hints.html) and cannot be combined with --compare: give "
                "each configuration one count (--compare h0='--hints 0' h5='--hints 5'), or run "
                "one sweep per model"
            )
        if args.compare:
            configurations = parse_compare(args, args.compare)
        else:
            configurations = [Configuration("", "", args)]
        settings = [ModelSettings(**model_overrides(c.args)) for c in configurations]
        instances = load_coco_instances(args.instances) if args.instances else None
    except (UsageError, DatasetError) as exc:
        return _usage_error(str(exc))
    except ValidationError as exc:
        return _usage_error(describe_validation_error(exc))
    for config, chosen in zip(configurations, settings, strict=True):
        try:
            check_model_names(chosen)
        except ModelSetupError as exc:
            return _usage_error(f"{config.name or 'evaluate'}: {exc}")
        if len(chosen.model_list()) != 1:
            return _usage_error(f"--model takes one model, got {chosen.models!r}")
        spec = get_model(chosen.default_model)
        # instcolor takes hints when its checkpoint was trained with them: checked once loaded
        if any(config.args.hints) and not spec.takes_hints and not spec.uses_detector:
            return _usage_error(
                f"{config.name or 'evaluate'}: --hints: model {chosen.default_model!r} takes no "
                "colour hints (choose --model zhang-siggraph17, or an instcolor checkpoint "
                "trained with `train --hint-sample-p P`)"
            )
        if config.args.temperature is not None:
            refusal = temperature_refusal(chosen.default_model)
            if refusal is not None:
                return _usage_error(f"{config.name or 'evaluate'}: --temperature: {refusal}")
        if config.args.max_instances > chosen.instance_limit:
            return _usage_error(
                f"--max-instances {config.args.max_instances} is above the instance limit "
                f"{chosen.instance_limit} (COLORIZE_INSTANCE_LIMIT)"
            )
    weights_dir = settings[0].weights_dir  # the metrics' networks default under it too
    default_lpips = weights_dir / LPIPS_VGG16_FILENAME
    default_fid = weights_dir / FID_INCEPTION_FILENAME
    lpips_weights = args.lpips_weights
    if lpips_weights is None and default_lpips.is_file():
        lpips_weights = default_lpips
    if lpips_weights is None:
        sys.stderr.write(
            f"evaluate: no LPIPS ({default_lpips} not found): fetch it with "
            "`python -m service fetch-weights --lpips-vgg16`, or pass --lpips-weights FILE\n"
        )
    fid_weights = args.fid_weights
    if fid_weights is None and default_fid.is_file():
        fid_weights = default_fid
    if instances is not None:
        annotated = sum(1 for item in items if item.source.name in instances)
        log.info("%d of %d photos have annotated instances", annotated, len(items))
    try:
        runs = _evaluate_all(
            args, configurations, settings, items, instances, lpips_weights, fid_weights
        )
    except (CheckpointError, LpipsError, FidError, ModelSetupError) as exc:
        return _usage_error(str(exc))
    failed = False
    for name, result, _ in runs:
        for source, reason in result.failures:
            sys.stderr.write(f"failed{f' ({name})' if name else ''}: {source}: {reason}\n")
        failed = failed or bool(result.failures)
    if args.compare:
        from evaluation.compare import build_comparison, write_comparison

        comparison = build_comparison(
            [(name, result) for name, result, _ in runs], {c.name: c.flags for c in configurations}
        )
        page = write_comparison(args.output, comparison)
        sys.stdout.write(f"comparison of {len(runs)} configurations -> {page}\n")
    elif len(args.hints) > 1:
        from evaluation.hint_sweep import build_hint_sweep, write_hint_sweep

        first = runs[0][2]
        sweep = build_hint_sweep(
            [(summary["config"]["hints"], result) for _, result, summary in runs],
            args.seed,
            _config(args, lpips_weights, fid_weights, None, list(args.hints)),
            first["model"],
            first["machine"],
        )
        page = write_hint_sweep(args.output, sweep)
        sys.stdout.write(f"quality against {len(runs)} hint counts -> {page}\n")
    sys.stdout.write(f"done in {time.perf_counter() - started:.1f} s\n")
    return EXIT_FAILED if failed else EXIT_OK


def _evaluate_all(
    args: argparse.Namespace,
    configurations: list[Configuration],
    settings: list[Any],
    items: list[Any],
    instances: dict[str, Any] | None,
    lpips_weights: Path | None,
    fid_weights: Path | None,
) -> list[tuple[str, EvaluationRun, dict[str, Any]]]:
    """Each configuration in turn: load its colorizer, run (once per hint count), write each
    run's report, free it. Returns each run's name, result and summary."""
    import torch

    from evaluation.fid import FidFeatures
    from evaluation.hint_sweep import count_dir
    from evaluation.metrics import LpipsMetric
    from evaluation.report import write_report
    from evaluation.run import Evaluator, machine_description
    from models.pipeline import ColorizeOptions
    from models.preprocess import NETWORK_SIZE
    from service.engine.loading import ModelSetupError, build_colorizer

    runs: list[tuple[str, EvaluationRun, dict[str, Any]]] = []
    lpips: LpipsMetric | None = None
    fid: FidFeatures | None = None
    for config, chosen in zip(configurations, settings, strict=True):
        config_dir = args.output / config.name if config.name else args.output
        colorizer = build_colorizer(chosen)
        if any(config.args.hints) and not getattr(colorizer, "takes_hints", False):
            raise ModelSetupError(
                f"{config.name or 'evaluate'}: --hints: model {chosen.default_model!r} takes no "
                "colour hints: its loaded checkpoints were trained without them (evaluate one "
                "trained with `train --hint-sample-p P`, whose folder holds hints.json)"
            )
        described = colorizer.describe()
        input_size = described.get("network_resolution", described.get("input_size", NETWORK_SIZE))
        if config.args.resolution == "network" and input_size != NETWORK_SIZE:
            raise ModelSetupError(
                f"{config.name or 'evaluate'}: --resolution network scores at {NETWORK_SIZE} px "
                f"(the paper's protocol) but {chosen.default_model} takes {input_size} px here "
                "(COLORIZE_LARSSON_SIZE other than 512?); use --resolution original, or the "
                "model's default size"
            )
        if lpips is None and lpips_weights is not None:
            lpips = LpipsMetric.from_vgg16_file(lpips_weights, str(colorizer.device))
        if fid is None and fid_weights is not None:
            fid = FidFeatures.from_inception_file(fid_weights, str(colorizer.device), args.fid_dims)
        options = ColorizeOptions(
            resolution=config.args.resolution,
            max_instances=config.args.max_instances,
            score_threshold=config.args.score_threshold,
            seed=config.args.seed,  # a sampling model (zhao-pixelated) draws the same sample
            temperature=config.args.temperature,
        )
        sweep = len(config.args.hints) > 1
        for count in config.args.hints:
            name = count_dir(count) if sweep else config.name
            report_dir = config_dir / name if sweep else config_dir
            evaluator = Evaluator(colorizer, options, lpips, instances, fid, count,
                                  config.args.seed)  # fmt: skip
            result = evaluator.run(
                items,
                report_dir,
                batch_size=config.args.batch_size or auto_batch_size(colorizer.device.type),
                progress=not args.no_progress,
            )
            flags = config.flags if config.name else None
            summary = write_report(
                report_dir,
                result,
                _config(config.args, lpips_weights, fid_weights, flags, count),
                colorizer.describe(),
                machine_description(colorizer.device),
                config.args.resolution,
            )
            sys.stdout.write(_summary_line(name or "evaluate", result, summary,
                                           report_dir / "report.html"))  # fmt: skip
            runs.append((name, result, summary))
            del evaluator
        del colorizer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return runs
