"""``batch``: a client of the service's batch API (docs/batches.md), so nobody writes the polling loop.

``batch submit`` uploads an archive (zip or tar) or a JSON Lines manifest to ``POST /batches`` and
prints the batch object (with ``--wait``, the ended one); ``status`` prints it again; ``wait`` polls ``GET /batches/{id}`` with a
progress bar until the batch ends; ``cancel`` asks ``POST /batches/{id}/cancel``; ``download``
streams ``GET /batches/{id}/archive`` (images and the output and error JSON Lines) into a
temporary file beside the destination and renames it into place only once complete
(``models.atomic``), so an interrupted download never leaves a half-written zip.

The service is ``--url`` (``COLORIZE_URL``, default http://localhost:8000); the key is
``--api-key`` (``COLORIZE_API_KEY``), sent as ``Authorization: Bearer``. Exit codes: 0 done (for
``wait``: completed with no failed item), 1 an HTTP or connection error, or a batch that ended
failed, expired or cancelled, 2 usage error, 3 completed with failed items (their lines are in
the error file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3
DEFAULT_URL = "http://localhost:8000"
ENDED = ("completed", "failed", "expired", "cancelled")
CHUNK = 1 << 20


class BatchClientError(RuntimeError):
    """An answer that is not a success, with the problem detail the service sent."""


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "batch",
        help="submit, follow, cancel and download batches on a running service",
        description="A client of the batch API (docs/batches.md): submit an archive or a "
        "manifest, follow its progress, cancel it, download its results.",
    )
    parser.add_argument("--url", help=f"the service [COLORIZE_URL, default {DEFAULT_URL}]")
    parser.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY' [COLORIZE_API_KEY]")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds per HTTP request (an upload: per chunk) (default 60)")  # fmt: skip
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    submit = actions.add_parser("submit", help="POST /batches; prints the batch object")
    source = submit.add_mutually_exclusive_group(required=True)
    source.add_argument("archive", nargs="?", type=Path,
                        help="a zip or tar of images (each member's path is its custom_id)")  # fmt: skip
    source.add_argument("--manifest", type=Path, metavar="FILE.jsonl",
                        help="JSON Lines: custom_id, source (under COLORIZE_BATCH_INPUT_ROOTS), "
                        "per-item options")  # fmt: skip
    submit.add_argument("--options", metavar="JSON",
                        help='batch options as on /colorize, e.g. \'{"format": "png"}\'')  # fmt: skip
    submit.add_argument("--metadata", metavar="JSON", help="a JSON object kept on the batch")
    submit.add_argument("--webhook-url", metavar="URL", help="where batch events are POSTed")
    submit.add_argument("--webhook-events", metavar="E,F",
                        help="comma-separated: batch.completed, batch.failed, batch.cancelled, "
                        "batch.expired, batch.progress")  # fmt: skip
    submit.add_argument("--idempotency-key", metavar="KEY",
                        help="a retried submit with the same key returns the same batch")  # fmt: skip
    submit.add_argument("--wait", action="store_true",
                        help="then wait for the batch to end, as `batch wait`")  # fmt: skip
    submit.add_argument("--download", type=Path, metavar="FILE.zip",
                        help="then (with --wait) download the results to FILE.zip")  # fmt: skip
    _add_wait_flags(submit)

    status = actions.add_parser("status", help="GET /batches/{id}; prints the batch object")
    status.add_argument("batch_id", metavar="ID")

    wait = actions.add_parser("wait", help="poll until the batch ends, with a progress bar")
    wait.add_argument("batch_id", metavar="ID")
    _add_wait_flags(wait)

    cancel = actions.add_parser("cancel", help="POST /batches/{id}/cancel; prints the batch")
    cancel.add_argument("batch_id", metavar="ID")

    download = actions.add_parser(
        "download", help="the results as a zip (images/<custom_id>, output.jsonl, errors.jsonl)"
    )
    download.add_argument("batch_id", metavar="ID")
    download.add_argument("-o", "--output", type=Path, metavar="FILE.zip",
                          help="where to write it (default ./<ID>.zip); replaced atomically")  # fmt: skip
    download.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.set_defaults(func=run)


def _add_wait_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--interval", type=float, default=1.0,
                        help="seconds between polls (default 1)")  # fmt: skip
    parser.add_argument("--max-wait", type=float, metavar="S",
                        help="give up waiting after S seconds (exit 1; the batch goes on)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _client(args: argparse.Namespace) -> httpx.Client:
    import httpx

    url = args.url or os.environ.get("COLORIZE_URL") or DEFAULT_URL
    key = args.api_key or os.environ.get("COLORIZE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=args.timeout)


def _checked(response: httpx.Response) -> httpx.Response:
    """``response`` if it is a success, else ``BatchClientError`` with the service's detail."""
    if response.is_success:
        return response
    detail = response.text.strip()
    try:
        body = response.json()
        detail = str(body.get("detail") or body.get("title") or detail)
    except (ValueError, AttributeError):
        pass
    raise BatchClientError(f"{response.request.method} {response.request.url.path}: "
                           f"{response.status_code}: {detail[:500]}")  # fmt: skip


