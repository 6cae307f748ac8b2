"""The HTTP API: FastAPI routes over a ``JobQueue``; the queue owns batching, the app only submits.

``create_app(settings)`` builds everything (nothing happens at import). This module never imports
torch: in Redis mode the API process has no model; in memory mode the queue factory loads it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from importlib import metadata
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_fastapi_instrumentator import Instrumentator
from pydantic import BaseModel, Field
from starlette.datastructures import MutableHeaders, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import ANONYMOUS, ApiKeyMiddleware, AuthPolicy, load_api_keys
from service.batcher import JobQueue
from service.decode import check_content_type, check_shape, probe_size
from service.errors import (
    PROBLEM_BASE,
    InternalError,
    InvalidParameterError,
    OverloadedError,
    PayloadTooLargeError,
    ServiceError,
    UnavailableError,
)
from service.jobs import SATURATION_RANGE, Job, JobOptions, JobResult, OutputFormat
from service.metrics import METRICS, STAGES, outcome_for
from service.settings import ServiceSettings
from service.web import install_web_page

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
CLIENT_CLOSED = 499  # nginx's "client closed request": logged and counted, never sent
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
MAX_COORDINATE = 1_000_000.0  # no side of an image within max_pixels is longer
MAX_NUMBER_CHARS = 32  # digits a boxes number may have (a 4,000-digit integer is refused)

QueueFactory = Callable[[ServiceSettings], JobQueue]


def service_version() -> str:
    try:
        return metadata.version("instcolor-service")
    except metadata.PackageNotFoundError:
        return "0+unknown"


# -- response models (OpenAPI) ------------------------------------------------------------------


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str = Field(examples=[PROBLEM_BASE + "invalid-image"])
    title: str
    status: int
    detail: str
    request_id: str | None = None


class ColorizeJSON(BaseModel):
    """The ``Accept: application/json`` answer of POST /colorize."""

    request_id: str
    model_version: str
    media_type: str = Field(description="Media type of the encoded image.")
    image_base64: str = Field(description="The colorized image, base64-encoded.")
    instances: int = Field(description="Number of instance boxes used.")
    boxes: list[list[int]] = Field(description="Boxes used, [x1, y1, x2, y2] in input pixels.")
    scores: list[float]
    input_size: list[int] | None = Field(
        default=None, description="[width, height] of the upright input: the frame of the boxes."
    )
    saturation: float = Field(description="The colour strength applied.")
    timings_ms: dict[str, float] = Field(description="Milliseconds per stage, and total.")
    cached: bool = False


class Status(BaseModel):
    status: str
    detail: str | None = None


def _problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    when = {
        400: "The image could not be decoded (corrupt, truncated, not an image).",
        401: "API keys are on (COLORIZE_API_KEYS) and the request has no valid key; see "
        "WWW-Authenticate.",
        413: "Body over max_body_bytes, or image over max_pixels (checked before decoding).",
        415: "Not an image content type, an unsupported image format, or an animated image.",
        422: "A parameter is out of range or malformed.",
        429: "Queue full (when COLORIZE_OVERLOAD_STATUS=429); see Retry-After.",
        500: "Internal error; the body carries the request ID, never a stack trace.",
        503: "Queue full, estimated work past the deadline, no live worker, model loading or "
        "server draining; see Retry-After.",
        504: "The request's deadline passed before it was served.",
    }
    return {status: {"model": Problem, "description": when[status]} for status in statuses}


# -- state and middleware -----------------------------------------------------------------------


@dataclass
class ServiceState:
    settings: ServiceSettings
    queue: JobQueue | None = None
    draining: bool = False
    started: float = field(default_factory=time.time)

    def begin_drain(self) -> None:
        """Readiness goes 503 and /colorize refuses new work (called on SIGTERM)."""
        if not self.draining:
            log.info("draining: no new work is admitted")
        self.draining = True


class RequestIdMiddleware:
    """Echo a sane ``X-Request-ID`` or generate one; store it in the request state."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = ""
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
        request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)


def _request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", "") or uuid.uuid4().hex)


def problem_response(
    error: ServiceError, request_id: str, status: int | None = None
) -> JSONResponse:
    status = status or error.status
    body = error.to_problem(request_id)
    body["status"] = status
    headers = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


# -- request parsing ----------------------------------------------------------------------------


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    too_large = PayloadTooLargeError(
        f"the request body is over the limit of {limit} bytes; send a smaller image"
    )
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise _ClientGone from None
    return b"".join(chunks)


