"""The offline batch runner shared by ``colorize`` and ``evaluate``: files in, one result per file.

``run_batches`` cuts ``items`` into batches of ``batch_size`` and runs them through three stages
joined by bounded queues, so the device never waits for the host:

* load: a small pool (``loaders`` threads) decodes and prepares (``Colorizer.prepare``) the items
  of up to ``read_ahead`` batches ahead of the one being predicted; batches come out in order;
* predict: the caller's thread, one ``Colorizer.predict`` call per batch; if that call fails, the
  batch is predicted again one image per call, so one bad input fails alone;
* finish: one background thread merges and writes (and scores) each image, in item order, from a
  queue of at most ``finish_queue`` predicted batches, while the next batch predicts.

An item whose load, prediction or finish raises one of the expected errors is recorded in the
returned failures and skipped; the others go on. Any other exception, in any stage, stops the run
(the other stages stop at their next item) and is raised in the caller. ``finish_queue=0`` gives
the earlier schedule: a read-ahead of ``read_ahead`` batches and ``finish`` on the caller's thread
after each predict (``SEQUENTIAL_PLAN``, the benchmark's baseline, and what ``pipeline_plan``
picks when no core is left beside the network's). ``pipeline_plan`` sizes the pool and queues.

Only PIL and the model stack: no service, HTTP or queue code, so evaluation uses it too.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

from PIL import Image

if TYPE_CHECKING:
    from models.pipeline import Prediction, PreparedImage
    from models.zoo import ModelColorizer as Colorizer  # any registered model

log = logging.getLogger(__name__)

T = TypeVar("T")

LOAD_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    Image.DecompressionBombError,
)
"""What decoding a bad file raises: Pillow's UnidentifiedImageError (an OSError), truncated
data (OSError, EOFError, SyntaxError from old plugins), UnsupportedImageError / OptionsError
(ValueError), an image over Pillow's pixel limit (DecompressionBombError)."""

PREDICT_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, ValueError)
"""What the device stage may raise for particular inputs (out of memory is a RuntimeError)."""

FINISH_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError)
"""What merging and writing one image may raise (a full disk, a size the format cannot hold)."""

Failure = tuple[T, BaseException]


def describe_failure(exc: BaseException) -> str:
    """``Type: message`` (the type twice where the exception has no message)."""
    return f"{type(exc).__name__}: {str(exc) or type(exc).__name__}"


def _load_one(
    item: T, load: Callable[[T], PreparedImage], errors: tuple[type[BaseException], ...]
) -> PreparedImage | BaseException:
    try:
        return load(item)
    except errors as exc:
        return exc


def predict_ready(
    colorizer: Colorizer,
    ready: Sequence[tuple[T, PreparedImage]],
    errors: tuple[type[BaseException], ...],
    failures: list[Failure[T]],
) -> list[tuple[T, PreparedImage, Prediction]]:
    """One call for the batch; if it fails, one call per image so one bad input fails alone."""
    try:
        predictions = colorizer.predict([prepared for _, prepared in ready])
        return [(i, p, r) for (i, p), r in zip(ready, predictions, strict=True)]
    except errors as exc:
        if len(ready) == 1:
            _fail(failures, ready[0][0], exc)
            return []
        log.warning("batch of %d failed (%s); retrying image by image", len(ready), exc)
    results = []
    for item, prepared in ready:
        try:
            results.append((item, prepared, colorizer.predict([prepared])[0]))
        except errors as exc:
            _fail(failures, item, exc)
    return results


def _finish_each(
    predicted: Sequence[tuple[T, PreparedImage, Prediction]],
    finish: Callable[[T, PreparedImage, Prediction], None],
    errors: tuple[type[BaseException], ...],
    failures: list[Failure[T]],
) -> None:
    for item, prepared, prediction in predicted:
        try:
            finish(item, prepared, prediction)
        except errors as exc:
            _fail(failures, item, exc)


def _fail(failures: list[Failure[T]], item: T, exc: BaseException) -> None:
    failures.append((item, exc))
    log.debug("%s failed", item, exc_info=exc)


@dataclass(frozen=True)
class PipelinePlan:
    """How ``run_batches`` is staged (see ``pipeline_plan``)."""

    loaders: int  # load-pool threads
    read_ahead: int  # batches loaded (or loading) ahead of the one being predicted
    finish_queue: int  # predicted batches that may wait for the finish thread (0: finish inline)


MAX_LOADERS = 4
"""Decoding and preparing a batch is short beside predicting it; more loaders only hold memory."""


SEQUENTIAL_PLAN = PipelinePlan(loaders=1, read_ahead=1, finish_queue=0)
"""The schedule before the pipeline: one batch read ahead on one thread, finish inline."""


def pipeline_plan(cores: int, device_type: str, team: int) -> PipelinePlan:
    """The stage sizes for ``cores`` usable cores when torch's OpenMP teams have ``team`` threads.

    The same rule as the server's thread plan (``service.engine.threads``): count the threads that
    may run at once. The predict stage keeps ``busy`` cores: on CUDA one (its thread only launches
    kernels), on a CPU device the network's team (``team``). The finish thread takes one of the
    cores left and the loaders the rest: ``loaders = cores - busy - 1``, at least one, at most
    ``MAX_LOADERS``; a read-ahead of one batch per loader plus one, and one predicted batch queued
    for the finish thread. Where no core is left beside the predict stage (a CPU device whose
    team already has every core: torch's default), overlapping only makes the host stages and the
    team contend for the same cores (measured slower, BENCHMARKS.md "Offline pipeline"), so the
    plan is ``SEQUENTIAL_PLAN``; a smaller team (``torch.set_num_threads``) frees a core for it.
    """
    cores = max(1, cores)
    busy = 1 if device_type == "cuda" else max(1, team)
    if cores - busy < 1:
        return SEQUENTIAL_PLAN
    loaders = max(1, min(MAX_LOADERS, cores - busy - 1))
    return PipelinePlan(loaders=loaders, read_ahead=loaders + 1, finish_queue=1)