def _json_object(text: str | None, flag: str) -> str | None:
    """``text`` if it is a JSON object (checked here, so a typo is a usage error), else raise."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{flag}: not JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{flag}: expected a JSON object, got {type(value).__name__}")
    return text


def _print(batch: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(batch, indent=2) + "\n")
    sys.stdout.flush()


def submit(client: httpx.Client, args: argparse.Namespace) -> dict[str, Any]:
    fields = {
        name: value
        for name, value in (
            ("options", _json_object(args.options, "--options")),
            ("metadata", _json_object(args.metadata, "--metadata")),
            ("webhook_url", args.webhook_url),
            ("webhook_events", args.webhook_events),
        )
        if value is not None
    }
    field, path = ("manifest", args.manifest) if args.manifest else ("archive", args.archive)
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    media = "application/jsonl" if field == "manifest" else "application/octet-stream"
    with path.open("rb") as upload:  # httpx streams the file, it is not read into memory
        response = client.post(
            "/batches", files={field: (path.name, upload, media)}, data=fields, headers=headers
        )
    return dict(_checked(response).json())


def status(client: httpx.Client, batch_id: str) -> dict[str, Any]:
    return dict(_checked(client.get(f"/batches/{batch_id}")).json())


def wait(
    client: httpx.Client,
    batch_id: str,
    *,
    interval: float = 1.0,
    max_wait: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Poll until the batch has ended; a bar of finished items (completed + failed) of total."""
    from tqdm import tqdm

    deadline = None if max_wait is None else time.monotonic() + max_wait
    batch = status(client, batch_id)
    with tqdm(total=batch["request_counts"]["total"], unit="item", disable=not progress,
              file=sys.stderr, desc=batch_id) as bar:  # fmt: skip
        while True:
            counts = batch["request_counts"]
            bar.total = counts["total"]
            bar.n = counts["completed"] + counts["failed"]
            bar.set_postfix(status=batch["status"], failed=counts["failed"], refresh=False)
            bar.refresh()
            if batch["status"] in ENDED:
                return batch
            if deadline is not None and time.monotonic() >= deadline:
                raise BatchClientError(
                    f"batch {batch_id} is still {batch['status']} after {max_wait} s "
                    "(it goes on; wait again or cancel it)"
                )
            time.sleep(interval)
            batch = status(client, batch_id)


def cancel(client: httpx.Client, batch_id: str) -> dict[str, Any]:
    return dict(_checked(client.post(f"/batches/{batch_id}/cancel")).json())


def download(client: httpx.Client, batch_id: str, output: Path, *, progress: bool = True) -> int:
    """Stream the results zip to ``output`` atomically; the number of bytes written."""
    from tqdm import tqdm

    from models.atomic import atomic_path

    written = 0
    with client.stream("GET", f"/batches/{batch_id}/archive") as response:
        if not response.is_success:
            response.read()
            _checked(response)
        with (
            atomic_path(output, ".part") as temp,
            temp.open("xb") as handle,
            tqdm(unit="B", unit_scale=True, disable=not progress, file=sys.stderr,
                 desc=output.name) as bar,
        ):  # fmt: skip
            for chunk in response.iter_bytes(CHUNK):
                handle.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
    return written


def _ended_code(batch: dict[str, Any]) -> int:
    if batch["status"] != "completed":
        sys.stderr.write(f"batch: {batch['id']} ended {batch['status']}\n")
        return EXIT_FAILED
    if batch["request_counts"]["failed"]:
        sys.stderr.write(
            f"batch: {batch['id']} completed with {batch['request_counts']['failed']} failed "
            "item(s); see its error file (GET /batches/{id}/errors, errors.jsonl in the zip)\n"
        )
        return EXIT_PARTIAL
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    import httpx

    if args.timeout <= 0 or getattr(args, "interval", 1.0) <= 0:
        sys.stderr.write("batch: error: --timeout and --interval must be positive\n")
        return EXIT_USAGE
    if args.action == "submit":
        chosen = args.manifest or args.archive
        if not chosen.is_file():
            sys.stderr.write(f"batch: error: {chosen}: no such file\n")
            return EXIT_USAGE
        if args.download is not None and not args.wait:
            sys.stderr.write(
                "batch: error: --download needs --wait (the results come at the end)\n"
            )
            return EXIT_USAGE
        try:
            _json_object(args.options, "--options")
            _json_object(args.metadata, "--metadata")
        except ValueError as exc:
            sys.stderr.write(f"batch: error: {exc}\n")
            return EXIT_USAGE
    try:
        with _client(args) as client:
            return _act(client, args)
    except BatchClientError as exc:
        sys.stderr.write(f"batch: error: {exc}\n")
        return EXIT_FAILED
    except httpx.HTTPError as exc:
        sys.stderr.write(
            f"batch: error: {type(exc).__name__}: {exc} (is the service at that URL?)\n"
        )
        return EXIT_FAILED


def _act(client: httpx.Client, args: argparse.Namespace) -> int:
    progress = not getattr(args, "no_progress", False)
    if args.action == "status":
        _print(status(client, args.batch_id))
        return EXIT_OK
    if args.action == "cancel":
        _print(cancel(client, args.batch_id))
        return EXIT_OK
    if args.action == "download":
        output = args.output or Path(f"{args.batch_id}.zip")
        size = download(client, args.batch_id, output, progress=progress)
        sys.stdout.write(f"{output}  {size} bytes\n")
        return EXIT_OK
    batch_id = args.batch_id if args.action == "wait" else None
    if args.action == "submit":
        batch = submit(client, args)
        if not args.wait:
            _print(batch)
            return EXIT_OK
        sys.stderr.write(f"batch: submitted {batch['id']}\n")
        batch_id = batch["id"]
    assert batch_id is not None
    ended = wait(client, batch_id, interval=args.interval, max_wait=args.max_wait,
                 progress=progress)  # fmt: skip
    _print(ended)
    code = _ended_code(ended)
    if args.action == "submit" and args.download is not None and ended["status"] != "failed":
        size = download(client, batch_id, args.download, progress=progress)
        sys.stdout.write(f"{args.download}  {size} bytes\n")
    return code
