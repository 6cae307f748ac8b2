"""The routes: POST /colorize as the request's steps, the probes, /info.

A colorize request is admitted (not draining, queue started), its options are parsed, its image
is read within the body limit, the image header is probed and its shape checked, a job is built,
submitted while the client is watched (a disconnect withdraws the job), and the answer goes back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response

from service.core.errors import InvalidParameterError, ServiceError, UnavailableError
from service.core.hints import parse_hints
from service.core.image_header import check_shape, probe_size
from service.core.jobs import (
    ANNEALED_MEAN_MODELS,
    DEFAULT_MODEL,
    SATURATION_RANGE,
    TEMPERATURE_RANGE,
    Job,
    JobOptions,
    JobResult,
    OutputFormat,
    samples_limit,
    temperature_refusal,
    unknown_model_message,
)
from service.core.metrics import METRICS
from service.core.queue import JobQueue
from service.router.inputs import (
    BodyTimedOut,
    ClientGone,
    image_from_request,
    parse_boxes,
    until_disconnected,
)
from service.router.middleware import request_id_of
from service.router.responses import CLIENT_CLOSED, count_outcome, result_response, wants_json
from service.router.schemas import (
    COLORIZE_BODY,
    IMAGE_CONTENT,
    ColorizeJSON,
    ModelList,
    Status,
    problem_responses,
)
from service.router.state import ServiceState
from service.settings import ServiceSettings

log = logging.getLogger(__name__)

COLORIZE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The colorized image (or JSON with Accept: application/json). "
        "Headers: X-Request-ID, X-Instances, X-Model-Version, Server-Timing "
        "(decode, queue, detect, instance, fusion, merge, encode, total in ms); "
        "X-Image-Truncated: true when COLORIZE_ALLOW_TRUNCATED_IMAGES let a cut-short image through.",
        "content": {**IMAGE_CONTENT, "application/json": {}},
        "model": ColorizeJSON,
    },
    **problem_responses(400, 401, 413, 415, 422, 429, 500, 503, 504),
}


# -- POST /colorize -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ColorizeParams:
    """The query parameters of POST /colorize, as declared by ``colorize_query``."""

    format: OutputFormat | None
    quality: int
    resolution: Literal["original", "network"]
    max_instances: int
    score_threshold: float
    boxes: str | None
    saturation: float
    model: str | None = None
    samples: int = 1
    seed: int | None = None
    hints: str | None = None
    temperature: float | None = None


def colorize_query(
    instance_limit: int, models: list[str] | None = None
) -> Callable[..., ColorizeParams]:
    """The dependency declaring the query (bounds, defaults, descriptions: the OpenAPI).

    A function per app because ``max_instances`` is bounded by this app's ``instance_limit`` and
    ``model`` defaults to this app's first model.
    """
    loaded = models or [DEFAULT_MODEL]
    most_samples = samples_limit(loaded)

    def colorize_params(
        format: Annotated[
            OutputFormat | None,
            Query(description="Output format; default: jpeg for JPEG input, otherwise png."),
        ] = None,
        quality: Annotated[int, Query(ge=1, le=100, description="JPEG/WebP quality.")] = 90,
        resolution: Annotated[
            Literal["original", "network"],
            Query(description="original: input size (ab upsampled); network: 256x256."),
        ] = "original",
        # a default-value Query (not Annotated): its bound and default are this app's limit
        max_instances: int = Query(
            instance_limit,
            ge=0,
            le=instance_limit,
            description="Most instance boxes to colorize separately (0: full image only); "
            f"at most {instance_limit} (COLORIZE_INSTANCE_LIMIT).",
        ),
        score_threshold: Annotated[
            float, Query(ge=0.0, le=1.0, description="Detector score a box needs to be used.")
        ] = 0.7,
        boxes: Annotated[
            str | None,
            Query(
                description='Caller boxes, JSON: [[x1,y1,x2,y2],...] or {"boxes":[...],'
                '"scores":[...]}, in input pixels (after EXIF rotation). Skips the detector.'
            ),
        ] = None,
        saturation: Annotated[
            float,
            Query(
                ge=SATURATION_RANGE[0],
                le=SATURATION_RANGE[1],
                allow_inf_nan=False,
                description="Colour strength: scales the predicted ab before the merge. 1.0: the "
                "model's own colours; 0: grayscale; 2: twice the chroma.",
            ),
        ] = 1.0,
        hints: Annotated[
            str | None,
            Query(
                description='Colour hints, JSON: [{"x":..,"y":..,"color":"#rrggbb","size":3}, ...] '
                "in input pixels (after EXIF rotation); for models that take hints "
                "(zhang-siggraph17)."
            ),
        ] = None,
        model: str = Query(
            loaded[0],
            json_schema_extra={"enum": loaded},
            description="The model to run, one of those this server loaded (GET /models): "
            + ", ".join(loaded)
            + f". Default {loaded[0]}. Another name is refused with 422. Models without the "
            "detector (uses_boxes false) refuse boxes (422) and ignore max_instances and "
            "score_threshold.",
        ),
        # a default-value Query: its bound is what this app's models take
        samples: int = Query(
            1,
            ge=1,
            le=most_samples,
            description=f"Colourings to draw, at most {most_samples} here: only a sampling "
            "model (zhao-pixelated, up to 8) takes more than 1 (others: 422). More than 1 needs "
            "Accept: application/json; the answer's `samples` array holds them. Each sample "
            "costs as much as one request.",
        ),
        seed: Annotated[
            int | None,
            Query(
                ge=0,
                le=2**63 - 1,
                description="A sampling model's seed: the same seed, image and options give the "
                "same samples. Left out: one is drawn and returned as `seed`.",
            ),
        ] = None,
        temperature: Annotated[
            float | None,
            Query(
                ge=TEMPERATURE_RANGE[0],
                le=TEMPERATURE_RANGE[1],
                allow_inf_nan=False,
                description="The annealed mean's temperature T, for the models that decode by it "
                f"({', '.join(ANNEALED_MEAN_MODELS)}; others: 422): softmax(z / T) over the 313 "
                f"bins, then the expectation of the bin colours. {TEMPERATURE_RANGE[0]:g} to "
                f"{TEMPERATURE_RANGE[1]:g}: 1 is the plain mean, smaller is closer to the mode "
                "(more vivid). Left out: the model's default ("
                + ", ".join(f"{m} {t:g}" for m, t in ANNEALED_MEAN_MODELS.items())
                + "; zhang-eccv16's 1 is the authors' PyTorch release, 0.38 the paper's value).",
            ),
        ] = None,
    ) -> ColorizeParams:
        return ColorizeParams(
            format,
            quality,
            resolution,
            max_instances,
            score_threshold,
            boxes,
            saturation,
            model,
            samples,
            seed,
            hints,
            temperature,
        )

    return colorize_params


def admit(state: ServiceState) -> JobQueue:
    """The queue to submit to; 503 while the service starts or drains."""
    if state.draining:
        raise UnavailableError("the service is shutting down", retry_after=1.0)
    if state.queue is None:
        raise UnavailableError("the service is starting", retry_after=1.0)
    return state.queue


def job_options(params: ColorizeParams, max_boxes: int) -> JobOptions:
    """The query as job options; bad boxes or hints are 422."""
    boxes, scores = parse_boxes(params.boxes, max_boxes)
    return JobOptions(
        format=params.format,
        quality=params.quality,
        resolution=params.resolution,
        max_instances=params.max_instances,
        score_threshold=params.score_threshold,
        boxes=boxes,
        scores=scores,
        saturation=params.saturation,
        samples=params.samples,
        seed=params.seed,
        hints=parse_hints(params.hints),
        temperature=params.temperature,
    )


def checked_pixels(image: bytes, settings: ServiceSettings) -> int:
    """Width x height from the image header, refused (413/422) beyond the limits; 0 if unknown."""
    size = probe_size(image)
    if size is None:  # unreadable headers get their precise 400/415 from decoding
        return 0
    check_shape(*size, max_pixels=settings.max_pixels, max_aspect_ratio=settings.max_aspect_ratio)
    return size[0] * size[1]


def build_job(
    request_id: str,
    image: bytes,
    options: JobOptions,
    pixels: int,
    timeout_s: float,
    model: str = DEFAULT_MODEL,
) -> Job:
    now = time.time()
    return Job(
        request_id=request_id,
        image=image,
        options=options,
        deadline=now + timeout_s,
        enqueued_at=now,
        pixels=pixels,
        model=model,
    )


def checked_model(name: str | None, settings: ServiceSettings) -> str:
    """The model a request asks for; 422 naming the loaded ones if it is not one of them."""
    loaded = settings.model_list()
    chosen = loaded[0] if name is None else name  # "" is a name (refused), not "the default"
    if chosen not in loaded:
        raise InvalidParameterError(unknown_model_message(chosen, loaded))
    return chosen


async def submit_watching(request: Request, queue: JobQueue, job: Job) -> JobResult:
    """Submit; if the client disconnects first, withdraw the job (its queue slot is freed)."""
    submit = asyncio.ensure_future(queue.submit(job))
    watch = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({submit, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not submit.done():
            submit.cancel()
        watch.cancel()
    if submit.cancelled() or not submit.done():
        with suppress(asyncio.CancelledError, ServiceError):
            await submit
        raise ClientGone
    return submit.result()


async def respond(
    request: Request, request_id: str, result: JobResult, started: float, saturation: float
) -> Response:
    """The answer, with the total time in Server-Timing and the outcome counted."""
    timings = {**result.timings, "total": time.perf_counter() - started}
    METRICS.stage_duration.labels(stage="total").observe(timings["total"])
    METRICS.model_stage_duration.labels(model=result.model, stage="total").observe(timings["total"])
    response = await result_response(request, request_id, result, timings, saturation)
    count_outcome(request, response.status_code)
    return response


def client_closed(request: Request, request_id: str, when: str = "") -> Response:
    """A client that went away: logged and counted as 499 (nobody reads the answer)."""
    log.info("request %s: client disconnected%s", request_id, f" {when}" if when else "")
    count_outcome(request, CLIENT_CLOSED)
    return Response(status_code=CLIENT_CLOSED)


def install_colorize(app: FastAPI, state: ServiceState) -> None:
    settings = state.settings
    query = Depends(colorize_query(settings.instance_limit, settings.model_list()))

    @app.post(
        "/colorize",
        tags=["colorize"],
        summary="Colorize one image",
        response_class=Response,
        openapi_extra={"requestBody": COLORIZE_BODY},
        responses=COLORIZE_RESPONSES,
    )
    async def colorize(
        request: Request,
        params: ColorizeParams = query,  # not Annotated: the dependency is this app's own
    ) -> Response:
        started = time.perf_counter()
        request_id = request_id_of(request)
        METRICS.in_flight.inc()
        try:
            queue = admit(state)
            model = checked_model(params.model, settings)
            if params.samples > 1 and not wants_json(request.headers.get("accept", ""), "image/*"):
                raise InvalidParameterError(
                    f"samples={params.samples} returns several images: ask for them with "
                    "Accept: application/json (the answer's samples array), or leave samples out"
                )
            refusal = temperature_refusal(model) if params.temperature is not None else None
            if refusal is not None:
                raise InvalidParameterError(refusal)
            options = job_options(params, settings.max_boxes)
            try:
                image = await image_from_request(request, settings.max_body_bytes)
            except BodyTimedOut:  # the server answered 408 and closed the connection
                log.info("request %s: body not received in time (408)", request_id)
                count_outcome(request, 408, "body-timeout")
                return Response(status_code=408)
            except ClientGone:
                return client_closed(request, request_id, "during the upload")
            pixels = checked_pixels(image, settings)
            job = build_job(request_id, image, options, pixels, settings.request_timeout_s, model)
            try:
                result = await submit_watching(request, queue, job)
            except ClientGone:
                return client_closed(request, request_id)
            return await respond(request, request_id, result, started, params.saturation)
        finally:
            METRICS.in_flight.dec()


# -- probes and /info ---------------------------------------------------------------------------


def install_probes(app: FastAPI, state: ServiceState) -> None:
    @app.get(
        "/healthz",
        tags=["operations"],
        response_model=Status,
        responses={503: {"model": Status, "description": "The model failed to load."}},
    )
    async def healthz() -> JSONResponse:
        """Alive: the process answers (503 only if the model can never load)."""
        reason = state.queue.failure() if state.queue is not None else None
        if reason:
            return JSONResponse({"status": "failed", "detail": reason}, status_code=503)
        return JSONResponse({"status": "alive"})

    @app.get(
        "/readyz",
        tags=["operations"],
        response_model=Status,
        responses={503: {"model": Status, "description": "Loading, warming up or draining."}},
    )
    async def readyz() -> JSONResponse:
        """Ready: weights loaded and verified, warm-up done, not draining."""
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        queue = state.queue
        if queue is not None and await queue.ready():
            return JSONResponse({"status": "ready"})
        reason = queue.failure() if queue is not None else None
        status = "failed" if reason else "loading"
        return JSONResponse({"status": status, "detail": reason}, status_code=503)


def batching_info(settings: ServiceSettings) -> dict[str, Any]:
    return {
        # Redis mode: the workers batch (and the API process never loads torch)
        "max_batch_size": (
            settings.max_batch_size
            if settings.queue == "redis"
            else settings.resolved_max_batch_size()
        ),
        "max_batch_delay_ms": settings.max_batch_delay_ms,
        "max_concurrent_batches": settings.max_concurrent_batches,
        "queue_size": settings.queue_size,
        "batch_buckets": settings.batch_buckets() if settings.queue == "memory" else None,
    }


def limits_info(settings: ServiceSettings) -> dict[str, Any]:
    names = ("request_timeout_s", "max_body_bytes", "max_pixels", "max_aspect_ratio", "max_boxes",
             "instance_limit", "max_header_bytes", "header_timeout_s", "keep_alive_timeout_s",
             "max_connections")  # fmt: skip
    return {name: getattr(settings, name) for name in names}


def install_info(app: FastAPI, state: ServiceState) -> None:
    settings = state.settings
    api_keys = bool(settings.api_key_table())

    @app.get("/info", tags=["operations"])
    async def info() -> dict[str, Any]:
        """Model files and sha256, detector, device, precision, batching settings, version."""
        queue = state.queue
        return {
            "service_version": app.version,
            "model": queue.describe() if queue is not None else {},
            "queue": settings.queue,
            "batching": batching_info(settings),
            "limits": limits_info(settings),
            "worker_threads": settings.worker_threads,
            "overload_status": settings.overload_status,
            "api_keys": api_keys,
            "queue_depth": queue.depth() if queue is not None else 0,
        }


def loaded_models(state: ServiceState) -> list[dict[str, Any]]:
    """Each model of ``settings.models`` as ``GET /models`` lists it (``loaded``: ready to run
    here, memory mode, or published by a live worker, Redis mode)."""
    queue = state.queue
    description = queue.describe() if queue is not None else {}
    per_model: dict[str, Any] = description.get("models") or {}
    names = state.settings.model_list()
    if not per_model and description:  # a queue that serves the default model only
        per_model = {names[0]: description}
    listed = []
    for name in names:
        info = per_model.get(name) or {}
        card = dict(info.get("card") or {})
        listed.append(
            {
                "name": name,
                "default": name == names[0],
                "loaded": bool(info.get("model_version")),
                "title": card.get("title"),
                "model_version": info.get("model_version"),
                "input_size": card.get("input_size"),
                "uses_boxes": card.get("uses_boxes"),
                "max_samples": card.get("max_samples"),
                "takes_hints": card.get("takes_hints"),
                "temperature": ANNEALED_MEAN_MODELS.get(name),
                "files": card.get("files") or info.get("files") or [],
                "detector": info.get("detector"),
                "device": info.get("device"),
                "precision": info.get("precision"),
                "paper": card.get("paper"),
            }
        )
    return listed


def install_models(app: FastAPI, state: ServiceState) -> None:
    @app.get("/models", tags=["operations"], response_model=ModelList)
    async def models() -> dict[str, Any]:
        """The models this server serves (POST /colorize?model=NAME): weight file names and
        sha256, input size, whether the model uses boxes; the first is the default."""
        return {"default": state.settings.default_model, "models": loaded_models(state)}


def install_routes(app: FastAPI, state: ServiceState) -> None:
    install_colorize(app, state)
    install_probes(app, state)
    install_info(app, state)
    install_models(app, state)
