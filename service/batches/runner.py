"""The batch scheduler: feeds a batch's items to the existing queue behind interactive requests.

Items go through ``JobQueue.submit`` like a ``POST /colorize`` (the in-process batcher in memory
mode, the Redis stream and its GPU workers in Redis mode): the same admission, engine and
deadlines. Interactive requests go first because the scheduler never has more than
``batch_in_flight`` items submitted at once, so a request arriving during a batch waits behind
at most that many batch items (docs/batches.md gives the bound), and the queue is never filled by
batch work. A queue refusal (full, loading, no worker) is not an item failure: the item waits and
is submitted again.

Batches run one after another, oldest first. An item's result image is written atomically, then
its one line is recorded (``Store.finish_item``); a restart re-runs only items without a line.

A batch runs under a lease (``Store.acquire_lease``): with the Redis store every API replica has
a scheduler, and the one holding a batch's lease runs it, renewing the lease every third of
``batch_lease_s``. A scheduler that loses its lease stops at once; a killed one's lease runs out
and another replica, which looks for open batches every third of ``batch_lease_s``, takes the
batch over where it was. A terminal webhook is recorded as pending on the batch in the same
update as the terminal status, and cleared once delivered (or given up): one still pending at
start-up (its sender was killed) is sent again, with the same webhook-id.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from models.atomic import write_bytes_atomic, write_text_atomic
from service.batches.options import job_model, job_options
from service.batches.records import TERMINAL_EVENT, BatchRecord, Item
from service.batches.store import Store
from service.batches.webhooks import WebhookSender, payload
from service.core.errors import (
    DeadlineExceededError,
    NoWorkersError,
    OverloadedError,
    ServiceError,
    UnavailableError,
)
from service.core.image_header import check_shape, probe_size
from service.core.jobs import Job, JobResult
from service.core.metrics import METRICS
from service.core.queue import JobQueue
from service.core.tracing import stage_span
from service.settings import ServiceSettings

log = logging.getLogger(__name__)

T = TypeVar("T")
EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}
RETRIED = (OverloadedError, UnavailableError, NoWorkersError)
DEADLINE_TRIES = 3
STATUS_POLL_S = 0.25  # how often a running batch looks for a cancel (from any replica) or expiry
PAGE = 512


class BatchScheduler:
    def __init__(
        self,
        store: Store,
        settings: ServiceSettings,
        queue: Callable[[], JobQueue | None],
        webhooks: WebhookSender,
    ) -> None:
        self.store = store
        self.settings = settings
        self.queue = queue
        self.webhooks = webhooks
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="batch-store")
        self._waiting: list[str] = []  # batch ids, oldest first
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._items: set[asyncio.Task[None]] = set()
        self._last_progress: dict[str, float] = {}
        self.current: str | None = None
        self.holder = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._leases: dict[str, asyncio.Task[None]] = {}  # batch id -> its renewal task
        self._lost: dict[str, asyncio.Event] = {}  # set when a held lease was lost
        self._delivering: dict[str, int] = {}  # batch id -> terminal webhooks being sent here

    # -- the store, off the event loop (one thread: every write is serialised) ---------------

    async def db(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def mutate(self, batch_id: str, change: Callable[[BatchRecord], None]) -> BatchRecord:
        """Read, change and save a batch's status/info as one atomic step (``Store.update``)."""
        return await self.db(self.store.update, batch_id, change)

    # -- leases -------------------------------------------------------------------------------

    @property
    def lease_s(self) -> float:
        return self.settings.batch_lease_s

    async def _hold(self, batch_id: str) -> bool:
        """Take the batch's lease and keep renewing it; False if another scheduler holds it."""
        if batch_id in self._leases:
            return True
        if not await self.db(self.store.acquire_lease, batch_id, self.holder, self.lease_s):
            return False
        self._lost[batch_id] = asyncio.Event()
        self._leases[batch_id] = asyncio.create_task(self._renew(batch_id))
        return True

    async def _renew(self, batch_id: str) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                kept = await self.db(self.store.renew_lease, batch_id, self.holder, self.lease_s)
            except UnavailableError:
                continue  # the store is down: so is every other scheduler's; retry
            if not kept:
                log.warning("lost the lease of batch %s: another scheduler has it", batch_id)
                self._lost[batch_id].set()
                return

    async def _let_go(self, batch_id: str, *, force: bool = False) -> None:
        """Release the lease, unless a terminal webhook is still being sent from here."""
        if self._delivering.get(batch_id) and not force:
            return
        task = self._leases.pop(batch_id, None)
        self._lost.pop(batch_id, None)
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(UnavailableError):
            await self.db(self.store.release_lease, batch_id, self.holder)

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        unfinished = await self.db(self.store.unfinished)
        for record in unfinished:
            log.info(
                "resuming batch %s (%s, %d/%d done)",
                record.id,
                record.status,
                record.completed + record.failed,
                record.total,
            )
            self._waiting.append(record.id)
        self._task = asyncio.create_task(self._loop())
        if not self.store.shared:  # shared: the loop's look-out finds them (under a lease)
            await self._resend_undelivered()
        await self._update_open_gauge()

    async def _look_out(self) -> None:
        """Shared store: the open batches nobody here runs, and undelivered terminal webhooks
        whose sender is gone (their lease is free)."""
        for record in await self.db(self.store.unfinished):
            if record.id != self.current and record.id not in self._waiting:
                self._waiting.append(record.id)
        await self._resend_undelivered()

    async def _resend_undelivered(self) -> None:
        for record in await self.db(self.store.undelivered):
            if record.id in self._leases or record.id in self._delivering:
                continue
            if not await self._hold(record.id):
                continue
            log.info("re-sending the undelivered webhook(s) of batch %s", record.id)
            if not self._send_pending(record, resent=True):
                await self._let_go(record.id)

    def enqueue(self, batch_id: str) -> None:
        self._waiting.append(batch_id)
        self._wake.set()

    async def stop(self) -> None:
        """Stop at once: items being processed stay pending and resume on the next start (or
        on another replica: the leases are released)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._drop_items()
        await self.webhooks.close()  # undelivered terminal webhooks stay pending: re-sent later
        for batch_id in list(self._leases):
            await self._let_go(batch_id, force=True)
        self._executor.shutdown(wait=True)

    async def _drop_items(self) -> None:
        for task in list(self._items):
            task.cancel()
        if self._items:
            await asyncio.gather(*self._items, return_exceptions=True)

    async def _update_open_gauge(self) -> None:
        METRICS.batches_open.set(len(await self.db(self.store.unfinished)))

    # -- the loop -----------------------------------------------------------------------------

    async def _loop(self) -> None:
        looked = 0.0
        while True:
            if self.store.shared and time.monotonic() - looked >= self.lease_s / 3:
                looked = time.monotonic()
                try:
                    await self._look_out()
                except UnavailableError as exc:
                    log.warning("batch store unavailable: %s", exc.detail)
            if not self._waiting:
                self._wake.clear()
                timeout = self.lease_s / 3 if self.store.shared else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                continue
            batch_id = self._waiting.pop(0)
            try:
                if not await self._hold(batch_id):
                    continue  # another scheduler runs it
            except UnavailableError as exc:
                log.warning("batch store unavailable: %s", exc.detail)
                self._waiting.insert(0, batch_id)
                await asyncio.sleep(1.0)
                continue
            self.current = batch_id
            try:
                await self._run_held(batch_id)
            except asyncio.CancelledError:
                raise
            except UnavailableError as exc:  # the store is down: the batch waits, not fails
                log.warning("batch %s paused, store unavailable: %s", batch_id, exc.detail)
                await self._drop_items()
                self._waiting.insert(0, batch_id)
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("batch %s failed", batch_id)
                with contextlib.suppress(Exception):
                    await self._end(batch_id, "failed", "internal error while running the batch")
            finally:
                self.current = None
                await self._let_go(batch_id)

    async def _run_held(self, batch_id: str) -> None:
        """``_run`` while the lease is held; stopped at once (items dropped, nothing ended)
        when the lease is lost."""
        lost = self._lost[batch_id]
        run = asyncio.create_task(self._run(batch_id))
        watch = asyncio.create_task(lost.wait())
        try:
            await asyncio.wait({run, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not run.done():
                run.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await run
                await self._drop_items()
        if lost.is_set():
            return
        run.result()  # its exception, if any

    async def _run(self, batch_id: str) -> None:
        record = await self.db(self.store.get, batch_id)
        if record is None or not record.is_open:
            return
        if record.status == "cancelling":
            await self._end(batch_id, "cancelled")
            return
        if record.status == "finalizing":
            await self._finalize(batch_id)
            return
        if time.time() >= float(record.info["expires_at"]):
            await self._end(batch_id, "expired")
            return
        log.info(
            "running batch %s as %s (%s, %d/%d done)",
            batch_id,
            self.holder,
            record.status,
            record.completed + record.failed,
            record.total,
        )
        await asyncio.to_thread(self._sweep_temporaries, record)
        if record.status == "validating":
            await self.mutate(batch_id, lambda r: r.mark("in_progress"))
        while True:
            stop = await self._feed(record)
            if stop is None:
                await asyncio.gather(*self._items, return_exceptions=True)
                stop = await self._stop_reason(batch_id)
            if stop is not None:
                await self._drop_items()
                await self._end(batch_id, stop)
                return
            if not await self.db(self.store.pending_items, batch_id, -1, 1):
                break
            # an item whose result could not be recorded (store or disk error): again, later
            await asyncio.sleep(1.0)
        await self._finalize(batch_id)

    async def _stop_reason(self, batch_id: str) -> str | None:
        """cancelled (someone asked) or expired (past expires_at), else None."""
        record = await self.db(self.store.get, batch_id)
        if record is None or record.status == "cancelling":
            return "cancelled"
        if time.time() >= float(record.info["expires_at"]):
            return "expired"
        return None

    async def _feed(self, record: BatchRecord) -> str | None:
        """Submit every pending item, at most ``batch_in_flight`` at once; returns why it
        stopped early (cancelled, expired) or None when every item was submitted."""
        after = -1
        limit = self.settings.batch_in_flight
        checked = 0.0
        while True:
            items = await self.db(self.store.pending_items, record.id, after, PAGE)
            if not items:
                return None
            for item in items:
                while True:
                    if time.monotonic() - checked >= STATUS_POLL_S:
                        checked = time.monotonic()
                        stop = await self._stop_reason(record.id)
                        if stop is not None:
                            return stop
                    if len(self._items) < limit:
                        break
                    await asyncio.wait(
                        set(self._items), timeout=STATUS_POLL_S, return_when=asyncio.FIRST_COMPLETED
                    )
                task = asyncio.create_task(self._process(record, item))
                self._items.add(task)
                task.add_done_callback(self._items.discard)
                after = item.seq

    # -- one item -----------------------------------------------------------------------------

    def _output_dir(self, record: BatchRecord) -> Path:
        return Path(record.info["output_dir"])

    def _sweep_temporaries(self, record: BatchRecord) -> None:
        """Remove the temporaries of image writes a killed scheduler left half-done (their
        items have no line, so they are written again); this scheduler holds the lease."""
        swept = 0
        for temp in (self._output_dir(record) / "images").glob(".*.tmp"):
            temp.unlink(missing_ok=True)
            swept += 1
        if swept:
            log.info("batch %s: removed %d unfinished image write(s)", record.id, swept)

    async def _process(self, record: BatchRecord, item: Item) -> None:
        try:
            result = await self._colorize(record, item)
        except ServiceError as exc:
            line = _error_line(item, exc.kind, exc.status, exc.detail)
            await self._finish(record, item, False, line)
            return
        except OSError as exc:
            line = _error_line(
                item, "unreadable", 400, f"cannot read {item.custom_id}: {exc.strerror or exc}"
            )
            await self._finish(record, item, False, line)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("batch %s item %s failed", record.id, item.custom_id)
            line = _error_line(item, "internal", 500, f"internal error ({type(exc).__name__})")
            await self._finish(record, item, False, line)
            return
        extension = EXTENSIONS.get(result.media_type, "bin")
        relative = f"images/{item.seq:07d}.{extension}"
        await asyncio.to_thread(
            write_bytes_atomic, self._output_dir(record) / relative, result.body
        )
        line = {
            "id": f"{record.id}-{item.seq}",
            "custom_id": item.custom_id,
            "response": {
                "status_code": 200,
                "media_type": result.media_type,
                "path": relative,
                "url": f"/batches/{record.id}/archive",
                "model": result.model,
                "model_version": result.model_version,
                "input_size": result.input_size,
                "boxes": result.boxes,
                "scores": result.scores,
                "truncated": result.truncated,
            },
            "error": None,
        }
        await self._finish(record, item, True, line)

    async def _colorize(self, record: BatchRecord, item: Item) -> JobResult:
        """One item through the queue, in a ``batch item`` span when tracing is on (the job's
        own spans, in this process or a worker's, are its children)."""
        attributes: dict[str, Any] = {
            "batch.id": record.id, "batch.custom_id": item.custom_id, "batch.seq": item.seq,
        }  # fmt: skip
        with stage_span("batch item", **attributes):
            return await self._colorize_untraced(record, item)

    async def _colorize_untraced(self, record: BatchRecord, item: Item) -> JobResult:
        merged = {**record.info.get("options", {}), **item.options}
        options = job_options(merged, self.settings)
        model = job_model(merged, self.settings)
        image = await asyncio.to_thread(Path(item.source).read_bytes)
        size = probe_size(image)
        pixels = 0
        if size is not None:
            s = self.settings
            check_shape(*size, max_pixels=s.max_pixels, max_aspect_ratio=s.max_aspect_ratio)
            pixels = size[0] * size[1]
        misses = 0
        while True:
            queue = self.queue()
            if queue is None:
                await asyncio.sleep(0.5)
                continue
            now = time.time()
            job = Job(
                request_id=f"{record.id}-{item.seq}",
                image=image,
                options=options,
                deadline=now + self.settings.batch_item_timeout_s,
                enqueued_at=now,
                pixels=pixels,
                model=model,
            )
            try:
                return await queue.submit(job)
            except RETRIED as exc:
                await asyncio.sleep(min(5.0, exc.retry_after or 0.5))
            except DeadlineExceededError:
                misses += 1
                if misses >= DEADLINE_TRIES:
                    raise

    async def _finish(
        self, record: BatchRecord, item: Item, ok: bool, line: dict[str, Any]
    ) -> None:
        changed = await self.db(self.store.finish_item, record.id, item.seq, ok, line)
        if changed:
            METRICS.batch_items.labels(result="completed" if ok else "failed").inc()
        webhook = record.info.get("webhook")
        if webhook and "batch.progress" in webhook["events"]:
            now = time.monotonic()
            last = self._last_progress.get(record.id, 0.0)
            if now - last >= self.settings.webhook_progress_interval_s:
                self._last_progress[record.id] = now
                current = await self.db(self.store.get, record.id)
                if current is not None:
                    self._send(current, "batch.progress")

    # -- the end ------------------------------------------------------------------------------

    async def _finalize(self, batch_id: str) -> None:
        record = await self.mutate(batch_id, lambda r: r.mark("finalizing"))
        await self.db(self._write_files, record)
        await self._end(batch_id, "completed")

    def _write_files(self, record: BatchRecord) -> None:
        """output.jsonl and errors.jsonl beside the images (atomic: a reader never sees half)."""
        folder = self._output_dir(record)
        for name, ok in (("output.jsonl", True), ("errors.jsonl", False)):
            text = "".join(line + "\n" for line in self.store.lines(record.id, ok))
            write_text_atomic(folder / name, text)

    async def _end(self, batch_id: str, status: str, error: str | None = None) -> None:
        """The terminal status, and its webhook recorded as pending in the same update."""
        event = TERMINAL_EVENT[status]

        def change(record: BatchRecord) -> None:
            record.mark(status)
            if error is not None:
                record.info["errors"] = {"data": [{"code": "internal", "message": error}]}
            webhook = record.info.get("webhook")
            if webhook and event in webhook["events"]:
                body = payload(event, record.to_object())
                webhook.setdefault("pending", []).append(
                    {"event": event, "webhook_id": "msg_" + secrets.token_hex(12),
                     "body": body.decode(), "since": int(time.time())}
                )  # fmt: skip

        if status in ("cancelled", "expired"):  # partial results are listed too
            record = await self.db(self.store.get, batch_id)
            if record is not None:
                await self.db(self._write_files, record)
        record = await self.mutate(batch_id, change)
        self._last_progress.pop(batch_id, None)
        log.info(
            "batch %s %s: %d completed, %d failed of %d",
            batch_id,
            status,
            record.completed,
            record.failed,
            record.total,
        )
        self._send_pending(record)
        await self._update_open_gauge()

    def _send(self, record: BatchRecord, event: str) -> None:
        """A progress event: best effort, not recorded as pending."""
        webhook = record.info.get("webhook")
        if not webhook or event not in webhook["events"]:
            return
        body = payload(event, record.to_object())
        self.webhooks.send(record.id, webhook["url"], event, body, self._record_delivery)

    def _send_pending(self, record: BatchRecord, *, resent: bool = False) -> bool:
        """Send the batch's pending terminal webhooks; True if any (the lease is then kept
        until each is delivered or given up)."""
        webhook = record.info.get("webhook") or {}
        pending = webhook.get("pending") or []
        for entry in pending:
            self._delivering[record.id] = self._delivering.get(record.id, 0) + 1
            self.webhooks.send(
                record.id,
                webhook["url"],
                entry["event"],
                entry["body"].encode(),
                self._record_delivery,
                message_id=entry["webhook_id"],
                resent=resent,
                on_done=functools.partial(self._delivered, record.id, entry["webhook_id"]),
            )
        return bool(pending)

    async def _delivered(self, batch_id: str, webhook_id: str) -> None:
        """A terminal webhook is delivered or given up: no longer pending."""

        def change(record: BatchRecord) -> None:
            webhook = record.info.get("webhook") or {}
            webhook["pending"] = [
                e for e in webhook.get("pending", []) if e["webhook_id"] != webhook_id
            ]

        with contextlib.suppress(KeyError, RuntimeError, UnavailableError):
            await self.mutate(batch_id, change)
        left = self._delivering.get(batch_id, 1) - 1
        if left > 0:
            self._delivering[batch_id] = left
            return
        self._delivering.pop(batch_id, None)
        if self.current != batch_id:
            await self._let_go(batch_id)

    async def _record_delivery(
        self, batch_id: str, attempt: dict[str, Any], delivered: bool
    ) -> None:
        def change(record: BatchRecord) -> None:
            webhook = record.info.setdefault("webhook", {})
            deliveries = webhook.setdefault("deliveries", [])
            deliveries.append(attempt)
            del deliveries[:-100]
            if delivered:
                webhook.setdefault("delivered", []).append(attempt["event"])

        with contextlib.suppress(KeyError, RuntimeError):
            await self.mutate(batch_id, change)

    # -- requests from the routes -------------------------------------------------------------

    async def cancel(self, batch_id: str) -> BatchRecord:
        """Mark cancelling; the running batch stops submitting within STATUS_POLL_S, a waiting
        one ends cancelled when its turn comes (at once here)."""
        record = await self.mutate(batch_id, lambda r: r.mark("cancelling") if r.is_open else None)
        if record.status == "cancelling" and self.current != batch_id:
            if not await self._hold(batch_id):
                return record  # another scheduler runs it: it ends it within STATUS_POLL_S
            try:
                with contextlib.suppress(ValueError):
                    self._waiting.remove(batch_id)
                current = await self.db(self.store.get, batch_id)
                if current is not None and current.status == "cancelling":
                    await self._end(batch_id, "cancelled")
            finally:
                await self._let_go(batch_id)
            ended = await self.db(self.store.get, batch_id)
            return ended if ended is not None else record
        return record


def _error_line(item: Item, code: str, status: int, message: str) -> dict[str, Any]:
    return {
        "id": None,
        "custom_id": item.custom_id,
        "response": None,
        "error": {"code": code, "status_code": status, "message": message},
    }


def dumps(line: dict[str, Any]) -> str:
    return json.dumps(line, separators=(",", ":"))
