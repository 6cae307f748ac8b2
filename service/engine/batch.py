"""One batch of jobs through the model: decode and prepare on the CPU pool, one ``predict`` on the
device thread, merge and encode on the CPU pool.

``BatchEngine`` knows nothing of HTTP or queues; the in-process batcher and the Redis worker both
call ``run_batch``. Every job gets its own result or its own ``ServiceError``: a bad image fails
only its job; a CUDA out-of-memory error splits the batch in halves and retries; any other
exception in ``predict`` retries each job alone, so only the job that causes it fails.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from models.boxes import Detections
from models.hints import Hint, HintError
from models.image_input import UnsupportedImageError
from models.merge import Stopped
from models.pipeline import (
    ColorizeOptions,
    OptionsError,
    Prediction,
    PreparedImage,
    StopCheck,
)
from service.core.boxes import BoxesError, validate_boxes
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
from service.core.tracing import JobTrace, job_trace
from service.engine.decode import configure_pil, decode
from service.engine.encode import EncodeStopped, choose_format, encode_image
from service.engine.loading import build_colorizer
from service.engine.threads import apply_thread_plan, thread_plan, usable_cores

if TYPE_CHECKING:
    from models.zoo import ModelColorizer
from service.settings import DEFAULT_MODEL, ServiceSettings

log = logging.getLogger(__name__)

Answer = JobResult | ServiceError  # what the engine gives back per job (the Redis frame's "answer")
Abandoned = Callable[[Job], bool]  # True once nobody waits for the job's answer


def _never(job: Job) -> bool:
    return False


class _Drops:
    """The jobs of one batch dropped so far, each counted once, with the error its caller gets.

    Asked at every stage boundary, from the CPU pool and the device thread (one job is only ever
    in one stage at a time).
    """

    def __init__(self, engine: BatchEngine, abandoned: Abandoned) -> None:
        self.engine = engine
        self.abandoned = abandoned
        self.errors: dict[int, ServiceError] = {}

    def check(self, job: Job) -> ServiceError | None:
        error = self.errors.get(id(job))
        if error is None:
            error = self.engine._unwanted(job, self.abandoned)
            if error is not None:
                self.errors[id(job)] = error
        return error


@dataclass
class _Ready:
    """A job after the CPU stage: what predict needs and what encode will need."""

    prepared: PreparedImage
    fmt: OutputFormat
    timings: dict[str, float]
    truncated: bool = False  # decoded as far as its data went (allow_truncated)


def colorize_options(options: JobOptions) -> ColorizeOptions:
    """Job options as the model's options; bad boxes become 422."""
    boxes = None
    if options.boxes is not None:
        try:
            checked, scores = validate_boxes({"boxes": options.boxes, "scores": options.scores})
        except BoxesError as exc:
            raise InvalidParameterError(f"boxes: {exc}") from exc
        boxes = Detections.from_boxes(checked, scores)
    try:
        hints = tuple(Hint.from_dict(item) for item in options.hints or ())
    except (HintError, KeyError, TypeError, ValueError) as exc:
        raise InvalidParameterError(f"hints: {exc}") from exc
    return ColorizeOptions(
        resolution=options.resolution,
        max_instances=options.max_instances,
        score_threshold=options.score_threshold,
        boxes=boxes,
        saturation=options.saturation,
        samples=options.samples,
        seed=options.seed,
        hints=hints,
        temperature=options.temperature,
    )


