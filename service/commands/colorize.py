"""``colorize``: colorize files and whole folders offline, in batches, with the service's engine.

Planning (inputs, output names, ``--boxes``) happens before the weights load, so a usage mistake
fails in a second. Then batches of ``--batch-size`` images go through ``Colorizer.predict``; the
following batches are decoded and prepared on a small load pool while the current one runs, and
a finish thread merges, encodes and writes the previous one (``models.offline.run_batches``; on a
CPU whose torch team has every core, the sequential schedule: ``models.offline.pipeline_plan``).
A file that cannot be decoded or colorized is reported and skipped; the others are
written. Every output is written to a temporary file in its folder and renamed into place, so an
interrupted run never leaves a half-written image.

Output naming: ``DIR/<stem>.<format>`` for a file argument; for a folder argument its sub-folders
are mirrored, ``DIR/<relative folder>/<stem>.<format>``. Where two inputs would still get the same
output (``a.jpg`` and ``a.png`` side by side, or ``x/a.jpg`` and ``y/a.jpg`` given as files), each
of them is named after its full file name instead (``a.jpg.png``, ``a.png.png``); if that is still
ambiguous the run is refused before any work (exit code 2).

Several samples (``--samples N``, a sampling model only: zhao-pixelated): every input gets N
outputs, ``<stem>.s0.<format>`` to ``<stem>.s<N-1>.<format>`` in the same place (sample 0 is what
``<stem>.<format>`` would be). Every input is drawn with the same seed, ``--seed S`` or one drawn
for the run and printed in the summary, so ``--seed S`` draws any file's samples again, alone or
among others.

Exit codes: 0 all written; 1 some inputs failed (each is listed); 2 usage or configuration error
(bad arguments, nothing to colorize, invalid ``--boxes`` file, missing or unusable weights).
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from models.constants import SEED_LIMIT
from models.image_files import IMAGE_EXTENSIONS, scan_images
from service.commands.arg_types import (
    batch_size,
    float_in_range,
    non_negative_int,
    temperature,
    temperature_help,
    unit_float,
)
from service.commands.colorize_sources import (
    MANIFEST_SUFFIX,
    add_ray_arguments,
    is_uri,
    source_argument,
)
from service.commands.model_flags import add_model_arguments, add_model_choice, model_overrides
from service.core.boxes import BoxesError, validate_boxes
from service.core.errors import InvalidParameterError
from service.core.hints import validate_hints
from service.core.jobs import (
    SAMPLES_LIMIT,
    SATURATION_RANGE,
    OutputFormat,
    temperature_refusal,
)

if TYPE_CHECKING:  # the model stack (torch) is imported only when the command runs
    from PIL import Image

    from models.boxes import Detections
    from models.hints import Hint
    from models.offline import PipelinePlan
    from models.pipeline import ColorizeOptions, Prediction, PreparedImage
    from models.zoo import ModelColorizer

log = logging.getLogger(__name__)
Entry = TypeVar("Entry")

FORMATS: tuple[OutputFormat, ...] = ("jpeg", "png", "webp")
"""``--format`` values, also the file extension. Encoded by ``service.engine.encode.encode_image``
(the HTTP API's encoder); jpeg flattens transparency onto white."""

QUALITY = 95
"""JPEG and WebP quality of the written files (the HTTP API's default is 90; there is no flag)."""

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A mistake in the arguments or the ``--boxes`` file, found before any work (exit code 2)."""


@dataclass(frozen=True)
class InputFile:
    """One input file: where it is, how it is named in reports and ``--boxes``, where it goes."""

    source: Path
    key: str  # the path relative to the folder argument (posix), or the file name
    output: Path


# -- arguments ----------------------------------------------------------------------------------


def _saturation(text: str) -> float:
    return float_in_range(text, SATURATION_RANGE)


def check_temperature_model(temperature: float | None, model: str) -> None:
    """``--temperature`` only for a model that decodes by the annealed mean (UsageError)."""
    if temperature is not None:
        refusal = temperature_refusal(model)
        if refusal is not None:
            raise UsageError(f"--temperature: {refusal}")


def _samples(text: str) -> int:
    value = int(text)
    if not 1 <= value <= SAMPLES_LIMIT:
        raise argparse.ArgumentTypeError(f"must be between 1 and {SAMPLES_LIMIT}, got {value}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**63 - 1, got {value}")
    return value


def sample_output(output: Path, index: int) -> Path:
    """Sample ``index``'s file next to ``output``: ``DIR/<stem>.png`` -> ``DIR/<stem>.s<index>.png``."""
    return output.with_name(f"{output.stem}.s{index}{output.suffix}")


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "colorize",
        help="colorize image files and folders offline",
        description="Colorize grayscale images. INPUT may be files or folders (scanned "
        "recursively for " + ", ".join(sorted(e[1:] for e in IMAGE_EXTENSIONS)) + "). "
        "Exit code 0: all written; 1: some inputs failed; 2: usage or configuration error.",
    )
    parser.add_argument(
        "inputs", nargs="+", type=source_argument, metavar="INPUT", help="image file or folder"
    )
    parser.add_argument(
        "-o",
        "--output-dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="where outputs go: DIR/<stem>.<format>, folder inputs mirror their sub-folders",
    )
    parser.add_argument(
        "--boxes",
        type=Path,
        metavar="FILE.json",
        help='JSON object: {"<file name or relative path>": {"boxes": [[x1, y1, '
        'x2, y2], ...], "scores": [...]}} in input pixels; those images skip the '
        "detector (scores optional: list order is priority)",
    )
    parser.add_argument(
        "--hints",
        type=Path,
        metavar="FILE.json",
        help='colour hints for models that take them (zhang-siggraph17): a JSON list [{"x": '
        '.., "y": .., "color": "#rrggbb" (or "ab": [a, b]), "size": 1-9}, ...] in input pixels '
        'for every input, or an object {"<file name or relative path>": [...]} per input '
        "(docs/hints.md)",
    )
    parser.add_argument(
        "--resolution",
        choices=["original", "network"],
        default="original",
        help="original: the input's size (default); network: 256x256",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="png",
        dest="image_format",
        help="output format (default png); jpeg flattens transparency on white",
    )
    parser.add_argument(
        "--max-instances",
        type=non_negative_int,
        default=8,
        metavar="K",
        help="instances colorized per image (default 8, at most the instance "
        "limit COLORIZE_INSTANCE_LIMIT); 0 = full-image colorization only",
    )
    parser.add_argument(
        "--score-threshold",
        type=unit_float,
        default=0.7,
        metavar="T",
        help="detector score threshold (default 0.7)",
    )
    parser.add_argument(
        "--saturation",
        type=_saturation,
        default=1.0,
        metavar="S",
        help="colour strength, 0 to 2: scales the predicted colours before the merge "
        "(default 1.0, the model's own; 0 grayscale, 2 twice the chroma)",
    )
    parser.add_argument("--temperature", type=temperature, metavar="T", help=temperature_help())
    parser.add_argument(
        "--samples",
        type=_samples,
        metavar="N",
        help=f"colourings per input, 1 to {SAMPLES_LIMIT}, for a model that samples "
        "(zhao-pixelated): written as <stem>.s0.<format> ... <stem>.s<N-1>.<format>",
    )
    parser.add_argument(
        "--seed",
        type=_seed,
        metavar="S",
        help="a sampling model's seed, 0 to 2**63 - 1, the same for every input (default: one "
        "drawn for the run, printed in the summary); the same seed gives the same samples",
    )
    parser.add_argument(
        "--batch-size",
        type=batch_size,
        default=None,
        metavar="B",
        help="images per network call, or auto (default): 1 on a CPU (measured fastest there), "
        "8 on a GPU, as for serve",
    )
    parser.add_argument(
        "--skip-existing",
        action="store_true",
        help="leave inputs whose output file already exists (resume a run)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_model_choice(parser)
    add_model_arguments(parser)
    add_ray_arguments(parser)
    parser.set_defaults(func=run)


# -- planning -----------------------------------------------------------------------------------


def collect_jobs(inputs: Sequence[Path], output_dir: Path, extension: str) -> list[InputFile]:
    """Expand files and folders into jobs with unique output paths (see the module docstring)."""
    out_root = output_dir.resolve()
    found: list[tuple[Path, str, Path]] = []  # source, key, output folder
    seen: set[Path] = set()
    for given in inputs:
        if given.is_dir():
            pairs = [(p, p.relative_to(given)) for p in scan_images(given, skip=out_root)]
        elif given.is_file():
            pairs = [(given, Path(given.name))]
        else:
            raise UsageError(f"{given}: no such file or folder")
        for source, relative in pairs:
            resolved = source.resolve()
            if resolved in seen:
                continue  # the same file reached twice (a file and its folder, or a link)
            seen.add(resolved)
            found.append((source, relative.as_posix(), output_dir / relative.parent))
    if not found:
        raise UsageError(
            "no images found in " + ", ".join(str(p) for p in inputs) + " (looked for "
            + ", ".join(sorted(IMAGE_EXTENSIONS)) + ")"
        )  # fmt: skip

    def name_all(stem_of: Callable[[Path], str]) -> list[Path]:
        return [folder / f"{stem_of(src)}{extension}" for src, _, folder in found]

    outputs = name_all(lambda src: src.stem)
    counts = Counter(outputs)
    full_names = name_all(lambda src: src.name)
    outputs = [
        full if counts[out] > 1 else out for out, full in zip(outputs, full_names, strict=True)
    ]
    by_output: dict[Path, list[Path]] = defaultdict(list)
    for (source, _, _), output in zip(found, outputs, strict=True):
        by_output[output].append(source)
    clashes = {out: srcs for out, srcs in by_output.items() if len(srcs) > 1}
    if clashes:
        lines = [f"  {out}: " + ", ".join(str(s) for s in srcs) for out, srcs in clashes.items()]
        raise UsageError(
            "several inputs would be written to the same output file:\n" + "\n".join(lines)
            + "\npass their common folder instead (sub-folders are mirrored) or rename them"
        )  # fmt: skip
    jobs = [InputFile(src, key, out) for (src, key, _), out in zip(found, outputs, strict=True)]
    overwriting = [job.source for job in jobs if job.output.resolve() == job.source.resolve()]
    if overwriting:
        raise UsageError(
            "the output would replace its input: " + ", ".join(map(str, overwriting))
            + "; choose another --output-dir or --format"
        )  # fmt: skip
    return jobs


def load_boxes(path: Path) -> dict[str, Detections]:
    """Read and validate a ``--boxes`` file; every problem is a ``UsageError`` naming the entry."""
    from models.boxes import Detections

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"--boxes {path}: cannot read ({exc.strerror or exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--boxes {path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise UsageError(
            f'--boxes {path}: expected a JSON object {{"<file name>": {{"boxes": [...]}}}}, '
            f"got {type(data).__name__}"
        )
    parsed: dict[str, Detections] = {}
    for name, entry in data.items():
        where = f"--boxes {path}: entry {name!r}"
        if not isinstance(entry, dict) or "boxes" not in entry:
            raise UsageError(f'{where}: expected an object with a "boxes" list')
        unknown = sorted(set(entry) - {"boxes", "scores"})
        if unknown:
            raise UsageError(f"{where}: unknown fields {unknown} (allowed: boxes, scores)")
        try:
            boxes, scores = validate_boxes(entry)
        except BoxesError as exc:
            raise UsageError(f"{where}: {exc}") from exc
        parsed[name] = Detections.from_boxes(boxes, scores)
    return parsed


