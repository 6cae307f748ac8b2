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

``--samples``/``--seed`` and ``--hints`` (and a manifest line's ``samples``, ``seed``, ``hints``)
travel in each item's options: the samples are written as the local engine names them
(``item_outputs``), listed in the item's report line with its seed; a sampling run without
``--seed`` reuses the seed an earlier report gives its items (``with_seed``), so a rerun resumes
the same draw. URI sources' filesystems are made on the driver (``source_filesystems``: an S3
endpoint from the driver's ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``) and sent to the read
actors.
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

from models.constants import SEED_LIMIT
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
    read_hints_file,
    sample_output,
    to_hints,
    write_image,
)
from service.commands.colorize_sources import (
    MANIFEST_SUFFIX,
    REPORT_NAME,
    Item,
    SourceError,
    filesystem_for,
    filesystem_root,
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
    """An item's JSON options as the local engine's ``ColorizeOptions`` (``samples`` absent: one
    colouring; ``hints`` through ``colorize.to_hints``, as the local engine converts them)."""
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
        samples=values.get("samples") or 1,
        seed=values.get("seed"),
        hints=to_hints(values.get("hints") or []),
    )


def item_outputs(output: Path, options: dict[str, Any]) -> list[Path]:
    """The files an item writes: ``output``, or with ``samples`` given (``--samples N``, a
    manifest's ``samples``) the local engine's ``<stem>.s0.<format>`` ... ``<stem>.s<N-1>...``."""
    samples = options.get("samples")
    if samples is None:
        return [output]
    return [sample_output(output, i) for i in range(samples)]


def source_filesystems(items: Sequence[Item]) -> dict[str, Any]:
    """The pyarrow filesystem of each URI root among the items' sources, made on the driver
    (``filesystem_for``: the driver's endpoint settings) and sent to the read actors, as Ray
    Data sends the filesystem it resolved to its read tasks."""
    roots = {filesystem_root(item.source): item.source for item in items if is_uri(item.source)}
    return {root: filesystem_for(uri)[0] for root, uri in roots.items()}


def read_source(source: str, filesystems: dict[str, Any]) -> bytes:
    """The bytes of a local path or a URI: the filesystem of its root in ``filesystems`` (made
    here with ``filesystem_for`` and kept where missing)."""
    if not is_uri(source):
        return Path(source).read_bytes()
    root = filesystem_root(source)
    if root not in filesystems:
        filesystems[root] = filesystem_for(source)[0]
    if source.startswith("file://"):
        path = source[len("file://") :]
    elif source.startswith("s3://"):
        path = source[len("s3://") :].partition("?")[0]  # bucket/key, as S3FileSystem takes it
    else:
        path = filesystem_for(source)[1]
    with filesystems[root].open_input_file(path) as handle:
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

    def __init__(self, build: PipelineBuilder, filesystems: dict[str, Any] | None = None) -> None:
        self.pipeline = build("cpu")
        self.filesystems: dict[str, Any] = dict(filesystems or {})

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
    """CPU: ``merge``, encode and write atomically (each sample to its own file, as the local
    engine writes them); returns one report row per item, ``files`` its ``[[path, bytes], ...]``."""

    def __init__(self, build: PipelineBuilder, image_format: OutputFormat) -> None:
        self.pipeline = build("cpu")
        self.image_format = image_format

    def __call__(self, batch: Batch) -> Batch:
        from models.offline import FINISH_ERRORS, describe_failure
        from service.core.errors import InvalidParameterError

        finish_errors: tuple[type[BaseException], ...] = (*FINISH_ERRORS, InvalidParameterError)
        rows: dict[str, list[Any]] = {n: [] for n in ("custom_id", "source", "output", "error",
                                                      "files")}  # fmt: skip
        for chunk, prepared_data, predictions_data, errors_data in zip(
            batch["items"], batch["prepared"], batch["predictions"], batch["errors"], strict=True
        ):
            members = _members(chunk)
            prepared, predictions = _load(prepared_data), _load(predictions_data)
            errors: list[str] = json.loads(str(errors_data))
            for i, member in enumerate(members):
                files: list[tuple[str, int]] = []
                if not errors[i]:
                    outputs = item_outputs(Path(member["output"]), member["options"])
                    try:
                        outputs[0].parent.mkdir(parents=True, exist_ok=True)
                        merged = self.pipeline.merge(prepared[i], predictions[i])
                        images = [merged.image, *merged.samples][: len(outputs)]
                        for image, output in zip(images, outputs, strict=True):
                            write_image(image, output, self.image_format)
                            files.append((str(output), output.stat().st_size))
                    except finish_errors as exc:
                        errors[i] = describe_failure(exc)
                for name in ("custom_id", "source", "output"):
                    rows[name].append(member[name])
                rows["error"].append(errors[i])
                rows["files"].append(json.dumps(files))
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


def reported_files(entry: dict[str, Any]) -> dict[str, Any]:
    """An earlier line's files and sizes: its ``samples`` list, else its ``output``."""
    if isinstance(entry.get("samples"), list):
        return {
            str(f.get("output")): f.get("bytes") for f in entry["samples"] if isinstance(f, dict)
        }
    return {str(entry.get("output")): entry.get("bytes")}


