"""What ``colorize --engine ray`` reads: its flags, and its sources planned into items.

A SOURCE is one of
- files and folders, planned exactly as the local engine plans them (``collect_jobs``: the same
  output names, ``--boxes`` matched the same way);
- a manifest, ``*.jsonl``: one JSON object a line, ``{"custom_id": "a/b.jpg", "path": "...",
  ...options}`` as in the batch API. ``path`` is a local path (relative to the manifest's folder)
  or a URI; the options are ``boxes`` (``[[x1, y1, x2, y2], ...]``), ``scores``, ``saturation``,
  ``max_instances``, ``score_threshold``, ``resolution``, ``temperature`` (a model that decodes by
  the annealed mean), ``hints`` (a model that takes them), ``samples`` and ``seed`` (a sampling
  model) and ``model`` (which must name this run's model). The output is ``DEST/<custom_id>`` with
  its image extension replaced by the format's (or the format's appended where it has none);
- a URI (``file:///data/scans``, ``s3://bucket/prefix``): listed recursively through the pyarrow
  filesystem Ray Data uses for it; outputs mirror the paths below the prefix. An S3-compatible
  endpoint (MinIO, Ceph, a local test server) is taken from ``AWS_ENDPOINT_URL_S3`` or
  ``AWS_ENDPOINT_URL``, as the AWS SDKs take it (``filesystem_for``).

Everything here is planning on the driver (no Ray, no torch), so a mistake fails before a cluster
is touched. Standard library and pyarrow (only for URIs) only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from models.constants import SEED_LIMIT
from models.image_files import IMAGE_EXTENSIONS
from service.commands.arg_types import non_negative_int, positive_float, positive_int
from service.core.boxes import BoxesError, validate_boxes
from service.core.errors import InvalidParameterError
from service.core.hints import validate_hints
from service.core.jobs import SAMPLES_LIMIT, SATURATION_RANGE, TEMPERATURE_RANGE

MANIFEST_SUFFIX = ".jsonl"
REPORT_NAME = "colorize-report.jsonl"
OPTION_FIELDS = ("resolution", "max_instances", "score_threshold", "saturation", "temperature")
MANIFEST_FIELDS = frozenset(
    {"custom_id", "path", "boxes", "scores", "model", "hints", "samples", "seed", *OPTION_FIELDS}
)


class SourceError(Exception):
    """A mistake in a manifest or a URI source, found before any work (exit code 2)."""


@dataclass(frozen=True)
class Item:
    """One image to colorize: its report name, where it is read, where it goes, its options.

    ``options`` holds the ``ColorizeOptions`` fields as JSON values (``boxes``/``scores`` lists),
    so an item travels through Ray Data as plain columns.
    """

    custom_id: str
    source: str  # a local path or a URI
    output: Path
    options: dict[str, Any]


def is_uri(text: str) -> bool:
    """``scheme://...`` (a one-letter scheme is a Windows drive, not a URI)."""
    scheme, sep, _ = text.partition("://")
    return bool(sep) and len(scheme) > 1 and scheme.replace("+", "").isalnum()


def source_argument(text: str) -> Path | str:
    """An INPUT argument: a URI stays text (``Path`` folds ``file:///a`` into ``file:/a`` and
    ``s3://b/k`` into ``s3:/b/k``), anything else is a ``Path``."""
    return text if is_uri(text) else Path(text)


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "engine (docs/ray.md)",
        "--engine ray also takes a manifest (*.jsonl) or a URI (file://, s3://) as INPUT",
    )
    group.add_argument("--engine", choices=["local", "ray"], default="local",
                       help="local: this process (default); ray: Ray Data, local or a cluster")  # fmt: skip
    group.add_argument("--ray-address", metavar="ADDR",
                       help="a running cluster (ray://host:10001, host:6379 or auto); default: "
                       "start a local Ray for this run")  # fmt: skip
    group.add_argument("--gpus-per-actor", type=float, default=None, metavar="G",
                       help="GPUs per colorizer actor (default 1 where the cluster has GPUs, "
                       "else 0: the actors run on CPUs)")  # fmt: skip
    group.add_argument("--actors", type=positive_int, default=None, metavar="N",
                       help="colorizer actors (default: the cluster's GPUs / G, 1 without GPUs)")  # fmt: skip
    group.add_argument("--cpu-actors", type=positive_int, default=None, metavar="N",
                       help="most actors of each CPU stage, decode+prepare and merge+write "
                       "(default: the cluster's CPUs)")  # fmt: skip
    group.add_argument("--cpus-per-actor", type=positive_float, default=0.5, metavar="C",
                       help="CPUs reserved per CPU-stage actor (default 0.5)")  # fmt: skip
    group.add_argument("--report", type=Path, default=None, metavar="FILE.jsonl",
                       help=f"the JSON Lines report, one line per item (default DIR/{REPORT_NAME}); "
                       "a rerun skips items it lists as written whose output still verifies")  # fmt: skip
    group.add_argument("--ray-object-store-mb", type=non_negative_int, default=512, metavar="MB",
                       help="object store of the local Ray started without --ray-address "
                       "(default 512)")  # fmt: skip


