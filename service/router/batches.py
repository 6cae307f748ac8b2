"""The batch API routes (docs/batches.md): submit, list, get, results, archive, cancel.

A batch belongs to the API key that made it: another key's batch answers 404 like a missing one.
Submits are validated completely before anything is stored or run (422 names what to fix).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
import zipfile
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Annotated, Any

from fastapi import FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartParser

from service.batches.archive import ArchiveError, ArchiveLimits, extract_archive, safe_name
from service.batches.options import OPTION_NAMES, check_item_model, check_options
from service.batches.records import EVENTS, BatchRecord, Item, new_batch_id
from service.batches.runner import BatchScheduler
from service.batches.webhooks import WebhookRefused, check_destination
from service.core.api_keys import ANONYMOUS
from service.core.errors import (
    InvalidParameterError,
    LimitExceededError,
    NotFoundError,
    PayloadTooLargeError,
    UnavailableError,
)
from service.router.schemas import Problem
from service.router.state import ServiceState
from service.settings import ServiceSettings

FORM_FIELDS = (
    "archive",
    "manifest",
    "options",
    "webhook_url",
    "webhook_events",
    "metadata",
    "output_prefix",
)
MAX_FIELD_BYTES = 64 * 1024
MAX_CUSTOM_ID = 512
MAX_METADATA_BYTES = 16 * 1024

BATCH_OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "object", "status", "created_at", "request_counts"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "batch"},
        "status": {
            "enum": [
                "validating",
                "in_progress",
                "finalizing",
                "completed",
                "failed",
                "expired",
                "cancelling",
                "cancelled",
            ]
        },
        "created_at": {"type": "integer"},
        "request_counts": {
            "type": "object",
            "required": ["total", "completed", "failed"],
            "properties": {k: {"type": "integer"} for k in ("total", "completed", "failed")},
        },
    },
}
BATCH_RESPONSE = {"content": {"application/json": {"schema": BATCH_OBJECT_SCHEMA}}}
JSONL = {"application/jsonl": {"schema": {"type": "string"}}}
SUBMIT_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "oneOf": [{"required": ["archive"]}, {"required": ["manifest"]}],
                "properties": {
                    "archive": {
                        "type": "string",
                        "format": "binary",
                        "description": "A zip or tar (gz/bz2/xz) of images; each "
                        "member's path is its custom_id.",
                    },
                    "manifest": {
                        "type": "string",
                        "format": "binary",
                        "description": 'JSON Lines: {"custom_id", "source" (a path '
                        "under COLORIZE_BATCH_INPUT_ROOTS), per-item options}.",
                    },
                    "options": {
                        "type": "string",
                        "description": f"JSON object: batch options ({', '.join(OPTION_NAMES)}).",
                    },
                    "webhook_url": {"type": "string"},
                    "webhook_events": {
                        "type": "string",
                        "description": "Comma-separated: " + ", ".join(EVENTS),
                    },
                    "metadata": {"type": "string", "description": "JSON object."},
                    "output_prefix": {
                        "type": "string",
                        "description": "Folder under "
                        "COLORIZE_BATCH_OUTPUT_DIR (default: the batch id).",
                    },
                },
            },
            "encoding": {
                "archive": {"contentType": "application/zip, application/x-tar"},
                "manifest": {"contentType": "application/jsonl"},
            },
        }
    },
}


PROBLEMS = {
    404: "No such batch for this API key (another key's batch is not found either).",
    413: "The upload is over COLORIZE_BATCH_MAX_UPLOAD_BYTES.",
    422: "A field, option, manifest line or archive member is refused (outside the input roots, "
    "traversal, a link, an archive bomb, a bad option, a webhook host not allowed); the detail "
    "says which.",
    429: "A per-key limit is reached (open batches, items in open batches); see Retry-After.",
    503: "The service is starting or shutting down; see Retry-After.",
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": Problem, "description": PROBLEMS[status]} for status in statuses}


def owner_of(request: Request) -> str:
    return str(getattr(request.state, "api_key_name", "") or ANONYMOUS)


def scheduler_of(state: ServiceState) -> BatchScheduler:
    if state.batches is None:
        raise UnavailableError("the batch API is starting", retry_after=1.0)
    return state.batches


def _json_field(form: FormData, name: str) -> dict[str, Any]:
    raw = form.get(name)
    if raw is None or raw == "":
        return {}
    if not isinstance(raw, str):
        raise InvalidParameterError(f"{name} must be a form field holding a JSON object")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidParameterError(f"{name} is not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise InvalidParameterError(f"{name} must be a JSON object")
    return value


def _text_field(form: FormData, name: str) -> str | None:
    raw = form.get(name)
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise InvalidParameterError(f"{name} must be a text field")
    return raw


def _check_custom_id(custom_id: Any, seen: set[str], where: str) -> str:
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= MAX_CUSTOM_ID:
        raise InvalidParameterError(
            f"{where}: custom_id must be a string of 1 to {MAX_CUSTOM_ID} characters"
        )
    if custom_id in seen:
        raise InvalidParameterError(f"{where}: custom_id {custom_id!r} is used twice")
    seen.add(custom_id)
    return custom_id


def resolve_source(source: Any, roots: list[Path], where: str) -> Path:
    """The real path of ``source`` if it lies under an input root (links resolved), else 422.

    A relative source is looked up under each root in turn (the first where it exists)."""
    if not isinstance(source, str) or not source or "\x00" in source:
        raise InvalidParameterError(f"{where}: source must be a path string")
    bases = [Path(source)] if os.path.isabs(source) else [root / source for root in roots]
    inside = [
        real
        for real in (Path(os.path.realpath(base)) for base in bases)
        if any(real.is_relative_to(root) for root in roots)
    ]
    if not inside:
        raise InvalidParameterError(
            f"{where}: source {source!r} is outside COLORIZE_BATCH_INPUT_ROOTS "
            f"({', '.join(map(str, roots))}), or climbs out of it through '..' or a link"
        )
    real = next((path for path in inside if path.exists()), inside[0])
    if real.is_dir():
        raise InvalidParameterError(f"{where}: source {source!r} is a folder, not an image")
    return real  # a missing file is that item's error line (unreadable), not a refusal


def read_manifest(upload: IO[bytes], settings: ServiceSettings) -> list[Item]:
    """Parse and check a JSON Lines manifest streamed from disk (runs in a thread)."""
    roots = settings.input_roots()
    if not roots:
        raise InvalidParameterError(
            "manifests need COLORIZE_BATCH_INPUT_ROOTS (the folders sources may name); "
            "upload an archive instead"
        )
    items: list[Item] = []
    seen: set[str] = set()
    upload.seek(0)
    for number, raw in enumerate(upload, start=1):
        if not raw.strip():
            continue
        where = f"manifest line {number}"
        if len(items) >= settings.batch_max_items:
            raise InvalidParameterError(
                f"the manifest holds more than COLORIZE_BATCH_MAX_ITEMS "
                f"({settings.batch_max_items}) items"
            )
        try:
            line = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidParameterError(f"{where} is not valid JSON ({exc})") from None
        if not isinstance(line, dict):
            raise InvalidParameterError(f"{where} must be a JSON object")
        custom_id = _check_custom_id(line.pop("custom_id", None), seen, where)
        source = resolve_source(line.pop("source", None), roots, where)
        options = line.pop("options", None) or {}
        options = check_options({**line, **options}, settings, where)
        items.append(Item(len(items), custom_id, str(source), options))
    if not items:
        raise InvalidParameterError("the manifest holds no items")
    return items


def _archive_items(upload: UploadFile, target: Path, settings: ServiceSettings) -> list[Item]:
    limits = ArchiveLimits(
        settings.archive_max_entries, settings.archive_max_total_bytes, settings.archive_max_ratio
    )
    size = upload.size or 0
    try:
        members = extract_archive(upload.file, size, target, limits)
    except ArchiveError as exc:
        raise InvalidParameterError(f"archive refused: {exc}") from None
    if len(members) > settings.batch_max_items:
        shutil.rmtree(target, ignore_errors=True)
        raise InvalidParameterError(
            f"the archive holds more than COLORIZE_BATCH_MAX_ITEMS "
            f"({settings.batch_max_items}) files"
        )
    return [Item(i, m.custom_id, str(m.path)) for i, m in enumerate(members)]


def _output_dir(settings: ServiceSettings, prefix: str | None, batch_id: str) -> Path:
    if prefix is None:
        return (settings.batch_output_dir / batch_id).resolve()
    try:
        safe = safe_name(prefix)
    except ArchiveError:
        raise InvalidParameterError(
            f"output_prefix {prefix!r} must be a relative folder without '..'"
        ) from None
    return (settings.batch_output_dir / safe).resolve()


def _webhook(form: FormData, settings: ServiceSettings) -> dict[str, Any] | None:
    url = _text_field(form, "webhook_url")
    events_text = _text_field(form, "webhook_events")
    if url is None:
        if events_text is not None:
            raise InvalidParameterError("webhook_events needs webhook_url")
        return None
    if not settings.webhook_secret:
        raise InvalidParameterError(
            "webhooks are not configured on this server (COLORIZE_WEBHOOK_SECRET is unset)"
        )
    try:
        check_destination(url, settings.webhook_hosts())
    except WebhookRefused as exc:
        raise InvalidParameterError(str(exc)) from None
    events = [e.strip() for e in (events_text or "").split(",") if e.strip()] or [
        "batch.completed",
        "batch.failed",
        "batch.cancelled",
        "batch.expired",
    ]
    unknown = [e for e in events if e not in EVENTS]
    if unknown:
        raise InvalidParameterError(
            f"unknown webhook event(s) {', '.join(unknown)}; valid: {', '.join(EVENTS)}"
        )
    return {"url": url, "events": events, "deliveries": [], "delivered": []}


async def capped(stream: AsyncIterator[bytes], limit: int) -> AsyncGenerator[bytes, None]:
    """The body's chunks, refused with 413 once more than ``limit`` bytes came: the cap of a
    body sent without Content-Length (chunked), checked as it arrives."""
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(
                f"the upload is over COLORIZE_BATCH_MAX_UPLOAD_BYTES ({limit} bytes; sent "
                "without Content-Length, refused as it arrived)"
            )
        yield chunk


async def _form(request: Request, settings: ServiceSettings) -> FormData:
    limit = settings.batch_max_upload_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLargeError(
            f"the upload is {length} bytes, over COLORIZE_BATCH_MAX_UPLOAD_BYTES ({limit})"
        )
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise InvalidParameterError(
            "POST /batches takes multipart/form-data with a file field 'archive' or 'manifest'"
        )
    parser = MultiPartParser(
        request.headers,
        capped(request.stream(), limit),
        max_files=1,
        max_fields=len(FORM_FIELDS),
        max_part_size=MAX_FIELD_BYTES,
    )
    try:
        form = await parser.parse()  # files spooled to disk; closed by the parser on an error
    except PayloadTooLargeError:
        raise
    except Exception as exc:  # starlette's MultiPartException and friends: a malformed body
        raise InvalidParameterError(f"the multipart body could not be read: {exc}") from None
    unknown = sorted(set(form.keys()) - set(FORM_FIELDS))
    if unknown:
        await form.close()
        raise InvalidParameterError(
            f"unknown form field(s) {', '.join(map(repr, unknown))}; valid: {', '.join(FORM_FIELDS)}"
        )
    return form


def _find(record: BatchRecord | None, owner: str, batch_id: str) -> BatchRecord:
    if record is None or record.owner != owner:
        raise NotFoundError(f"no batch {batch_id!r} for this API key")
    return record


def install_batches(app: FastAPI, state: ServiceState) -> None:
    settings = state.settings

    @app.post(
        "/batches",
        tags=["batches"],
        summary="Submit a batch (an archive or a manifest)",
        status_code=202,
        openapi_extra={"requestBody": SUBMIT_BODY},
        responses={
            202: {
                "description": "The batch object (also for a repeated Idempotency-Key).",
                **BATCH_RESPONSE,
            },
            **problem_responses(413, 422, 429, 503),
        },
    )
    async def submit_batch(
        request: Request,
        idempotency_key: Annotated[
            str | None,
            Header(
                max_length=255,
                description="A retried submit with the same key returns the same batch.",
            ),
        ] = None,
    ) -> JSONResponse:
        scheduler = scheduler_of(state)
        if state.draining:
            raise UnavailableError("the service is shutting down", retry_after=1.0)
        owner = owner_of(request)
        form = await _form(request, settings)
        try:
            if idempotency_key is not None:
                found = await scheduler.db(scheduler.store.find_idempotent, owner, idempotency_key)
                if found is not None:
                    return JSONResponse(found.to_object(), status_code=202)
            return await _submit(request, scheduler, form, owner, idempotency_key)
        finally:
            await form.close()

    async def _submit(
        request: Request,
        scheduler: BatchScheduler,
        form: FormData,
        owner: str,
        idempotency_key: str | None,
    ) -> JSONResponse:
        archive, manifest = form.get("archive"), form.get("manifest")
        if (archive is None) == (manifest is None):
            raise InvalidParameterError(
                "send exactly one file field: 'archive' (zip or tar) or 'manifest' (JSON Lines)"
            )
        upload = archive if archive is not None else manifest
        if not isinstance(upload, UploadFile):
            raise InvalidParameterError("'archive' / 'manifest' must be a file part")
        options = check_options(_json_field(form, "options"), settings)
        metadata = _json_field(form, "metadata")
        if len(json.dumps(metadata)) > MAX_METADATA_BYTES:
            raise InvalidParameterError(f"metadata is over {MAX_METADATA_BYTES} bytes as JSON")
        webhook = _webhook(form, settings)
        batch_id = new_batch_id()
        output_dir = _output_dir(settings, _text_field(form, "output_prefix"), batch_id)
        if output_dir.exists() and any(output_dir.iterdir()):
            raise InvalidParameterError(
                f"output folder {output_dir} is not empty: choose another output_prefix"
            )
        open_batches, open_items = await scheduler.db(scheduler.store.open_usage, owner)
        if open_batches >= settings.batch_max_open_per_key:
            raise LimitExceededError(
                f"this API key has {open_batches} open batches (COLORIZE_BATCH_MAX_OPEN_PER_KEY "
                f"{settings.batch_max_open_per_key}); wait for one to end",
                retry_after=10.0,
            )
        input_dir = (settings.state_dir / "inputs" / batch_id).resolve()
        if archive is not None:
            items = await asyncio.to_thread(_archive_items, upload, input_dir, settings)
        else:
            items = await asyncio.to_thread(read_manifest, upload.file, settings)
        try:
            for item in items:
                check_item_model(options, item.options, settings, f"item {item.custom_id!r}")
        except InvalidParameterError:
            if archive is not None:
                shutil.rmtree(input_dir, ignore_errors=True)
            raise
        if open_items + len(items) > settings.batch_max_open_items_per_key:
            if archive is not None:
                shutil.rmtree(input_dir, ignore_errors=True)
            raise LimitExceededError(
                f"this API key has {open_items} items in open batches; {len(items)} more is over "
                f"COLORIZE_BATCH_MAX_OPEN_ITEMS_PER_KEY ({settings.batch_max_open_items_per_key})",
                retry_after=10.0,
            )
        now = time.time()
        info: dict[str, Any] = {
            "input_type": "archive" if archive is not None else "manifest",
            "expires_at": int(now + settings.batch_expiry_s),
            "options": options,
            "metadata": metadata,
            "output_dir": str(output_dir),
            "input_dir": str(input_dir) if archive is not None else None,
            "idempotency_key": idempotency_key,
            "webhook": webhook,
        }
        record = BatchRecord(batch_id, owner, "validating", now, len(items), info=info)
        stored = await scheduler.db(scheduler.store.create, record, items)
        if stored.id != batch_id:  # the same key won a race: that batch is the answer
            shutil.rmtree(input_dir, ignore_errors=True)
        else:
            output_dir.mkdir(parents=True, exist_ok=True)
            scheduler.enqueue(batch_id)
        return JSONResponse(stored.to_object(), status_code=202)

    @app.get(
        "/batches",
        tags=["batches"],
        summary="List this key's batches, newest first",
        responses={200: {"description": "A page of batch objects."}, **problem_responses(422)},
    )
    async def list_batches(
        request: Request,
        limit: Annotated[int, Query(ge=1, le=100, description="Batches per page.")] = 20,
        after: Annotated[
            str | None, Query(max_length=64, description="The last id of the previous page.")
        ] = None,
    ) -> dict[str, Any]:
        scheduler = scheduler_of(state)
        records = await scheduler.db(
            scheduler.store.list_batches, owner_of(request), limit + 1, after
        )
        page = records[:limit]
        return {
            "object": "list",
            "data": [r.to_object() for r in page],
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
            "has_more": len(records) > limit,
        }

    async def lookup(request: Request, batch_id: str) -> tuple[BatchScheduler, BatchRecord]:
        scheduler = scheduler_of(state)
        record = await scheduler.db(scheduler.store.get, batch_id)
        return scheduler, _find(record, owner_of(request), batch_id)

    @app.get(
        "/batches/{batch_id}",
        tags=["batches"],
        summary="A batch: status, counts, timestamps, result files",
        responses={
            200: {"description": "The batch object.", **BATCH_RESPONSE},
            **problem_responses(404, 422),
        },
    )
    async def get_batch(request: Request, batch_id: str) -> JSONResponse:
        _, record = await lookup(request, batch_id)
        return JSONResponse(record.to_object())

    def lines_route(ok: bool) -> Any:
        async def lines(request: Request, batch_id: str) -> StreamingResponse:
            scheduler, record = await lookup(request, batch_id)
            return StreamingResponse(
                (line + "\n" for line in scheduler.store.lines(record.id, ok)),
                media_type="application/jsonl",
            )

        return lines

    for suffix, ok, what in (("output", True, "results"), ("errors", False, "errors")):
        app.get(
            f"/batches/{{batch_id}}/{suffix}",
            tags=["batches"],
            summary=f"The batch's {what} so far: JSON Lines, one per item, keyed by custom_id",
            response_class=StreamingResponse,
            responses={
                200: {"description": "JSON Lines.", "content": JSONL},
                **problem_responses(404, 422),
            },
        )(lines_route(ok))

    @app.get(
        "/batches/{batch_id}/archive",
        tags=["batches"],
        summary="A zip of the results so far: images/ by custom_id, output.jsonl, errors.jsonl",
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "A zip, streamed.",
                "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
            },
            **problem_responses(404, 422),
        },
    )
    async def batch_archive(request: Request, batch_id: str) -> StreamingResponse:
        scheduler, record = await lookup(request, batch_id)
        return StreamingResponse(
            zip_stream(scheduler, record),
            media_type="application/zip",
            headers={"content-disposition": f'attachment; filename="{record.id}.zip"'},
        )

    @app.post(
        "/batches/{batch_id}/cancel",
        tags=["batches"],
        summary="Cancel: no new items start; the results so far stay listed",
        responses={
            200: {"description": "The batch object (cancelling or ended).", **BATCH_RESPONSE},
            **problem_responses(404, 422),
        },
    )
    async def cancel_batch(request: Request, batch_id: str) -> JSONResponse:
        scheduler, record = await lookup(request, batch_id)
        if record.is_open:
            record = await scheduler.cancel(record.id)
        return JSONResponse(record.to_object())


class _Sink:
    """A write-only file for ``zipfile`` whose bytes are taken out as they come (streaming)."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.offset = 0

    def write(self, data: bytes) -> int:
        self.buffer += data
        self.offset += len(data)
        return len(data)

    def tell(self) -> int:
        return self.offset

    def flush(self) -> None:
        return

    def take(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


def zip_name(custom_id: str, path: str) -> str:
    """images/<custom_id>[.ext] where the custom_id is a safe relative path, else the result's
    own file name."""
    extension = PurePosixPath(path).suffix
    try:
        name = safe_name(custom_id)
    except ArchiveError:
        return path
    return f"images/{name}" + ("" if name.lower().endswith(extension) else extension)


def zip_stream(scheduler: BatchScheduler, record: BatchRecord) -> Iterator[bytes]:
    """The results as a zip, produced piece by piece (a sync iterator: run in a thread)."""
    sink = _Sink()
    folder = Path(record.info["output_dir"])
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED) as archive:  # type: ignore[call-overload]
        for name, ok in (("output.jsonl", True), ("errors.jsonl", False)):
            with archive.open(name, "w") as member:
                for line in scheduler.store.lines(record.id, ok):
                    member.write(line.encode() + b"\n")
            yield sink.take()
        for line in scheduler.store.lines(record.id, True):
            result = json.loads(line)
            path = folder / result["response"]["path"]
            if not path.is_file():
                continue
            with (
                archive.open(
                    zip_name(result["custom_id"], result["response"]["path"]), "w"
                ) as member,
                path.open("rb") as source,
            ):
                shutil.copyfileobj(source, member)
            yield sink.take()
    yield sink.take()