def verified(item: Item, previous: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The earlier line of an item whose outputs were written and still verify, else None.

    Every file the item writes now (``item_outputs``: its samples) must be listed with the size
    it still has and decode; a sampling item's line must have this run's seed."""
    from PIL import Image

    outputs = item_outputs(item.output, item.options)
    entry = previous.get(str(outputs[0]))
    if entry is None or entry.get("status") not in ("ok", "skipped"):
        return None
    if entry.get("seed") != item.options.get("seed"):
        return None
    sizes = reported_files(entry)
    if set(sizes) != {str(path) for path in outputs}:
        return None
    try:
        for path in outputs:
            if path.stat().st_size != sizes[str(path)]:
                return None
            with Image.open(path) as image:
                image.verify()
    except (OSError, SyntaxError, ValueError):
        return None
    return entry


def report_line(
    custom_id: str,
    source: str,
    output: str,
    status: str,
    error: str | None,
    size: int | None,
    samples: Sequence[dict[str, Any]] | None = None,
    seed: int | None = None,
) -> str:
    """One report line; ``samples`` (``[{"output", "bytes"}, ...]``, every file of an item run
    with samples, ``output`` the first) and ``seed`` (a sampling model's) only where given."""
    entry: dict[str, Any] = {"custom_id": custom_id, "source": source, "output": output,
                             "status": status, "error": error, "bytes": size}  # fmt: skip
    if samples is not None:
        entry["samples"] = list(samples)
    if seed is not None:
        entry["seed"] = seed
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
    filesystems: dict[str, Any] | None = None,
) -> RaySummary:
    """Run ``items`` through the three stages on the connected Ray; write ``report``.

    ``skipped``: earlier report lines of items left out (copied to the report as ``skipped``).
    ``torch_threads``: torch's thread count in CPU colorizer actors (default: this process's, as
    the local engine runs with; see ``PredictStage``). ``filesystems``: the URI sources'
    filesystems per root (default ``source_filesystems(items)``).
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

    if filesystems is None:
        filesystems = source_filesystems(items)
    seeds = {str(item.output): item.options.get("seed") for item in items}
    sampled = {str(item.output) for item in items if item.options.get("samples") is not None}
    summary = RaySummary(skipped=len(skipped))
    partial_report = partial_path(report)
    report.parent.mkdir(parents=True, exist_ok=True)
    with partial_report.open("w", encoding="utf-8") as lines:
        for entry in skipped:
            lines.write(report_line(entry["custom_id"], entry["source"], entry["output"],
                                    "skipped", None, entry.get("bytes"), entry.get("samples"),
                                    entry.get("seed")))  # fmt: skip
        lines.flush()
        if items:
            chunks = plan_chunks(items, batch)
            blocks = max(1, min(len(chunks), 10_000))
            cpu_pool = ActorPoolStrategy(min_size=1, max_size=cpu_actors)
            dataset = (
                ray.data.from_items(chunks, override_num_blocks=blocks)
                .map_batches(PrepareStage, fn_constructor_args=(build, filesystems), batch_size=1,
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
                    files = [{"output": path, "bytes": size}
                             for path, size in json.loads(str(row["files"]))]  # fmt: skip
                    item_output = str(row["output"])
                    first = (files[0]["output"] if files else str(sample_output(Path(item_output), 0))
                             if item_output in sampled else item_output)  # fmt: skip
                    lines.write(report_line(
                        str(row["custom_id"]), str(row["source"]), first,
                        "failed" if error else "ok", error, None if error else files[0]["bytes"],
                        files if item_output in sampled and not error else None,
                        seeds.get(item_output),
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
    if args.samples is not None:
        base["samples"] = args.samples
    if args.seed is not None:
        base["seed"] = args.seed
    if getattr(args, "temperature", None) is not None:  # only when given: items as before
        base["temperature"] = args.temperature
    return base


def plan_items(args: argparse.Namespace, extension: str, model: str) -> list[Item]:
    """The run's items from its INPUTs (``UsageError`` / ``SourceError`` on a mistake).

    ``--samples`` and a ``--hints`` list apply to every item (a manifest line's own ``samples`` /
    ``hints`` win); a ``--hints`` object is matched to files and folders as ``--boxes`` is. The
    seed is left to ``run_ray`` (``with_seed``)."""
    base = _base_options(args)
    hints = read_hints_file(args.hints) if args.hints else None
    if isinstance(hints, list):
        base["hints"] = hints
    given = [str(p) for p in args.inputs]
    special = [g for g in given if is_uri(g) or g.endswith(MANIFEST_SUFFIX)]
    if special and len(given) > 1:
        raise UsageError("a manifest or a URI is the only INPUT of a run")
    if special and args.boxes:
        raise UsageError("--boxes is for files and folders; a manifest gives boxes per item")
    if special and isinstance(hints, dict):
        raise UsageError(
            "--hints: an object per file name is for files and folders; give a manifest with "
            "per-item hints, or a --hints list for every item"
        )
    if special and is_uri(given[0]):
        return plan_uri(given[0], args.output_dir, extension, base)
    if special:
        return plan_manifest(Path(given[0]), args.output_dir, extension, base, model)
    jobs = collect_jobs(args.inputs, args.output_dir, extension)
    boxes = match_boxes(jobs, load_boxes(args.boxes)) if args.boxes else {}
    hints_of = match_boxes(jobs, hints, "--hints") if isinstance(hints, dict) else {}
    items = []
    for job in jobs:
        options = dict(base)
        if job in boxes:
            options["boxes"] = [list(b) for b in boxes[job].boxes]
            options["scores"] = list(boxes[job].scores)
        if job in hints_of:
            options["hints"] = hints_of[job]
        items.append(Item(job.key, str(job.source), job.output, options))
    return items


def check_model_options(items: Sequence[Item], model: str) -> None:
    """Refuse samples, seeds and hints the model does not take (``UsageError``), as the local
    engine refuses ``--samples``, ``--seed`` and ``--hints``; and an output of one item's samples
    that is another's source or output."""
    from models.registry import get_model

    spec = get_model(model)
    for flag, key in (("samples", "samples"), ("seed", "seed")):
        given = [item.custom_id for item in items if item.options.get(key) is not None]
        if given and spec.max_samples <= 1:
            raise UsageError(
                f"--{flag}: model {model!r} gives one colouring per image (choose a model that "
                "samples, --model zhao-pixelated, or leave --samples and --seed out, and a "
                f"manifest's {flag!r}: item {given[0]!r})"
            )
    hinted = [item.custom_id for item in items if item.options.get("hints")]
    # instcolor takes hints when its checkpoint was trained with them: its actors refuse them
    # per item otherwise (a failed line naming the fix)
    if hinted and not spec.takes_hints and not spec.uses_detector:
        raise UsageError(
            f"--hints: model {model!r} takes no colour hints (choose --model zhang-siggraph17, "
            f"or leave --hints and a manifest's 'hints' out: item {hinted[0]!r})"
        )
    written = {p for item in items for p in item_outputs(item.output, item.options)}
    sources = {str(Path(item.source).resolve()) for item in items if not is_uri(item.source)}
    clashes = sources & {str(p.resolve()) for p in written}
    if clashes:
        raise UsageError(
            "an output would replace an input: " + ", ".join(sorted(clashes)[:10])
            + "; choose another --output-dir or --format"
        )  # fmt: skip
    if len(written) < sum(len(item_outputs(i.output, i.options)) for i in items):
        raise UsageError(
            "two items would write the same sample file (a custom_id ending in .s<N> beside "
            "another's samples); rename them"
        )


def with_seed(
    items: Sequence[Item], model: str, seed: int | None, previous: dict[str, dict[str, Any]]
) -> tuple[list[Item], int | None]:
    """A sampling model's items with the run's seed where they have none of their own.

    The seed: ``--seed``, else the one an earlier run's report gives those items (a rerun of the
    same command resumes with the samples it drew), else one drawn now; printed in the summary.
    None for a model that does not sample."""
    import secrets
    from dataclasses import replace

    from models.registry import get_model

    if get_model(model).max_samples <= 1:
        return list(items), None
    own = [item for item in items if item.options.get("seed") is None]
    if seed is None:
        earlier = set()
        for item in own:
            entry = previous.get(str(item_outputs(item.output, item.options)[0]))
            if entry is not None and isinstance(entry.get("seed"), int):
                earlier.add(entry["seed"])
        seed = earlier.pop() if len(earlier) == 1 else secrets.randbelow(2**31)
    if not 0 <= seed < SEED_LIMIT:
        raise UsageError(f"seed must be between 0 and 2**63 - 1, got {seed}")
    seeded = [
        replace(item, options={**item.options, "seed": seed})
        if item.options.get("seed") is None
        else item
        for item in items
    ]
    return seeded, seed


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
        check_model_options(items, model)
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
    try:
        items, seed = with_seed(items, model, args.seed, previous)
    except UsageError as exc:
        return _usage_error(str(exc))
    todo, skipped = [], []
    for item in items:
        entry = verified(item, previous)
        outputs = item_outputs(item.output, item.options)
        if entry is None and args.skip_existing and all(path.exists() for path in outputs):
            files = [{"output": str(path), "bytes": path.stat().st_size} for path in outputs]
            entry = {"output": files[0]["output"], "bytes": files[0]["bytes"],
                     "seed": item.options.get("seed")}  # fmt: skip
            if item.options.get("samples") is not None:
                entry["samples"] = files
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
    drawn = f", seed {seed}" if seed is not None else ""
    sys.stdout.write(
        f"{summary.written} colorized, {len(summary.failures)} failed, {summary.skipped} skipped "
        f"in {seconds:.1f} s on Ray{drawn} -> {args.output_dir} (report {report})\n"
    )
    return EXIT_FAILED if summary.failures else EXIT_OK