def output_for(custom_id: str, output_dir: Path, extension: str) -> Path:
    """``DEST/<custom_id>`` with the format's extension (replacing an image extension)."""
    relative = PurePosixPath(custom_id)
    if relative.suffix.lower() in IMAGE_EXTENSIONS:
        relative = relative.with_suffix("")
    return output_dir / Path(*relative.parts).with_name(relative.name + extension)


def _check_custom_id(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SourceError(f"{where}: custom_id must be a non-empty string")
    relative = PurePosixPath(value)
    if relative.is_absolute() or ".." in relative.parts or "\\" in value or "\x00" in value:
        raise SourceError(
            f"{where}: custom_id {value!r} must be a relative path without '..' "
            "(it names the output file below DEST)"
        )
    return value


def _item_options(entry: dict[str, Any], base: dict[str, Any], where: str) -> dict[str, Any]:
    options = dict(base)
    for name in OPTION_FIELDS:
        if name in entry:
            options[name] = entry[name]
    low, high = SATURATION_RANGE
    t_low, t_high = TEMPERATURE_RANGE
    checks = {
        "resolution": lambda v: v in ("original", "network"),
        "max_instances": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "score_threshold": lambda v: _number(v) and 0.0 <= v <= 1.0,
        "saturation": lambda v: _number(v) and low <= v <= high,
        "temperature": lambda v: v is None or (_number(v) and t_low <= v <= t_high),
    }
    allowed = {
        "resolution": "'original' or 'network'",
        "max_instances": "an integer >= 0",
        "score_threshold": "a number from 0 to 1",
        "saturation": f"a number from {low:g} to {high:g}",
        "temperature": f"a number from {t_low:g} to {t_high:g} (or null: the model's default)",
    }
    for name, ok in checks.items():
        if name in options and not ok(options[name]):  # temperature: only when given
            raise SourceError(f"{where}: {name} must be {allowed[name]}, got {options[name]!r}")
    if "boxes" in entry:
        try:
            boxes, scores = validate_boxes({"boxes": entry["boxes"], "scores": entry.get("scores")})
        except BoxesError as exc:
            raise SourceError(f"{where}: {exc}") from exc
        options["boxes"], options["scores"] = boxes, scores
    elif "scores" in entry:
        raise SourceError(f"{where}: scores without boxes")
    if "hints" in entry:
        try:
            options["hints"] = validate_hints(entry["hints"])
        except InvalidParameterError as exc:
            raise SourceError(f"{where}: {exc.detail}") from None
    if "samples" in entry:
        samples = entry["samples"]
        if not _integer(samples) or not 1 <= samples <= SAMPLES_LIMIT:
            raise SourceError(
                f"{where}: samples must be an integer from 1 to {SAMPLES_LIMIT}, got {samples!r}"
            )
        options["samples"] = samples
    if "seed" in entry:
        seed = entry["seed"]
        if not _integer(seed) or not 0 <= seed < SEED_LIMIT:
            raise SourceError(f"{where}: seed must be an integer from 0 to 2**63 - 1, got {seed!r}")
        options["seed"] = seed
    return options


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def plan_manifest(
    manifest: Path, output_dir: Path, extension: str, base: dict[str, Any], model: str
) -> list[Item]:
    """Read and check every line; any problem is a ``SourceError`` naming the line."""
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"{manifest}: cannot read ({exc})") from exc
    items: list[Item] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{manifest} line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SourceError(f"{where}: not valid JSON ({exc})") from exc
        if not isinstance(entry, dict):
            raise SourceError(f'{where}: expected an object {{"custom_id": ..., "path": ...}}')
        unknown = sorted(set(entry) - MANIFEST_FIELDS)
        if unknown:
            raise SourceError(
                f"{where}: unknown fields {unknown} (allowed: {', '.join(sorted(MANIFEST_FIELDS))})"
            )
        custom_id = _check_custom_id(entry.get("custom_id"), where)
        path = entry.get("path")
        if not isinstance(path, str) or not path:
            raise SourceError(f"{where}: path must be a non-empty string")
        if entry.get("model", model) != model:
            raise SourceError(
                f"{where}: model {entry['model']!r} is not this run's model {model!r}; "
                "run the items of each model separately (one run per model)"
            )
        source = path if is_uri(path) else str(manifest.parent / path)
        items.append(
            Item(custom_id, source, output_for(custom_id, output_dir, extension),
                 _item_options(entry, base, where))
        )  # fmt: skip
    if not items:
        raise SourceError(f"{manifest}: no items (one JSON object a line)")
    _refuse_clashes(items)
    return items


