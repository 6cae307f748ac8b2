"""One batch of jobs through the model: decode and prepare on the CPU pool, one ``predict`` on the
device thread, merge and encode on the CPU pool.

``BatchEngine`` knows nothing of HTTP or queues; the in-process batcher and the Redis worker both
call ``run_batch``. Every job gets its own result or its own ``ServiceError``: a bad image fails
only its job; a CUDA out-of-memory error splits the batch in halves and retries; any other
exception in ``predict`` retries each job alone, so only the job that causes it fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from models.boxes import Detections
from models.image_input import UnsupportedImageError
from models.pipeline import ColorizeOptions, Colorizer, OptionsError, Prediction, PreparedImage
from service.core.errors import (
    DeadlineExceededError,
    InternalError,
    InvalidImageError,
    InvalidParameterError,
    ServiceError,
    UnavailableError,
    UnsupportedMediaTypeError,
)
from service.core.jobs import Job, JobOptions, JobResult, OutputFormat
from service.core.metrics import METRICS, Metrics
from service.engine.decode import configure_pil, decode_image
from service.engine.encode import choose_format, encode_image
from service.engine.loading import build_colorizer
from service.settings import ServiceSettings

log = logging.getLogger(__name__)

Answer = JobResult | ServiceError  # what the engine gives back per job (the Redis frame's "answer")
Abandoned = Callable[[Job], bool]  # True once nobody waits for the job's answer


def _never(job: Job) -> bool:
    return False


@dataclass
class _Ready:
    """A job after the CPU stage: what predict needs and what encode will need."""

    prepared: PreparedImage
    fmt: OutputFormat
    timings: dict[str, float]


def colorize_options(options: JobOptions) -> ColorizeOptions:
    """Job options as the model's options; bad boxes become 422."""
    boxes = None
    if options.boxes is not None:
        try:
            boxes = Detections.from_boxes(options.boxes, options.scores)
        except (ValueError, TypeError) as exc:
            raise InvalidParameterError(f"boxes: {exc}") from exc
    return ColorizeOptions(
        resolution=options.resolution,
        max_instances=options.max_instances,
        score_threshold=options.score_threshold,
        boxes=boxes,
        saturation=options.saturation,
    )


