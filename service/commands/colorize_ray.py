"""``colorize --engine ray``: the local engine's per-item work as a Ray Data pipeline.

Three stages, each a ``map_batches`` with a callable class (so the model is built once per actor,
never per batch):

1. ``PrepareStage`` (CPU actors): read the file (a local path or a URI, through pyarrow's
   filesystems), decode it and run ``prepare`` (``colorize.prepare_image``, as the local engine);
2. ``PredictStage`` (the colorizer actor pool, ``num_gpus`` per actor; 0 on a CPU-only cluster):
   ``predict`` on each chunk, one image per call where the chunk's call fails
   (``models.offline.predict_ready``, as the local engine);
3. ``FinishStage`` (CPU actors): ``merge`` and ``colorize.write_image`` (the same encoder, quality
   and atomic write as the local engine).

The stages only call ``prepare``, ``predict`` and ``merge`` of the object ``build(device)``
returns: any pipeline with that interface runs here without Ray-specific model code. ``build`` is
pickled to the actors; CPU stages call ``build("cpu")``, the colorizer actors ``build(None)`` (the
settings' device: ``auto`` takes the GPU Ray assigned to the actor).

Fault tolerance is Ray Data's: actors are restarted and their tasks retried (``max_restarts`` and
``max_task_retries`` are -1 for actor pools), and a block from a failed task is discarded, so a
killed worker costs a recomputation, never a lost or doubled item. Outputs are written atomically,
so a recomputed item rewrites the same bytes.

The driver writes the report as results stream in (``<report>.partial``, renamed over the report
at the end): one line per item, ``{"custom_id", "source", "output", "status", "error", "bytes"}``
with status ``ok``, ``failed`` or ``skipped``. A rerun skips the items an earlier report (or its
partial file, after a killed driver) lists as ``ok``/``skipped`` whose output still has the
reported size and decodes. ``--skip-existing`` means what it means for the local engine besides:
an item whose output file exists is skipped unverified (a folder a local run left half done).

Batches are the local engine's: the driver cuts the items into chunks of ``--batch-size``
(``plan_chunks``, the slices ``models.offline.run_batches`` cuts) and each dataset row is one
chunk, so every ``predict`` call sees exactly the local engine's batch, whatever blocks Ray forms.
A CPU colorizer actor runs torch with the driver's thread count (``PredictStage``): with these
two, the files are byte-identical to ``--engine local`` at any batch size.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import pickle
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.commands.colorize import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    check_temperature_model,
    collect_jobs,
    load_boxes,
    match_boxes,
    prepare_image,
    write_image,
)
from service.commands.colorize_sources import (
    MANIFEST_SUFFIX,
    REPORT_NAME,
    Item,
    SourceError,
    is_uri,
    plan_manifest,
    plan_uri,
)
from service.core.jobs import OutputFormat

if TYPE_CHECKING:
    import numpy as np

    from models.pipeline import ColorizeOptions, Prediction, PreparedImage
    from models.zoo import ModelColorizer
    from service.settings import ModelSettings

log = logging.getLogger(__name__)

PipelineBuilder = Callable[[str | None], "ModelColorizer"]
"""``build(device)``: a pipeline with ``prepare``/``predict``/``merge``; ``None``: its own device."""

Batch = dict[str, "np.ndarray"]


# -- per-item conversions -----------------------------------------------------------------------


def to_options(values: dict[str, Any]) -> ColorizeOptions:
    from models.boxes import Detections
    from models.pipeline import ColorizeOptions

    boxes = values.get("boxes")
    return ColorizeOptions(
        resolution=values["resolution"],
        max_instances=values["max_instances"],
        score_threshold=values["score_threshold"],
        saturation=values["saturation"],
        temperature=values.get("temperature"),
        boxes=None if boxes is None else Detections.from_boxes(boxes, values.get("scores")),
    )


def read_source(source: str, filesystems: dict[str, Any]) -> bytes:
    """The bytes of a local path or a URI (pyarrow's filesystem for its scheme, kept per actor)."""
    if not is_uri(source):
        return Path(source).read_bytes()
    import pyarrow.fs as pafs

    scheme = source.partition("://")[0]
    if scheme not in filesystems:
        filesystems[scheme] = pafs.FileSystem.from_uri(source)[0]
    path = pafs.FileSystem.from_uri(source)[1] if scheme != "file" else source[len("file://") :]
    with filesystems[scheme].open_input_file(path) as handle:
        data: bytes = handle.read()
        return data


def _column(values: Sequence[Any]) -> np.ndarray:
    import numpy as np

    column = np.empty(len(values), dtype=object)
    column[:] = list(values)
    return column


# -- the chunks: one dataset row per predict batch ----------------------------------------------


def plan_chunks(items: Sequence[Item], batch_size: int) -> list[dict[str, str]]:
    """One dataset row per ``predict`` batch: row ``k`` holds ``items[k*B:(k+1)*B]``.

    These are the local engine's batches (``models.offline.run_batches`` cuts the same slices),
    planned here on the driver so that Ray's block splitting and re-bundling between stages can
    never regroup them: a batch's composition can change its numerics (the detector pads a batch
    to its largest image; kernels are chosen per batch shape), so only the same batches are sure
    to give the same bytes.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    chunks = []
    for start in range(0, len(items), batch_size):
        members = [
            {"custom_id": item.custom_id, "source": item.source, "output": str(item.output),
             "options": item.options}
            for item in items[start : start + batch_size]
        ]  # fmt: skip
        chunks.append({"items": json.dumps(members)})
    return chunks


def _members(chunk: Any) -> list[dict[str, Any]]:
    members: list[dict[str, Any]] = json.loads(str(chunk))
    return members


def _dump(value: object) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _load(data: Any) -> Any:
    return pickle.loads(data)  # noqa: S301 (our own stage's bytes)


# -- the stages (callable classes: one model build per actor) -----------------------------------


class PrepareStage:
    """CPU: read, decode and ``prepare`` each image of each chunk; a bad file is its ``error``."""

    def __init__(self, build: PipelineBuilder) -> None:
        self.pipeline = build("cpu")
        self.filesystems: dict[str, Any] = {}

    def __call__(self, batch: Batch) -> Batch:
        from models.offline import LOAD_ERRORS, describe_failure

        prepared_chunks, error_chunks = [], []
        for chunk in batch["items"]:
            prepared: list[PreparedImage | None] = []
            errors: list[str] = []
            for member in _members(chunk):
                try:
                    data = read_source(member["source"], self.filesystems)
                    options = to_options(member["options"])
                    prepared.append(prepare_image(self.pipeline, io.BytesIO(data), options))
                    errors.append("")
                except LOAD_ERRORS as exc:
                    prepared.append(None)
                    errors.append(describe_failure(exc))
            prepared_chunks.append(_dump(prepared))
            error_chunks.append(json.dumps(errors))
        return {"items": batch["items"], "prepared": _column(prepared_chunks),
                "errors": _column(error_chunks)}  # fmt: skip


class PredictStage:
    """Device: one ``predict`` call per chunk (image by image where it fails), as the local engine.

    On a CPU, torch's thread count enters the results (a different split of a reduction rounds
    differently: measured, 1 thread against 2 moved a test image by up to 1 level), and Ray
    limits a task's threads to its CPUs. ``torch_threads`` (the driver's own count, what
    ``--engine local`` uses) restores the local engine's count. On a GPU the CPU threads do not
    enter the network.
    """

    def __init__(self, build: PipelineBuilder, torch_threads: int | None = None) -> None:
        self.pipeline = build(None)
        if torch_threads and self.pipeline.device.type == "cpu":
            import torch

            torch.set_num_threads(torch_threads)

    def __call__(self, batch: Batch) -> Batch:
        from models.offline import PREDICT_ERRORS, describe_failure, predict_ready

        prediction_chunks, error_chunks = [], []
        for prepared_data, errors_data in zip(batch["prepared"], batch["errors"], strict=True):
            prepared = _load(prepared_data)
            errors: list[str] = json.loads(str(errors_data))
            ready = [(i, p) for i, (p, e) in enumerate(zip(prepared, errors, strict=True)) if not e]
            predictions: list[Prediction | None] = [None] * len(errors)
            failures: list[tuple[int, BaseException]] = []
            if ready:
                for i, _, prediction in predict_ready(
                    self.pipeline, ready, PREDICT_ERRORS, failures
                ):
                    predictions[i] = prediction
            for i, exc in failures:
                errors[i] = describe_failure(exc)
            prediction_chunks.append(_dump(predictions))
            error_chunks.append(json.dumps(errors))
        return {**batch, "predictions": _column(prediction_chunks),
                "errors": _column(error_chunks)}  # fmt: skip


class FinishStage:
    """CPU: ``merge``, encode and write atomically; returns one report row per item."""

    def __init__(self, build: PipelineBuilder, image_format: OutputFormat) -> None:
        self.pipeline = build("cpu")
        self.image_format = image_format

    def __call__(self, batch: Batch) -> Batch:
        from models.offline import FINISH_ERRORS, describe_failure
        from service.core.errors import InvalidParameterError

        finish_errors: tuple[type[BaseException], ...] = (*FINISH_ERRORS, InvalidParameterError)
        rows: dict[str, list[Any]] = {n: [] for n in ("custom_id", "source", "output", "error",
                                                      "bytes")}  # fmt: skip
        for chunk, prepared_data, predictions_data, errors_data in zip(
            batch["items"], batch["prepared"], batch["predictions"], batch["errors"], strict=True
        ):
            members = _members(chunk)
            prepared, predictions = _load(prepared_data), _load(predictions_data)
            errors: list[str] = json.loads(str(errors_data))
            for i, member in enumerate(members):
                size = -1
                if not errors[i]:
                    output = Path(member["output"])
                    try:
                        output.parent.mkdir(parents=True, exist_ok=True)
                        merged = self.pipeline.merge(prepared[i], predictions[i])
                        write_image(merged.image, output, self.image_format)
                        size = output.stat().st_size
                    except finish_errors as exc:
                        errors[i] = describe_failure(exc)
                for name in ("custom_id", "source", "output"):
                    rows[name].append(member[name])
                rows["error"].append(errors[i])
                rows["bytes"].append(size)
        return {name: _column(values) for name, values in rows.items()}


# -- the report ---------------------------------------------------------------------------------


def partial_path(report: Path) -> Path:
    return report.with_name(report.name + ".partial")


def read_report(report: Path) -> dict[str, dict[str, Any]]:
    """The last line per output of the report and of its ``.partial`` file (a killed run's)."""
    lines: dict[str, dict[str, Any]] = {}
    for path in (report, partial_path(report)):
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of a killed run may be cut short
            if isinstance(entry, dict) and isinstance(entry.get("output"), str):
                lines[entry["output"]] = entry
    return lines


def verified(item: Item, previous: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The earlier line of an item whose output was written and still verifies, else None."""
    from PIL import Image

    entry = previous.get(str(item.output))
    if entry is None or entry.get("status") not in ("ok", "skipped"):
        return None
    try:
        if item.output.stat().st_size != entry.get("bytes"):
            return None
        with Image.open(item.output) as image:
            image.verify()
    except (OSError, SyntaxError, ValueError):
        return None
    return entry


def report_line(
    custom_id: str, source: str, output: str, status: str, error: str | None, size: int | None
) -> str:
    entry = {"custom_id": custom_id, "source": source, "output": output, "status": status,
             "error": error, "bytes": size}  # fmt: skip
    return json.dumps(entry, ensure_ascii=False) + "\n"


# -- running ------------------------------------------------------------------------------------


@dataclass
class RaySummary:
    written: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (custom_id, reason)


@contextmanager
def ray_session(address: str | None, object_store_mb: int = 512) -> Iterator[None]:
    """Connect to ``address``, or start a small local Ray (2 CPUs, no dashboard) for this run.

    A Ray this process already runs (a test's fixture, a notebook) is used as it is and left up.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(
            num_cpus=min(2, os.cpu_count() or 1),
            include_dashboard=False,
            object_store_memory=object_store_mb * 2**20,
            log_to_driver=False,
        )
    try:
        yield
    finally:
        ray.shutdown()


def colorize_on_ray(
    items: Sequence[Item],
    build: PipelineBuilder,
    *,
    image_format: OutputFormat,
    batch_size: int | None = None,
    gpus_per_actor: float | None = None,
    actors: int | None = None,
    cpu_actors: int | None = None,
    cpus_per_actor: float = 0.5,
    torch_threads: int | None = None,
    report: Path,
    skipped: Sequence[dict[str, Any]] = (),
    progress: bool = False,
) -> RaySummary:
    """Run ``items`` through the three stages on the connected Ray; write ``report``.

    ``skipped``: earlier report lines of items left out (copied to the report as ``skipped``).
    ``torch_threads``: torch's thread count in CPU colorizer actors (default: this process's, as
    the local engine runs with; see ``PredictStage``).
    """
    import ray
    from ray.data import ActorPoolStrategy, DataContext
    from tqdm import tqdm

    from service.settings import auto_batch_size

    resources = ray.cluster_resources()
    gpus = float(resources.get("GPU", 0.0))
    cpus = max(1, int(resources.get("CPU", 1.0)))
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if gpus > 0 else 0.0
    if actors is None:
        actors = max(1, int(gpus // gpus_per_actor)) if gpus_per_actor > 0 else 1
    cpu_actors = cpu_actors or max(1, int(cpus / cpus_per_actor) - actors)
    batch = batch_size or auto_batch_size("cuda" if gpus_per_actor > 0 else "cpu")
    if torch_threads is None:
        import torch

        torch_threads = torch.get_num_threads()
    context = DataContext.get_current()
    context.enable_progress_bars = progress

    summary = RaySummary(skipped=len(skipped))
    partial_report = partial_path(report)
    report.parent.mkdir(parents=True, exist_ok=True)
    with partial_report.open("w", encoding="utf-8") as lines:
        for entry in skipped:
            lines.write(report_line(entry["custom_id"], entry["source"], entry["output"],
                                    "skipped", None, entry.get("bytes")))  # fmt: skip
        lines.flush()
        if items:
            chunks = plan_chunks(items, batch)
            blocks = max(1, min(len(chunks), 10_000))
            cpu_pool = ActorPoolStrategy(min_size=1, max_size=cpu_actors)
            dataset = (
                ray.data.from_items(chunks, override_num_blocks=blocks)
                .map_batches(PrepareStage, fn_constructor_args=(build,), batch_size=1,
                             compute=cpu_pool, num_cpus=cpus_per_actor, batch_format="numpy")
                .map_batches(PredictStage, fn_constructor_args=(build, torch_threads),
                             batch_size=1, compute=ActorPoolStrategy(size=actors),
                             num_gpus=gpus_per_actor,
                             num_cpus=1 if gpus_per_actor == 0 else cpus_per_actor,
                             batch_format="numpy")
                .map_batches(FinishStage, fn_constructor_args=(build, image_format),
                             batch_size=1, compute=cpu_pool, num_cpus=cpus_per_actor,
                             batch_format="numpy")
            )  # fmt: skip
            with tqdm(total=len(items), unit="img", file=sys.stderr, disable=not progress,
                      dynamic_ncols=True) as bar:  # fmt: skip
                for row in dataset.iter_rows():
                    error = str(row["error"]) or None
                    size = int(row["bytes"])
                    lines.write(report_line(
                        str(row["custom_id"]), str(row["source"]), str(row["output"]),
                        "failed" if error else "ok", error, None if error else size,
                    ))  # fmt: skip
                    lines.flush()
                    if error:
                        summary.failures.append((str(row["custom_id"]), error))
                    else:
                        summary.written += 1
                    bar.update(1)
    os.replace(partial_report, report)
    return summary


def build_on(settings: ModelSettings, device: str | None) -> ModelColorizer:
    """``build_colorizer`` for the settings' model (``--model``, through ``models.zoo``), on
    ``device`` (None: the settings' own device)."""
    from service.engine.loading import build_colorizer

    if device is not None:
        settings = settings.model_copy(update={"device": device})
    return build_colorizer(settings)


def _base_options(args: argparse.Namespace) -> dict[str, Any]:
    base: dict[str, Any] = {
        "resolution": args.resolution,
        "max_instances": args.max_instances,
        "score_threshold": args.score_threshold,
        "saturation": args.saturation,
    }
    if getattr(args, "temperature", None) is not None:  # only when given: items as before
        base["temperature"] = args.temperature
    return base


def plan_items(args: argparse.Namespace, extension: str, model: str) -> list[Item]:
    """The run's items from its INPUTs (``UsageError`` / ``SourceError`` on a mistake)."""
    base = _base_options(args)
    given = [str(p) for p in args.inputs]
    special = [g for g in given if is_uri(g) or g.endswith(MANIFEST_SUFFIX)]
    if special and len(given) > 1:
        raise UsageError("a manifest or a URI is the only INPUT of a run")
    if special and args.boxes:
        raise UsageError("--boxes is for files and folders; a manifest gives boxes per item")
    if special and is_uri(given[0]):
        return plan_uri(given[0], args.output_dir, extension, base)
    if special:
        return plan_manifest(Path(given[0]), args.output_dir, extension, base, model)
    jobs = collect_jobs(args.inputs, args.output_dir, extension)
    boxes = match_boxes(jobs, load_boxes(args.boxes)) if args.boxes else {}
    items = []
    for job in jobs:
        options = dict(base)
        if job in boxes:
            options["boxes"] = [list(b) for b in boxes[job].boxes]
            options["scores"] = list(boxes[job].scores)
        items.append(Item(job.key, str(job.source), job.output, options))
    return items


def _usage_error(message: str) -> int:
    sys.stderr.write(f"colorize: error: {message}\n")
    return EXIT_USAGE


def run_ray(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from models.registry import get_model
    from service.commands.model_flags import model_overrides
    from service.engine.loading import ModelSetupError, check_weight_files
    from service.settings import ModelSettings, describe_validation_error

    started = time.perf_counter()
    extension = f".{args.image_format}"
    try:
        settings = ModelSettings(**model_overrides(args))
        if len(settings.model_list()) != 1:
            raise UsageError(f"--model takes one model, got {settings.models!r}")
        model = settings.default_model
        check_weight_files(settings, [model])
        check_temperature_model(args.temperature, model)
        if args.boxes and not get_model(model).uses_detector:
            raise UsageError(
                f"--boxes: model {model!r} does not use boxes (choose --model instcolor, "
                "or leave --boxes out)"
            )
        items = plan_items(args, extension, model)
    except (UsageError, SourceError, ModelSetupError) as exc:
        return _usage_error(str(exc))
    except ValidationError as exc:
        return _usage_error(describe_validation_error(exc))
    if args.max_instances > settings.instance_limit:
        return _usage_error(
            f"--max-instances {args.max_instances} is above the instance limit "
            f"{settings.instance_limit} (COLORIZE_INSTANCE_LIMIT)"
        )
    report = args.report or args.output_dir / REPORT_NAME
    previous = read_report(report)
    todo, skipped = [], []
    for item in items:
        entry = verified(item, previous)
        if entry is None and args.skip_existing and item.output.exists():
            entry = {"output": str(item.output), "bytes": item.output.stat().st_size}
        if entry is None:
            todo.append(item)
        else:
            skipped.append({**entry, "custom_id": item.custom_id, "source": item.source})
    with ray_session(args.ray_address, args.ray_object_store_mb):
        summary = colorize_on_ray(
            todo,
            partial(build_on, settings),
            image_format=args.image_format,
            batch_size=args.batch_size,
            gpus_per_actor=args.gpus_per_actor,
            actors=args.actors,
            cpu_actors=args.cpu_actors,
            cpus_per_actor=args.cpus_per_actor,
            report=report,
            skipped=skipped,
            progress=not args.no_progress,
        )
    for custom_id, reason in summary.failures:
        sys.stderr.write(f"failed: {custom_id}: {reason}\n")
    seconds = time.perf_counter() - started
    sys.stdout.write(
        f"{summary.written} colorized, {len(summary.failures)} failed, {summary.skipped} skipped "
        f"in {seconds:.1f} s on Ray -> {args.output_dir} (report {report})\n"
    )
    return EXIT_FAILED if summary.failures else EXIT_OK