class BatchEngine:
    """Runs batches of jobs on one model's colorizer (``models.zoo.ModelColorizer``: any
    registered model); ``close()`` stops its device thread."""

    def __init__(
        self,
        colorizer: ModelColorizer,
        pool: ThreadPoolExecutor,
        metrics: Metrics = METRICS,
        *,
        max_pixels: int,
        allow_truncated: bool = False,
        clock: Callable[[], float] = time.time,
        model: str = DEFAULT_MODEL,
        device_thread: ThreadPoolExecutor | None = None,
    ) -> None:
        """``clock``: what the jobs' ``deadline`` and ``enqueued_at`` are measured on.
        ``device_thread``: shared by the engines of several models on one device (so their
        predicts never interleave); default: the engine's own."""
        self.colorizer = colorizer
        self.model = model
        self.clock = clock
        self.pool = pool
        self.metrics = metrics
        self.max_pixels = max_pixels
        self.allow_truncated = allow_truncated
        # One thread owns the device: predicts never interleave and keep one CUDA stream busy.
        self.owns_device_thread = device_thread is None
        self.device_thread = device_thread or ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="device"
        )
        self.owns_pool = False  # start() hands the engine its own pool, shut down by close()
        configure_pil(max_pixels)
        description = colorizer.describe()
        metrics.set_model_info(
            model_version=colorizer.version,
            device=str(description["device"]),
            precision=str(description["precision"]),
            detector=str(description["detector"] or "none"),
            model=model,
        )

    def describe(self) -> dict[str, Any]:
        """The colorizer's description with the registry's facts (``models.zoo.model_card``)."""
        from models.registry import MODELS
        from models.zoo import model_card

        description = self.colorizer.describe()
        spec = MODELS.get(self.model)
        card = model_card(spec, description) if spec is not None else {}
        return {**description, "model": self.model, "card": card}

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
    async def start(
        cls,
        settings: ServiceSettings,
        metrics: Metrics = METRICS,
        *,
        model: str | None = None,
        device_thread: ThreadPoolExecutor | None = None,
    ) -> BatchEngine:
        """Load ``model``'s weights (default: the settings' default model) as ``settings`` say,
        give the engine its own CPU pool, warm up.

        The one way a serving process (memory-mode server, Redis worker) builds its engine.
        """
        name = model or settings.default_model
        colorizer = await asyncio.to_thread(build_colorizer, settings, name)
        plan = thread_plan(usable_cores(), settings.worker_threads, colorizer.device.type)
        apply_thread_plan(plan)
        log.info("threads: CPU pool %d, torch intra-op %d", plan.pool, plan.intra_op)
        pool = ThreadPoolExecutor(plan.pool, thread_name_prefix="cpu")
        engine = cls(
            colorizer,
            pool,
            metrics,
            max_pixels=settings.max_pixels,
            allow_truncated=settings.allow_truncated_images,
            model=name,
            device_thread=device_thread,
        )
        engine.owns_pool = True
        try:
            if settings.warmup:
                await engine.warmup(*settings.warmup_plan(colorizer.device.type))
        except BaseException:
            engine.close()
            raise
        return engine

    def close(self) -> None:
        if self.owns_device_thread:
            self.device_thread.shutdown(wait=True, cancel_futures=True)
        if self.owns_pool:
            self.pool.shutdown(wait=True, cancel_futures=True)

    async def run_batch(
        self, jobs: Sequence[Job], abandoned: Abandoned | None = None
    ) -> list[Answer]:
        """A result or an error per job, in order; never raises for one job's fault.

        A job past its deadline, or ``abandoned`` (its client left), is dropped at the next stage
        boundary: before decode, before prepare, before the detector and each network (through
        ``Colorizer.predict``'s ``should_stop``), before merge and before encode. Nobody would
        read its answer, so no core keeps working for it.
        """
        if not jobs:
            return []
        traces = [job_trace(j, model=self.colorizer.version, batch_size=len(jobs)) for j in jobs]
        try:
            outcomes = await self._run_batch(jobs, abandoned, traces)
        except BaseException as exc:
            for trace in traces:
                trace.end(exc)
            raise
        for trace, outcome in zip(traces, outcomes, strict=True):
            trace.end(outcome)
        return outcomes

    async def _run_batch(
        self, jobs: Sequence[Job], abandoned: Abandoned | None, traces: Sequence[JobTrace]
    ) -> list[Answer]:
        drops = _Drops(self, abandoned or _never)
        loop = asyncio.get_running_loop()
        self.metrics.batch_size.observe(len(jobs))
        self.metrics.model_batch_size.labels(model=self.model).observe(len(jobs))
        ready = await asyncio.gather(
            *(
                loop.run_in_executor(self.pool, self._prepare_if_wanted, j, drops, t)
                for j, t in zip(jobs, traces, strict=True)
            )
        )
        outcomes: list[Answer] = []
        todo: list[tuple[int, _Ready]] = []
        for i, (job, item) in enumerate(zip(jobs, ready, strict=True)):
            if isinstance(item, ServiceError):  # a bad image, or dropped before decoding
                outcomes.append(item)
                continue
            dropped = drops.check(job)  # expired or withdrawn while decoding
            outcomes.append(dropped or InternalError("not processed"))  # replaced below
            if dropped is None:
                todo.append((i, item))
        if not todo:
            return outcomes
        owner = {id(item.prepared): jobs[i] for i, item in todo}

        def should_stop(prepared: PreparedImage) -> bool:
            return drops.check(owner[id(prepared)]) is not None

        device_start, predictions = await loop.run_in_executor(
            self.device_thread,
            self._timed_predict,
            [item.prepared for _, item in todo],
            should_stop,
        )
        self._record_gpu_memory()
        for i, item in todo:  # waiting for admission, a batch and the device, less its own decode
            waited = device_start - jobs[i].enqueued_at - item.timings["decode"]
            item.timings["queue"] = max(0.0, waited)
        for (i, _), p in zip(todo, predictions, strict=True):
            if isinstance(p, Prediction):
                traces[i].predicted(device_start, p.timings, len(p.boxes))
                if p.fallback:
                    self.metrics.precision_fallbacks.inc()
        finished = await asyncio.gather(
            *(
                loop.run_in_executor(self.pool, self._finish, jobs[i], item, p, drops, traces[i])
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

    def _prepare_if_wanted(self, job: Job, drops: _Drops, trace: JobTrace) -> _Ready | ServiceError:
        dropped = drops.check(job)
        return dropped if dropped is not None else self._prepare(job, drops, trace)

    def _prepare(self, job: Job, drops: _Drops, trace: JobTrace) -> _Ready | ServiceError:
        start = time.perf_counter()
        try:
            options = colorize_options(job.options)
            decoded = decode(
                job.image, max_pixels=self.max_pixels, allow_truncated=self.allow_truncated
            )
            dropped = drops.check(job)
            if dropped is not None:  # expired while decoding: skip the full-resolution L
                return dropped
            fmt = choose_format(job.options.format, decoded.image.format)
            prepared = self.colorizer.prepare(decoded.image, options)
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
        decode_s = time.perf_counter() - start
        trace.decoded(decode_s)
        return _Ready(prepared, fmt, {"decode": decode_s}, truncated=decoded.truncated)

    def _finish(
        self,
        job: Job,
        ready: _Ready,
        prediction: Prediction | ServiceError | None,
        drops: _Drops,
        trace: JobTrace,
    ) -> Answer:
        if isinstance(prediction, ServiceError):
            return prediction
        dropped = drops.check(job)  # stopped in predict (None), or expired since: no merge
        if dropped is not None or prediction is None:
            return dropped or InternalError("the image was stopped in predict")

        def should_stop() -> bool:  # asked between merge chunks and encoder writes
            return drops.check(job) is not None

        try:
            colorized = self.colorizer.merge(ready.prepared, prediction, should_stop)
            dropped = drops.check(job)  # expired during the merge: no encode
            if dropped is not None:
                return dropped
            start = time.perf_counter()
            body, media_type = encode_image(
                colorized.image, ready.fmt, job.options.quality, should_stop
            )
            samples_base64 = [  # a sampling model's further samples, in the same format
                base64.b64encode(
                    encode_image(image, ready.fmt, job.options.quality, should_stop)[0]
                ).decode("ascii")
                for image in colorized.samples
            ]
            encode_s = time.perf_counter() - start
        except (Stopped, EncodeStopped):
            return drops.check(job) or InternalError("stopped without a reason")
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
        trace.finished(timings)
        self.metrics.observe_stages(timings, model=self.model)
        self.metrics.instances_per_image.observe(len(colorized.boxes))
        return JobResult(
            body=body,
            media_type=media_type,
            boxes=[list(box) for box in colorized.boxes],
            scores=[float(s) for s in colorized.scores],
            timings=timings,
            model_version=self.colorizer.version,
            model=self.model,
            input_size=list(ready.prepared.source.size),
            truncated=ready.truncated,
            seed=colorized.seed,
            samples_base64=samples_base64,
        )

    # -- device stage (device thread) -----------------------------------------------------------

    def _timed_predict(
        self, batch: list[PreparedImage], should_stop: StopCheck
    ) -> tuple[float, list[Prediction | ServiceError | None]]:
        start = self.clock()
        return start, self._predict_safely(batch, should_stop)

    def _predict_safely(
        self, batch: list[PreparedImage], should_stop: StopCheck
    ) -> list[Prediction | ServiceError | None]:
        """``predict``; None for an image ``should_stop`` stopped."""
        out_of_memory = False
        try:
            return list(self.colorizer.predict(batch, should_stop))
        except torch.cuda.OutOfMemoryError:
            out_of_memory = True  # handled below, once the exception's frames are released
        except Exception:
            if len(batch) == 1:
                log.exception("predict failed for one image")
                return [InternalError("inference failed for this image")]
            log.warning("predict failed for a batch of %d; retrying each image alone", len(batch))
            return [result for p in batch for result in self._predict_safely([p], should_stop)]
        assert out_of_memory
        if self.colorizer.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(batch) == 1:
            log.error("out of device memory for a single image")
            return [InternalError("the device ran out of memory for this image")]
        half = len(batch) // 2
        log.warning("out of device memory for a batch of %d; splitting it", len(batch))
        return self._predict_safely(batch[:half], should_stop) + self._predict_safely(
            batch[half:], should_stop
        )

    def _record_gpu_memory(self) -> None:
        device = self.colorizer.device
        if device.type == "cuda":
            self.metrics.gpu_memory.set(torch.cuda.memory_allocated(device))