HintPoints = list[dict[str, Any]]
"""Checked hints as JSON values (``service.core.hints.validate_hints``)."""


def read_hints_file(path: Path) -> HintPoints | dict[str, HintPoints]:
    """Read and check a ``--hints`` file: a list for every input, or an object of lists per input
    name; every problem is a ``UsageError`` naming the entry. JSON values, no torch (the Ray
    engine's driver sends them to its actors as they are)."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"--hints {path}: cannot read ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise UsageError(f"--hints {path}: not valid JSON ({exc})") from exc

    def checked(value: Any, where: str) -> HintPoints:
        try:
            return validate_hints(value)
        except InvalidParameterError as exc:
            raise UsageError(f"{where}: {exc.detail}") from None

    if isinstance(data, list):
        return checked(data, f"--hints {path}")
    if not isinstance(data, dict):
        raise UsageError(
            f'--hints {path}: expected a JSON list of hints or an object {{"<file name>": [...]}}'
        )
    return {name: checked(v, f"--hints {path}: entry {name!r}") for name, v in data.items()}


def to_hints(points: HintPoints) -> tuple[Hint, ...]:
    """Checked hint values as ``models.hints.Hint`` (what both engines pass to the model)."""
    from models.hints import Hint

    return tuple(Hint.from_dict(item) for item in points)


def load_hints(path: Path) -> list[Hint] | dict[str, tuple[Hint, ...]]:
    """Read a ``--hints`` file: a list for every input, or an object of lists per input name."""
    data = read_hints_file(path)
    if isinstance(data, list):
        return list(to_hints(data))
    return {name: to_hints(points) for name, points in data.items()}


def match_boxes(
    jobs: Sequence[InputFile], boxes: dict[str, Entry], flag: str = "--boxes"
) -> dict[InputFile, Entry]:
    """Attach ``--boxes`` (or ``flag``) entries to jobs: by relative path first, else by file
    name if unique."""
    by_key = {job.key: job for job in jobs}
    by_name: dict[str, list[InputFile]] = defaultdict(list)
    for job in jobs:
        by_name[job.source.name].append(job)
    matched: dict[InputFile, Entry] = {}
    unused = []
    for name, detections in boxes.items():
        if name in by_key:
            matched[by_key[name]] = detections
        elif len(by_name.get(name, [])) == 1:
            matched[by_name[name][0]] = detections
        elif by_name.get(name):
            keys = ", ".join(j.key for j in by_name[name])
            raise UsageError(f"{flag} entry {name!r} matches several inputs ({keys}); "
                             "use the path relative to the folder argument")  # fmt: skip
        else:
            unused.append(name)
    if unused:
        log.warning(f"{flag} entries that match no input (ignored): %s", ", ".join(unused))
    return matched


# -- per item: shared by the local and the Ray engine ------------------------------------------


def prepare_image(
    colorizer: ModelColorizer, source: Path | IO[bytes], options: ColorizeOptions
) -> PreparedImage:
    """Decode one file (a path or an open binary stream) and run ``Colorizer.prepare`` on it."""
    from PIL import Image

    with Image.open(source) as image:
        image.load()
        return colorizer.prepare(image, options)


def write_image(image: Image.Image, output: Path, image_format: OutputFormat) -> None:
    """Encode with the service's encoder (quality ``QUALITY``) and write atomically."""
    from models.atomic import write_bytes_atomic
    from service.engine.encode import encode_image

    data, _ = encode_image(image, image_format, QUALITY)
    write_bytes_atomic(output, data)