def s3_endpoint() -> str | None:
    """The S3 endpoint to use instead of AWS's: ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``
    (the AWS SDKs' variables, in their order), e.g. ``http://minio:9000``; None: AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def filesystem_root(uri: str) -> str:
    """``scheme://netloc`` of a URI: the filesystems are kept per root (an S3 bucket has its
    own region)."""
    scheme, _, rest = uri.partition("://")
    return f"{scheme}://{rest.partition('/')[0]}"


def filesystem_for(uri: str) -> tuple[Any, str]:
    """The pyarrow filesystem of a URI and the path in it (``pyarrow.fs.FileSystem.from_uri``).

    ``s3://`` with an endpoint set (``s3_endpoint``) gets an ``S3FileSystem`` for that endpoint
    (``http://`` or ``https://`` as the URL says; path-style addressing), in ``AWS_REGION`` /
    ``AWS_DEFAULT_REGION`` (default us-east-1). Credentials are the AWS SDK's usual chain
    (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, an instance role) wherever
    the filesystem is used.
    """
    import pyarrow.fs as pafs

    scheme, _, rest = uri.partition("://")
    endpoint = s3_endpoint()
    if scheme == "s3" and endpoint:
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        path = rest.partition("?")[0].rstrip("/")
        return pafs.S3FileSystem(endpoint_override=endpoint, region=region), path
    return pafs.FileSystem.from_uri(uri)


def plan_uri(uri: str, output_dir: Path, extension: str, base: dict[str, Any]) -> list[Item]:
    """List image files below ``uri`` (recursively) through its pyarrow filesystem."""
    import pyarrow.fs as pafs

    try:
        filesystem, root = filesystem_for(uri)
        info = filesystem.get_file_info(root)
        if info.type == pafs.FileType.File:
            found = [info]
            root = str(PurePosixPath(root).parent)
        elif info.type == pafs.FileType.Directory:
            found = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
        elif uri.startswith("s3://") and _missing_bucket(filesystem, root):
            bucket = root.partition("/")[0]
            raise SourceError(
                f"{uri}: no such bucket {bucket!r} (or these credentials cannot see it"
                + (f"; endpoint {s3_endpoint()}" if s3_endpoint() else "")
                + ")"
            )
        else:
            raise SourceError(f"{uri}: no such file or folder")
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise SourceError(f"{uri}: cannot list ({exc})") from exc
    scheme = uri.partition("://")[0]
    items = []
    for entry in sorted(found, key=lambda e: e.path):
        name = PurePosixPath(entry.path)
        if entry.type != pafs.FileType.File or name.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if name.name.startswith("."):
            continue  # hidden files (the atomic writes' temporaries among them)
        custom_id = name.relative_to(root.rstrip("/") or "/").as_posix()
        source = f"{scheme}://{entry.path}" if scheme != "file" else f"file://{entry.path}"
        items.append(Item(custom_id, source, output_for(custom_id, output_dir, extension), base))
    if not items:
        raise SourceError(
            f"no images found below {uri} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    _refuse_clashes(items)
    return items


def _missing_bucket(filesystem: Any, path: str) -> bool:
    import pyarrow.fs as pafs

    info = filesystem.get_file_info(path.partition("/")[0])
    return bool(info.type == pafs.FileType.NotFound)


def _refuse_clashes(items: list[Item]) -> None:
    ids = Counter(item.custom_id for item in items)
    repeated = sorted(i for i, n in ids.items() if n > 1)
    if repeated:
        raise SourceError(f"custom_id repeated: {', '.join(repeated[:10])}")
    outputs = Counter(item.output for item in items)
    clashes = sorted(str(o) for o, n in outputs.items() if n > 1)
    if clashes:
        raise SourceError(
            "several items would be written to the same output file: " + ", ".join(clashes[:10])
            + " (custom_ids that differ only in their image extension); rename them"
        )  # fmt: skip
