"""The routes: POST /colorize, the probes, /info."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import suppress
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response

from service.core.api_keys import load_api_keys
from service.core.errors import (
    InternalError,
    InvalidParameterError,
    ServiceError,
    UnavailableError,
)
from service.core.image_header import check_shape, probe_size
from service.core.jobs import SATURATION_RANGE, Job, JobOptions, JobResult, OutputFormat
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
from service.router.responses import CLIENT_CLOSED, count_outcome, result_response
from service.router.schemas import (
    COLORIZE_BODY,
    IMAGE_CONTENT,
    ColorizeJSON,
    Status,
    problem_responses,
)
from service.router.state import ServiceState

log = logging.getLogger(__name__)


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


def install_routes(app: FastAPI, state: ServiceState) -> None:
    settings = state.settings
    policy_enabled = bool(load_api_keys(settings.api_keys, settings.api_key_file))

    @app.post(
        "/colorize",
        tags=["colorize"],
        summary="Colorize one image",
        response_class=Response,
        openapi_extra={"requestBody": COLORIZE_BODY},
        responses={
            200: {
                "description": "The colorized image (or JSON with Accept: application/json). "
                "Headers: X-Request-ID, X-Instances, X-Model-Version, Server-Timing "
                "(decode, queue, detect, instance, fusion, merge, encode, total in ms); "
                "X-Image-Truncated: true when COLORIZE_ALLOW_TRUNCATED_IMAGES let a cut-short "
                "image through.",
                "content": {**IMAGE_CONTENT, "application/json": {}},
                "model": ColorizeJSON,
            },
            **problem_responses(400, 401, 413, 415, 422, 429, 500, 503, 504),
        },
    )
    async def colorize(
        request: Request,
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
            settings.instance_limit,
            ge=0,
            le=settings.instance_limit,
            description="Most instance boxes to colorize separately (0: full image only); "
            f"at most {settings.instance_limit} (COLORIZE_INSTANCE_LIMIT).",
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
    ) -> Response:
        started = time.perf_counter()
        request_id = request_id_of(request)
        METRICS.in_flight.inc()
        try:
            if state.draining:
                raise UnavailableError("the service is shutting down", retry_after=1.0)
            queue = state.queue
            if queue is None:
                raise UnavailableError("the service is starting", retry_after=1.0)
            if max_instances > settings.instance_limit:
                raise InvalidParameterError(
                    f"max_instances must be between 0 and {settings.instance_limit}, "
                    f"got {max_instances}"
                )
            parsed_boxes, parsed_scores = parse_boxes(boxes, settings.max_boxes)
            try:
                image = await image_from_request(request, settings.max_body_bytes)
            except ClientGone as gone:
                if isinstance(gone, BodyTimedOut):  # the server answered 408 and closed
                    log.info("request %s: body not received in time (408)", request_id)
                    count_outcome(request, 408, "body-timeout")
                    return Response(status_code=408)
                log.info("request %s: client disconnected during the upload", request_id)
                count_outcome(request, CLIENT_CLOSED)
                return Response(status_code=CLIENT_CLOSED)
            size = probe_size(image)
            if size is not None:  # unreadable headers get their precise 400/415 from decoding
                check_shape(
                    *size,
                    max_pixels=settings.max_pixels,
                    max_aspect_ratio=settings.max_aspect_ratio,
                )
            pixels = size[0] * size[1] if size is not None else 0
            now = time.time()
            job = Job(
                request_id=request_id,
                image=image,
                options=JobOptions(
                    format=format,
                    quality=quality,
                    resolution=resolution,
                    max_instances=max_instances,
                    score_threshold=score_threshold,
                    boxes=parsed_boxes,
                    scores=parsed_scores,
                    saturation=saturation,
                ),
                deadline=now + settings.request_timeout_s,
                enqueued_at=now,
                pixels=pixels,
            )
            try:
                result = await submit_watching(request, queue, job)
            except ClientGone:
                log.info("request %s: client disconnected", request_id)
                count_outcome(request, CLIENT_CLOSED)
                return Response(status_code=CLIENT_CLOSED)
            timings = {**result.timings, "total": time.perf_counter() - started}
            METRICS.stage_duration.labels(stage="total").observe(timings["total"])
            response = result_response(request, request_id, result, timings, saturation)
            count_outcome(request, response.status_code)
            return response
        except ServiceError:
            raise
        except Exception as exc:
            log.error("request %s failed", request_id, exc_info=exc)
            raise InternalError("internal error; quote the request ID when reporting it") from exc
        finally:
            METRICS.in_flight.dec()

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

    @app.get("/info", tags=["operations"])
    async def info() -> dict[str, Any]:
        """Model files and sha256, detector, device, precision, batching settings, version."""
        model = state.queue.describe() if state.queue is not None else {}
        return {
            "service_version": app.version,
            "model": model,
            "queue": settings.queue,
            "batching": {
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
            },
            "limits": {
                "request_timeout_s": settings.request_timeout_s,
                "max_body_bytes": settings.max_body_bytes,
                "max_pixels": settings.max_pixels,
                "max_aspect_ratio": settings.max_aspect_ratio,
                "max_boxes": settings.max_boxes,
                "instance_limit": settings.instance_limit,
                "max_header_bytes": settings.max_header_bytes,
                "header_timeout_s": settings.header_timeout_s,
                "keep_alive_timeout_s": settings.keep_alive_timeout_s,
                "max_connections": settings.max_connections,
            },
            "worker_threads": settings.worker_threads,
            "overload_status": settings.overload_status,
            "api_keys": policy_enabled,
            "queue_depth": state.queue.depth() if state.queue is not None else 0,
        }