def default_plan(colorizer: Colorizer) -> PipelinePlan:
    """``pipeline_plan`` for this process (its CPU affinity, torch's team, the model's device)."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = getattr(colorizer, "device", None)
    device_type = device.type if device is not None and hasattr(device, "type") else "cpu"
    return pipeline_plan(cores or 1, device_type, torch.get_num_threads())


_END = object()  # the predict stage's last message to the finish stage


@dataclass
class _Predicted:
    """One batch on its way to the finish stage."""

    size: int  # items in the batch (for ``progress``)
    predicted: list[tuple[object, object, object]]  # (item, prepared, prediction)
    failures: list[Failure[object]]  # its load and predict failures, in the order they happened


def run_batches(
    colorizer: Colorizer,
    items: Sequence[T],
    load: Callable[[T], PreparedImage],
    finish: Callable[[T, PreparedImage, Prediction], None],
    *,
    batch_size: int,
    progress: Callable[[int], object] | None = None,
    load_errors: tuple[type[BaseException], ...] = LOAD_ERRORS,
    predict_errors: tuple[type[BaseException], ...] = PREDICT_ERRORS,
    finish_errors: tuple[type[BaseException], ...] = FINISH_ERRORS,
    plan: PipelinePlan | None = None,
) -> list[Failure[T]]:
    """Run every item through ``load`` (a pool), ``predict`` (batched) and ``finish`` (a thread).

    ``load(item)`` decodes and prepares one image, or raises; it runs in a load-pool thread, items
    of up to ``plan.read_ahead`` batches ahead of the predicting one at once. ``predict`` runs in
    the caller's thread. ``finish(item, prepared, prediction)`` runs in one finish thread (the
    caller's with ``plan.finish_queue == 0``), in item order, so it need not lock what only it
    touches; it overlaps the next batch's ``predict`` and the loads. ``progress(n)`` is called by
    the finishing thread after each batch is finished, in batch order, with the number of items it
    held. ``plan`` defaults to ``default_plan(colorizer)``.

    Returns the failures as ``(item, exception)``, batch by batch in batch order, and within a
    batch its load failures (item order), then its predict failures, then its finish failures
    (item order): the order the sequential runner recorded them in, whatever the overlap. Every
    other item finished. An unexpected exception from any stage is raised here once the stages
    have stopped (loads in progress complete; nothing further starts).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    plan = plan or default_plan(colorizer)
    if plan.loaders < 1 or plan.read_ahead < 0 or plan.finish_queue < 0:
        raise ValueError(f"a pipeline plan needs loaders >= 1 and queues >= 0, got {plan}")
    failures: list[Failure[T]] = []
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]

    def finish_batch(done: _Predicted) -> None:
        failures.extend(cast("list[Failure[T]]", done.failures))
        for item, prepared, prediction in done.predicted:
            if stop.is_set():
                return
            try:
                finish(
                    cast(T, item), cast("PreparedImage", prepared), cast("Prediction", prediction)
                )
            except finish_errors as exc:
                _fail(failures, cast(T, item), exc)
        if progress is not None:
            progress(done.size)

    stop = threading.Event()  # set when any stage fails unexpectedly: the others stop early
    finish_error: list[BaseException] = []
    handoff: queue.Queue[_Predicted | object] = queue.Queue(max(1, plan.finish_queue))

    def finisher() -> None:
        while (message := handoff.get()) is not _END:
            if finish_error or stop.is_set():
                continue  # drain, so the predict stage never blocks on a full queue
            try:
                finish_batch(cast(_Predicted, message))
            except BaseException as exc:  # raised again in the caller's thread
                finish_error.append(exc)
                stop.set()

    finish_thread = None
    if plan.finish_queue > 0 and batches:
        finish_thread = threading.Thread(target=finisher, name="offline-finish", daemon=True)
        finish_thread.start()
    pool = ThreadPoolExecutor(plan.loaders, thread_name_prefix="offline-load")
    loading: deque[list[Future[PreparedImage | BaseException]]] = deque()

    submitted = 0  # batches handed to the pool so far

    def top_up(last: int) -> None:
        nonlocal submitted
        while submitted < len(batches) and submitted <= last:
            futures = [
                pool.submit(_load_one, item, load, load_errors) for item in batches[submitted]
            ]
            loading.append(futures)
            submitted += 1

    try:
        for index, batch in enumerate(batches):
            top_up(index + plan.read_ahead)  # this batch and at most read_ahead more are loading
            loaded = [future.result() for future in loading.popleft()]
            batch_failures: list[Failure[T]] = []
            ready: list[tuple[T, PreparedImage]] = []
            for item, prepared in zip(batch, loaded, strict=True):
                if isinstance(prepared, BaseException):
                    _fail(batch_failures, item, prepared)
                else:
                    ready.append((item, prepared))
            if finish_error:
                break
            predicted = (
                predict_ready(colorizer, ready, predict_errors, batch_failures) if ready else []
            )
            done = _Predicted(len(batch), cast(Any, predicted), cast(Any, batch_failures))
            if finish_thread is None:
                finish_batch(done)
            else:
                handoff.put(done)  # waits while finish_queue batches are waiting
    except BaseException:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if finish_thread is not None:
            handoff.put(_END)
            finish_thread.join()
    if finish_error:
        raise finish_error[0]
    return failures
