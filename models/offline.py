"""The offline batch runner shared by ``colorize`` and ``evaluate``: files in, one result per file.

``run_batches`` cuts ``items`` into batches of ``batch_size``. A background thread loads and
prepares the next batch (decode, ``Colorizer.prepare``) while the current one runs on the device
(a read-ahead of one batch). Each batch is one ``Colorizer.predict`` call; if that call fails, the
batch is predicted again one image per call, so one bad input fails alone. ``finish`` then merges
and writes (and scores) each image. An item whose load, prediction or finish raises one of the
expected errors is recorded in the returned failures and skipped; the others go on. Any other
exception stops the run.

Only PIL and the model stack: no service, HTTP or queue code, so evaluation uses it too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

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


def _load_batch(
    items: Sequence[T], load: Callable[[T], PreparedImage], errors: tuple[type[BaseException], ...]
) -> list[tuple[T, PreparedImage | BaseException]]:
    loaded: list[tuple[T, PreparedImage | BaseException]] = []
    for item in items:
        try:
            loaded.append((item, load(item)))
        except errors as exc:
            loaded.append((item, exc))
    return loaded


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
) -> list[Failure[T]]:
    """Run every item through ``load`` (read-ahead thread), ``predict`` (batched) and ``finish``.

    ``load(item)`` decodes and prepares one image, or raises; it runs in the reader thread.
    ``finish(item, prepared, prediction)`` runs in the caller's thread, in item order.
    ``progress(n)`` is called after each batch with the number of items it held. Returns the
    failures as ``(item, exception)``, in the order they happened; every other item finished.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    failures: list[Failure[T]] = []
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    with ThreadPoolExecutor(1, thread_name_prefix="offline-read") as reader:

        def read(batch: Sequence[T]) -> Future[list[tuple[T, PreparedImage | BaseException]]]:
            return reader.submit(_load_batch, batch, load, load_errors)

        upcoming = read(batches[0]) if batches else None
        for index, batch in enumerate(batches):
            assert upcoming is not None
            loaded = upcoming.result()
            if index + 1 < len(batches):
                upcoming = read(batches[index + 1])  # loaded while this batch runs
            ready: list[tuple[T, PreparedImage]] = []
            for item, prepared in loaded:
                if isinstance(prepared, BaseException):
                    _fail(failures, item, prepared)
                else:
                    ready.append((item, prepared))
            if ready:
                predicted = predict_ready(colorizer, ready, predict_errors, failures)
                _finish_each(predicted, finish, finish_errors, failures)
            if progress is not None:
                progress(len(batch))
    return failures