async def _image_from_request(request: Request, limit: int) -> bytes:
    """The image bytes: the multipart field ``image``, or the raw body with an image type."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        check_content_type(content_type)
        return await _read_body(request, limit)
    body = await _read_body(request, limit)

    async def single_chunk() -> AsyncGenerator[bytes, None]:
        yield body

    parser = MultiPartParser(request.headers, single_chunk(), max_files=4, max_fields=16)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InvalidParameterError(f"malformed multipart body: {exc.message}") from exc
    try:
        part = form.get("image")
        if not isinstance(part, UploadFile):
            raise InvalidParameterError(
                "the multipart body has no file field 'image' (curl -F image=@photo.jpg)"
            )
        check_content_type(part.content_type or "application/octet-stream")
        return await part.read()
    finally:
        await form.close()


def _json_number(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise InvalidParameterError(
            f"boxes holds a number of {len(text)} characters; numbers have at most "
            f"{MAX_NUMBER_CHARS}"
        )
    return float(text)


def _json_constant(name: str) -> float:
    raise InvalidParameterError(f"boxes holds {name}; coordinates and scores must be finite")


def _parse_boxes(
    text: str | None, max_boxes: int
) -> tuple[list[list[float]] | None, list[float] | None]:
    """``[[x1,y1,x2,y2], ...]`` or ``{"boxes": [...], "scores": [...]}``, within limits."""
    if text is None:
        return None, None
    if len(text) > 64 * (max_boxes + 1):
        raise InvalidParameterError(
            f"boxes is {len(text)} characters long; at most {max_boxes} boxes are accepted"
        )
    try:
        data = json.loads(
            text, parse_int=_json_number, parse_float=_json_number, parse_constant=_json_constant
        )
    except json.JSONDecodeError as exc:
        raise InvalidParameterError(
            f"boxes is not valid JSON ({exc.msg} at character {exc.pos})"
        ) from exc
    except RecursionError:
        raise InvalidParameterError("boxes is nested too deeply; see the expected shape") from None
    scores = None
    if isinstance(data, dict):
        scores = data.get("scores")
        data = data.get("boxes")
    if not isinstance(data, list) or not all(
        isinstance(box, list)
        and len(box) == 4
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in box)
        for box in data
    ):
        raise InvalidParameterError(
            'boxes must be a JSON list of [x1, y1, x2, y2] number lists, or {"boxes": [...], '
            '"scores": [...]}'
        )
    if scores is not None and (
        not isinstance(scores, list)
        or len(scores) != len(data)
        or not all(isinstance(s, int | float) and not isinstance(s, bool) for s in scores)
    ):
        raise InvalidParameterError("scores must be a list of numbers, one per box")
    if len(data) > max_boxes:
        raise InvalidParameterError(f"boxes holds {len(data)} boxes; at most {max_boxes}")
    boxes = [[float(v) for v in box] for box in data]
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 <= x1 or y2 <= y1:
            raise InvalidParameterError(f"box {i} must be finite with x2 > x1 and y2 > y1")
        if not all(abs(v) <= MAX_COORDINATE for v in (x1, y1, x2, y2)):
            raise InvalidParameterError(
                f"box {i} has a coordinate beyond +-{MAX_COORDINATE:.0f} pixels"
            )
    return boxes, None if scores is None else [float(s) for s in scores]


def _query_names(dependant: Dependant) -> set[str]:
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


async def reject_unknown_query(request: Request) -> None:
    """422 for a query parameter the route does not declare, naming the ones it does.

    The names come from the route's own declared parameters, so a new ``Query`` parameter is
    accepted as soon as it is added to the route. Routes left out of the API description
    (``include_in_schema=False``, such as a web page) are not checked.
    """
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None or not getattr(route, "include_in_schema", True):
        return  # not an API route (e.g. the web page: links may carry tracking parameters)
    valid = sorted(_query_names(dependant))
    unknown = sorted(set(request.query_params.keys()) - set(valid))
    if unknown:
        names = ", ".join(valid) if valid else "none"
        raise InvalidParameterError(
            f"unknown query parameter{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(u) for u in unknown)}; valid: {names}"
        )


def _accept_quality(accept: str, media_type: str) -> float:
    """The q-value ``accept`` gives ``media_type`` (most specific matching range; 0 if none)."""
    major = media_type.split("/", 1)[0]
    best: tuple[int, float] = (-1, 0.0)
    for item in accept.split(","):
        media, *params = (part.strip() for part in item.split(";"))
        media = media.lower()
        specificity = {media_type: 2, f"{major}/*": 1, "*/*": 0}.get(media)
        if specificity is None:
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = min(1.0, max(0.0, float(value)))
                except ValueError:
                    q = 0.0
        if specificity > best[0]:
            best = (specificity, q)
    return best[1]


def wants_json(accept: str, image_media_type: str) -> bool:
    """JSON only when Accept names it explicitly with q > 0 and no higher q for the image."""
    if "json" not in accept.lower():
        return False
    ranges = [part.split(";", 1)[0].strip().lower() for part in accept.split(",")]
    if "application/json" not in ranges:
        return False
    json_q = _accept_quality(accept, "application/json")
    image_q = max(
        (_accept_quality(accept, image_media_type) for m in ranges if m.startswith("image/")),
        default=0.0,
    )
    return json_q > 0 and json_q >= image_q


async def _until_disconnected(request: Request) -> None:
    """Returns when the client has gone away (call only after the body was read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _ClientGone(Exception):
    pass


async def _submit_watching(request: Request, queue: JobQueue, job: Job) -> JobResult:
    """Submit; if the client disconnects first, withdraw the job (its queue slot is freed)."""
    submit = asyncio.ensure_future(queue.submit(job))
    watch = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({submit, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not submit.done():
            submit.cancel()
        watch.cancel()
    if submit.cancelled() or not submit.done():
        with suppress(asyncio.CancelledError, ServiceError):
            await submit
        raise _ClientGone
    return submit.result()


def _server_timing(timings: dict[str, float]) -> str:
    return ", ".join(
        f"{stage};dur={timings[stage] * 1000:.2f}" for stage in STAGES if stage in timings
    )


# -- the app ------------------------------------------------------------------------------------


def default_queue_factory(settings: ServiceSettings) -> JobQueue:
    """memory: the in-process batcher (loads the model); redis: jobs go to GPU workers."""
    if settings.queue == "redis":
        from service.redis_queue import RedisJobQueue, RedisQueueConfig

        return RedisJobQueue(RedisQueueConfig.from_settings(settings), METRICS)
    from service.batcher import build_memory_queue

    return build_memory_queue(settings)


def create_app(
    settings: ServiceSettings,
    queue_factory: QueueFactory = default_queue_factory,
    *,
    on_fatal: Callable[[str], None] | None = None,
) -> FastAPI:
    """The FastAPI app. ``on_fatal`` is told when the queue can never become ready."""
    state = ServiceState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        queue = queue_factory(settings)  # MissingWeightsError here refuses the start
        state.queue = queue
        await queue.start()
        watcher = asyncio.create_task(_watch_failure(queue, on_fatal))
        try:
            yield
        finally:
            state.begin_drain()
            watcher.cancel()
            await queue.drain()
            await queue.close()
            log.info("drained and closed")

    # FastAPIOffline: /docs (Swagger UI) and /redoc served from files installed with the package,
    # not from a CDN, so the pages work on an offline host.
    app = FastAPIOffline(
        title="InstColor Service",
        version=service_version(),
        description="Instance-aware colorization of grayscale photos (Su, Chu, Huang, CVPR 2020) "
        "with dynamic batching. Errors are application/problem+json.",
        lifespan=lifespan,
        dependencies=[Depends(reject_unknown_query)],
    )
    app.state.service = state
    # Generic HTTP metrics in a registry of this app's own (the instrumentator silently skips a
    # second app on a shared registry); /metrics serves it together with the colorize_* metrics.
    http_registry = CollectorRegistry(auto_describe=True)
    Instrumentator(
        should_group_status_codes=False,
        excluded_handlers=["/metrics"],
        registry=http_registry,
    ).instrument(app)

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus exposition: colorize_* metrics, process metrics and http_* metrics."""
        body = generate_latest(REGISTRY) + generate_latest(http_registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    policy = AuthPolicy(
        load_api_keys(settings.api_keys, settings.api_key_file),
        open_probes=settings.auth_open_probes,
        open_metrics=settings.auth_open_metrics,
    )
    app.add_middleware(ApiKeyMiddleware, policy=policy)
    app.add_middleware(RequestIdMiddleware)  # outside the key check: a 401 has its request ID
    origins = settings.cors_origin_list()
    if origins:  # outermost: preflights are answered before the key check
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "X-Request-ID", "Content-Type"],
            expose_headers=["X-Request-ID", "X-Instances", "X-Model-Version", "Server-Timing",
                            "Retry-After"],
        )  # fmt: skip
    _install_error_handlers(app, state)
    _install_routes(app, state)
    _install_openapi(app)
    install_web_page(app)
    return app


def app_from_env() -> FastAPI:
    """For ``uvicorn --factory service.app:app_from_env``: settings from COLORIZE_* variables."""
    return create_app(ServiceSettings())


async def _watch_failure(queue: JobQueue, on_fatal: Callable[[str], None] | None) -> None:
    wait_loaded = getattr(queue, "wait_loaded", None)  # the memory queue loads in the background
    if wait_loaded is None:
        return
    await wait_loaded()
    reason = queue.failure()
    if reason and on_fatal is not None:
        on_fatal(reason)


def _count(request: Request, status: int, kind: str | None = None) -> None:
    if request.url.path == "/colorize":
        outcome = outcome_for(status, kind)
        METRICS.requests.labels(outcome=outcome, status=str(status)).inc()
        key = str(getattr(request.state, "api_key_name", "") or ANONYMOUS)
        METRICS.requests_by_key.labels(key=key, outcome=outcome).inc()


def _install_error_handlers(app: FastAPI, state: ServiceState) -> None:
    async def service_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)
        status = state.settings.overload_status if isinstance(exc, OverloadedError) else None
        response = problem_response(exc, _request_id(request), status)
        _count(request, response.status_code, exc.kind)
        return response

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        details = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'][1:]) or 'request'}: {err['msg']}"
            for err in exc.errors()
        )
        response = problem_response(InvalidParameterError(details), _request_id(request))
        _count(request, response.status_code)
        return response

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        body = {
            "type": "about:blank",
            "title": str(exc.detail),
            "status": exc.status_code,
            "detail": str(exc.detail),
            "request_id": _request_id(request),
        }
        return JSONResponse(
            body, status_code=exc.status_code, headers=exc.headers, media_type=PROBLEM_JSON
        )

    async def unhandled(request: Request, exc: Exception) -> Response:
        log.error("request %s failed", _request_id(request), exc_info=exc)
        error = InternalError("internal error; quote the request ID when reporting it")
        response = problem_response(error, _request_id(request))
        _count(request, response.status_code)
        return response

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unhandled)


_COLORIZE_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"image": {"type": "string", "format": "binary"}},
                "required": ["image"],
            }
        },
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}

_IMAGE_CONTENT = {
    media: {"schema": {"type": "string", "format": "binary"}}
    for media in ("image/jpeg", "image/png", "image/webp")
}


def _install_routes(app: FastAPI, state: ServiceState) -> None:
    settings = state.settings
    policy_enabled = bool(load_api_keys(settings.api_keys, settings.api_key_file))

    @app.post(
        "/colorize",
        tags=["colorize"],
        summary="Colorize one image",
        response_class=Response,
        openapi_extra={"requestBody": _COLORIZE_BODY},
        responses={
            200: {
                "description": "The colorized image (or JSON with Accept: application/json). "
                "Headers: X-Request-ID, X-Instances, X-Model-Version, Server-Timing "
                "(decode, queue, detect, instance, fusion, merge, encode, total in ms).",
                "content": {**_IMAGE_CONTENT, "application/json": {}},
                "model": ColorizeJSON,
            },
            **_problem_responses(400, 401, 413, 415, 422, 429, 500, 503, 504),
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
        request_id = _request_id(request)
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
            parsed_boxes, parsed_scores = _parse_boxes(boxes, settings.max_boxes)
            try:
                image = await _image_from_request(request, settings.max_body_bytes)
            except _ClientGone:
                log.info("request %s: client disconnected during the upload", request_id)
                _count(request, CLIENT_CLOSED)
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
                result = await _submit_watching(request, queue, job)
            except _ClientGone:
                log.info("request %s: client disconnected", request_id)
                _count(request, CLIENT_CLOSED)
                return Response(status_code=CLIENT_CLOSED)
            timings = {**result.timings, "total": time.perf_counter() - started}
            METRICS.stage_duration.labels(stage="total").observe(timings["total"])
            response = _result_response(request, request_id, result, timings, saturation)
            _count(request, response.status_code)
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


def _result_response(
    request: Request,
    request_id: str,
    result: JobResult,
    timings: dict[str, float],
    saturation: float,
) -> Response:
    headers = {
        "X-Instances": str(len(result.boxes)),
        "X-Model-Version": result.model_version,
        "Server-Timing": _server_timing(timings),
    }
    if result.cached:
        headers["X-Cache"] = "hit"
    if wants_json(request.headers.get("accept", ""), result.media_type):
        body = ColorizeJSON(
            request_id=request_id,
            model_version=result.model_version,
            media_type=result.media_type,
            image_base64=base64.b64encode(result.body).decode("ascii"),
            instances=len(result.boxes),
            boxes=result.boxes,
            scores=result.scores,
            input_size=result.input_size,
            saturation=saturation,
            timings_ms={k: round(v * 1000, 3) for k, v in timings.items()},
            cached=result.cached,
        )
        return JSONResponse(body.model_dump(), headers=headers)
    return Response(result.body, media_type=result.media_type, headers=headers)


def _install_openapi(app: FastAPI) -> None:
    """Error responses are documented as application/problem+json, not application/json."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                for status, response in operation.get("responses", {}).items():
                    content = response.get("content", {})
                    is_error = status.isdigit() and int(status) >= 400
                    problem = "Problem" in json.dumps(content.get("application/json", {}))
                    if is_error and problem:
                        content[PROBLEM_JSON] = content.pop("application/json")
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


__all__ = ["ServiceState", "app_from_env", "create_app", "problem_response"]