# -- running ------------------------------------------------------------------------------------


@dataclass
class RunSummary:
    written: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (input, reason)


def process(
    colorizer: ModelColorizer,
    jobs: Sequence[InputFile],
    options: Callable[[InputFile], ColorizeOptions],
    *,
    batch_size: int,
    image_format: OutputFormat,
    progress: bool,
    samples: int | None = None,
    plan: PipelinePlan | None = None,
) -> RunSummary:
    """Colorize ``jobs`` in batches through the offline pipeline (``models.offline``: loads read
    ahead on a small pool, merge + encode + write on a finish thread while the next batch
    predicts); never stops on a bad input.

    With ``samples`` (a sampling model), each job's samples go to ``sample_output`` files.
    ``plan``: the pipeline's sizes (default ``models.offline.default_plan``; the benchmark passes
    ``finish_queue=0`` for the sequential schedule)."""
    from tqdm import tqdm

    from models.offline import FINISH_ERRORS, describe_failure, run_batches
    from service.core.errors import InvalidParameterError

    def load(job: InputFile) -> PreparedImage:
        return prepare_image(colorizer, job.source, options(job))

    def finish(job: InputFile, prepared: PreparedImage, prediction: Prediction) -> None:
        merged = colorizer.merge(prepared, prediction)
        if samples is None:
            write_image(merged.image, job.output, image_format)
            return
        for index, image in enumerate((merged.image, *merged.samples)):
            write_image(image, sample_output(job.output, index), image_format)

    with tqdm(total=len(jobs), unit="img", file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar:  # fmt: skip
        failures = run_batches(
            colorizer, jobs, load, finish, batch_size=batch_size, progress=bar.update,
            finish_errors=(*FINISH_ERRORS, InvalidParameterError),  # a size JPEG cannot hold
            plan=plan,
        )  # fmt: skip
    return RunSummary(
        written=len(jobs) - len(failures),
        failures=[(str(job.source), describe_failure(exc)) for job, exc in failures],
    )


def _usage_error(message: str) -> int:
    sys.stderr.write(f"colorize: error: {message}\n")
    return EXIT_USAGE


def run(args: argparse.Namespace) -> int:
    if args.engine == "ray":
        from service.commands.colorize_ray import run_ray

        return run_ray(args)
    remote = [str(p) for p in args.inputs if is_uri(str(p)) or p.suffix == MANIFEST_SUFFIX]
    if remote:
        return _usage_error(f"{', '.join(remote)}: manifests and URIs need --engine ray")
    from pydantic import ValidationError

    from models.checkpoints import CheckpointError
    from models.pipeline import ColorizeOptions
    from models.registry import get_model
    from service.engine.loading import ModelSetupError, build_colorizer, check_model_names
    from service.settings import ModelSettings, auto_batch_size, describe_validation_error

    started = time.perf_counter()
    extension = f".{args.image_format}"
    try:
        jobs = collect_jobs(args.inputs, args.output_dir, extension)
        boxes = match_boxes(jobs, load_boxes(args.boxes)) if args.boxes else {}
        hints = load_hints(args.hints) if args.hints else {}
        hints_of = (
            match_boxes(jobs, hints, "--hints")
            if isinstance(hints, dict)
            else {job: tuple(hints) for job in jobs}
        )
        settings = ModelSettings(**model_overrides(args))
        check_model_names(settings)
        if len(settings.model_list()) != 1:
            raise UsageError(f"--model takes one model, got {settings.models!r}")
        if boxes and not get_model(settings.default_model).uses_detector:
            raise UsageError(
                f"--boxes: model {settings.default_model!r} does not use boxes (choose "
                "--model instcolor, or leave --boxes out)"
            )
        spec = get_model(settings.default_model)
        # instcolor takes hints when its checkpoint was trained with them: known once loaded
        if hints and not spec.takes_hints and not spec.uses_detector:
            raise UsageError(
                f"--hints: model {settings.default_model!r} takes no colour hints (choose "
                "--model zhang-siggraph17, or leave --hints out)"
            )
        check_temperature_model(args.temperature, settings.default_model)
        sampling = get_model(settings.default_model).max_samples > 1
        if not sampling and (args.samples is not None or args.seed is not None):
            flag = "--samples" if args.samples is not None else "--seed"
            raise UsageError(
                f"{flag}: model {settings.default_model!r} gives one colouring per image (choose "
                "a model that samples, --model zhao-pixelated, or leave --samples and --seed out)"
            )
        if args.samples is not None:
            clashes = {job.source.resolve() for job in jobs} & {
                sample_output(job.output, i).resolve() for job in jobs for i in range(args.samples)
            }
            if clashes:
                raise UsageError(
                    "a sample output would replace an input: "
                    + ", ".join(sorted(map(str, clashes)))
                    + "; choose another --output-dir or --format"
                )
    except UsageError as exc:
        return _usage_error(str(exc))
    except ValidationError as exc:
        return _usage_error(describe_validation_error(exc))
    except ModelSetupError as exc:
        return _usage_error(str(exc))
    if args.max_instances > settings.instance_limit:
        return _usage_error(
            f"--max-instances {args.max_instances} is above the instance limit "
            f"{settings.instance_limit} (COLORIZE_INSTANCE_LIMIT)"
        )
    seed = args.seed
    if sampling and seed is None:
        seed = secrets.randbelow(2**31)  # one seed for the run, printed: any sample can be redrawn
    written = (
        (lambda job: [job.output])
        if args.samples is None
        else (lambda job: [sample_output(job.output, i) for i in range(args.samples)])
    )
    skipped = 0
    if args.skip_existing:
        todo = [job for job in jobs if not all(path.exists() for path in written(job))]
        skipped = len(jobs) - len(todo)
        jobs = todo
    outcome = RunSummary()
    load_seconds = 0.0
    work_started = time.perf_counter()
    if jobs:
        try:
            colorizer = build_colorizer(settings)
        except (ModelSetupError, CheckpointError) as exc:
            return _usage_error(str(exc))
        if hints and not getattr(colorizer, "takes_hints", False):
            return _usage_error(
                f"--hints: model {settings.default_model!r} takes no colour hints: its loaded "
                "checkpoints were trained without them (serve one trained with `train "
                "--hint-sample-p P`, whose folder holds hints.json, or choose --model "
                "zhang-siggraph17)"
            )
        base = ColorizeOptions(
            resolution=args.resolution,
            max_instances=args.max_instances,
            score_threshold=args.score_threshold,
            saturation=args.saturation,
            samples=args.samples or 1,
            seed=seed,
            temperature=args.temperature,
        )
        per_job = {
            job: replace(base, boxes=boxes.get(job), hints=hints_of.get(job, ()))
            for job in {*boxes, *hints_of}
        }
        work_started = time.perf_counter()
        load_seconds = work_started - started
        outcome = process(
            colorizer,
            jobs,
            lambda job: per_job.get(job, base),
            batch_size=args.batch_size or auto_batch_size(colorizer.device.type),
            image_format=args.image_format,
            progress=not args.no_progress,
            samples=args.samples,
        )
    finished = time.perf_counter()
    for source, reason in outcome.failures:
        sys.stderr.write(f"failed: {source}: {reason}\n")
    work = finished - work_started
    rate = outcome.written / work if work > 0 else 0.0
    drawn = f", seed {seed}" if sampling else ""
    sys.stdout.write(
        f"{outcome.written} colorized, {len(outcome.failures)} failed, {skipped} skipped "
        f"in {finished - started:.1f} s (model load {load_seconds:.1f} s, {rate:.2f} images/s"
        f"{drawn}) -> {args.output_dir}\n"
    )
    return EXIT_FAILED if outcome.failures else EXIT_OK