class BatchEngine:
    """Runs batches of jobs on one ``Colorizer``; ``close()`` stops its device thread."""

    def __init__(
        self,
        colorizer: Colorizer,
        pool: ThreadPoolExecutor,
        metrics: Metrics = METRICS,
        *,
        max_pixels: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock``: what the jobs' ``deadline`` and ``enqueued_at`` are measured on."""
        self.colorizer = colorizer
        self.clock = clock
        self.pool = pool
        self.metrics = metrics
        self.max_pixels = max_pixels
        # One thread owns the device: predicts never interleave and keep one CUDA stream busy.
        self.device_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="device")
        self.owns_pool = False  # start() hands the engine its own pool, shut down by close()
        configure_pil(max_pixels)
        description = colorizer.describe()
        metrics.set_model_info(
            model_version=colorizer.version,
            device=str(description["device"]),
            precision=str(description["precision"]),
            detector=str(description["detector"] or "none"),
        )

    def describe(self) -> dict[str, Any]:
        return self.colorizer.describe()

    async def warmup(self, batch_sizes: Sequence[int], instances: int | None = None) -> None:
        """One batch per size on the device thread (kernels, allocator, cudnn autotuning)."""
        loop = asyncio.get_running_loop()
        for size in batch_sizes:
            log.info("warm-up: batch of %d started (ready once every batch size is done)", size)
            start = time.perf_counter()
            await loop.run_in_executor(self.device_thread, self.colorizer.warmup, size, instances)
            log.info("warm-up: batch of %d done in %.1f s", size, time.perf_counter() - start)
        self._record_gpu_memory()

    @classmethod
    async def start(cls, settings: ServiceSettings, metrics: Metrics = METRICS) -> BatchEngine:
        """Load the weights named by ``settings``, give the engine its own CPU pool, warm up.

        The one way a serving process (memory-mode server, Redis worker) builds its engine.
        """
        colorizer = await asyncio.to_thread(build_colorizer, settings)
        pool = ThreadPoolExecutor(settings.worker_threads, thread_name_prefix="cpu")
        engine = cls(colorizer, pool, metrics, max_pixels=settings.max_pixels)
        engine.owns_pool = True
        try:
            if settings.warmup:
                await engine.warmup(*settings.warmup_plan(colorizer.device.type))
        except BaseException:
            engine.close()
            raise
        return engine

    def close(self) -> None:
        self.device_thread.shutdown(wait=True, cancel_futures=True)
        if self.owns_pool:
            self.pool.shutdown(wait=True, cancel_futures=True)

    async def run_batch(
        self, jobs: Sequence[Job], abandoned: Abandoned | None = None
    ) -> list[Answer]:
        """A result or an error per job, in order; never raises for one job's fault.

        A job past its deadline, or ``abandoned`` (its client left), is dropped before its CPU
        stage and again before the device: nobody would read its answer.
        """
        if not jobs:
            return []
        gone = abandoned or _never
        loop = asyncio.get_running_loop()
        self.metrics.batch_size.observe(len(jobs))
        ready = await asyncio.gather(
            *(loop.run_in_executor(self.pool, self._prepare_if_wanted, j, gone) for j in jobs)
        )
        outcomes: list[Answer] = []
        todo: list[tuple[int, _Ready]] = []
        for i, (job, item) in enumerate(zip(jobs, ready, strict=True)):
            if isinstance(item, ServiceError):  # a bad image, or dropped before decoding
                outcomes.append(item)
                continue
            dropped = self._unwanted(job, gone)  # expired or withdrawn while decoding
            outcomes.append(dropped or InternalError("not processed"))  # replaced below
            if dropped is None:
                todo.append((i, item))
        if not todo:
            return outcomes
        device_start, predictions = await loop.run_in_executor(
            self.device_thread, self._timed_predict, [item.prepared for _, item in todo]
        )
        self._record_gpu_memory()
        for i, item in todo:  # waiting for admission, a batch and the device, less its own decode
            waited = device_start - jobs[i].enqueued_at - item.timings["decode"]
            item.timings["queue"] = max(0.0, waited)
        finished = await asyncio.gather(
            *(
                loop.run_in_executor(self.pool, self._finish, jobs[i], item, p)
                for (i, item), p in zip(todo, predictions, strict=True)
            )
        )
        for (i, _), outcome in zip(todo, finished, strict=True):
            outcomes[i] = outcome
        return outcomes

    def _unwanted(self, job: Job, abandoned: Abandoned) -> ServiceError | None:
        """Why ``job`` should not run any further (counted as dropped), or None."""
        if self.clock() > job.deadline:
            self.metrics.dropped.labels(reason="deadline").inc()
            return DeadlineExceededError("the request's deadline passed before it was processed")
        if abandoned(job):
            self.metrics.dropped.labels(reason="disconnected").inc()
            return UnavailableError("the client withdrew the request")
        return None

    # -- CPU stages (worker pool) ---------------------------------------------------------------

    def _prepare_if_wanted(self, job: Job, abandoned: Abandoned) -> _Ready | ServiceError:
        dropped = self._unwanted(job, abandoned)
        return dropped if dropped is not None else self._prepare(job)

    def _prepare(self, job: Job) -> _Ready | ServiceError:
        start = time.perf_counter()
        try:
            options = colorize_options(job.options)
            image = decode_image(job.image, max_pixels=self.max_pixels)
            fmt = choose_format(job.options.format, image.format)
            prepared = self.colorizer.prepare(image, options)
        except ServiceError as exc:
            return exc
        except OptionsError as exc:
            return InvalidParameterError(str(exc))
        except UnsupportedImageError as exc:
            return UnsupportedMediaTypeError(str(exc))
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            log.info("request %s: the image could not be decoded: %s", job.request_id, exc)
            return InvalidImageError("the image could not be decoded (corrupt or truncated)")
        except Exception:
            log.exception("request %s: prepare failed", job.request_id)
            return InternalError("preparing the image failed")
        return _Ready(prepared, fmt, {"decode": time.perf_counter() - start})

    def _finish(self, job: Job, ready: _Ready, prediction: Prediction | ServiceError) -> Answer:
        if isinstance(prediction, ServiceError):
            return prediction
        try:
            colorized = self.colorizer.merge(ready.prepared, prediction)
            start = time.perf_counter()
            body, media_type = encode_image(colorized.image, ready.fmt, job.options.quality)
            encode_s = time.perf_counter() - start
        except ServiceError as exc:
            return exc
        except Exception:
            log.exception("request %s: merge/encode failed", job.request_id)
            return InternalError("merging or encoding the result failed")
        timings = {
            **ready.timings,
            "detect": colorized.timings.get("detect", 0.0),
            "instance": colorized.timings.get("instance", 0.0),
            "fusion": colorized.timings.get("fusion", 0.0),
            "merge": colorized.timings.get("merge", 0.0),
            "encode": encode_s,
        }
        self.metrics.observe_stages(timings)
        self.metrics.instances_per_image.observe(len(colorized.boxes))
        return JobResult(
            body=body,
            media_type=media_type,
            boxes=[list(box) for box in colorized.boxes],
            scores=[float(s) for s in colorized.scores],
            timings=timings,
            model_version=self.colorizer.version,
            input_size=list(ready.prepared.source.size),
        )

    # -- device stage (device thread) -----------------------------------------------------------

    def _timed_predict(
        self, batch: list[PreparedImage]
    ) -> tuple[float, list[Prediction | ServiceError]]:
        start = self.clock()
        return start, self._predict_safely(batch)

    def _predict_safely(self, batch: list[PreparedImage]) -> list[Prediction | ServiceError]:
        out_of_memory = False
        try:
            return list(self.colorizer.predict(batch))
        except torch.cuda.OutOfMemoryError:
            out_of_memory = True  # handled below, once the exception's frames are released
        except Exception:
            if len(batch) == 1:
                log.exception("predict failed for one image")
                return [InternalError("inference failed for this image")]
            log.warning("predict failed for a batch of %d; retrying each image alone", len(batch))
            return [result for p in batch for result in self._predict_safely([p])]
        assert out_of_memory
        if self.colorizer.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(batch) == 1:
            log.error("out of device memory for a single image")
            return [InternalError("the device ran out of memory for this image")]
        half = len(batch) // 2
        log.warning("out of device memory for a batch of %d; splitting it", len(batch))
        return self._predict_safely(batch[:half]) + self._predict_safely(batch[half:])

    def _record_gpu_memory(self) -> None:
        device = self.colorizer.device
        if device.type == "cuda":
            self.metrics.gpu_memory.set(torch.cuda.memory_allocated(device))
