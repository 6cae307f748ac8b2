"""What goes back: problem+json errors, Accept negotiation, the image or JSON answer."""

from __future__ import annotations

import asyncio
import base64
import logging
import math
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from service.core.api_keys import ANONYMOUS
from service.core.errors import InternalError, ServiceError
from service.core.jobs import JobResult
from service.core.metrics import METRICS, STAGES, outcome_for
from service.core.offload import OFFLOAD_BYTES
from service.router.schemas import PROBLEM_JSON, ColorizeJSON, SampleJSON

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's "client closed request": logged and counted, never sent
INTERNAL_DETAIL = "internal error; quote the request ID when reporting it"


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


def internal_error_response(request: Request, request_id: str, exc: BaseException) -> Response:
    """The 500 problem for an exception no handler took: logged with its traceback, counted."""
    log.error("request %s failed", request_id, exc_info=exc)
    response = problem_response(InternalError(INTERNAL_DETAIL), request_id)
    count_outcome(request, response.status_code)
    return response


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


def server_timing(timings: dict[str, float], model: str | None = None) -> str:
    """``stage;dur=ms`` per stage; with ``model``, each stage says which model it timed
    (``;desc="zhang-eccv16"``)."""
    desc = f';desc="{model}"' if model else ""
    return ", ".join(
        f"{stage};dur={timings[stage] * 1000:.2f}{desc}" for stage in STAGES if stage in timings
    )


def count_outcome(request: Request, status: int, kind: str | None = None) -> None:
    if request.url.path == "/colorize":
        outcome = outcome_for(status, kind)
        METRICS.requests.labels(outcome=outcome, status=str(status)).inc()
        key = str(getattr(request.state, "api_key_name", "") or ANONYMOUS)
        METRICS.requests_by_key.labels(key=key, outcome=outcome).inc()


async def result_response(
    request: Request,
    request_id: str,
    result: JobResult,
    timings: dict[str, float],
    saturation: float,
) -> Response:
    """The image as the body, or JSON with its base64 where Accept asks for it."""
    headers = {
        "X-Instances": str(len(result.boxes)),
        "X-Model": result.model,
        "X-Model-Version": result.model_version,
        "Server-Timing": server_timing(timings, result.model),
    }
    if result.cached:
        headers["X-Cache"] = "hit"
    if result.truncated:  # COLORIZE_ALLOW_TRUNCATED_IMAGES: decoded as far as the data went
        headers["X-Image-Truncated"] = "true"
    if not wants_json(request.headers.get("accept", ""), result.media_type):
        return Response(result.body, media_type=result.media_type, headers=headers)
    if result.seed is not None:  # a sampling model: every sample's base64, off the event loop
        answer = await asyncio.to_thread(
            json_answer,
            request_id,
            result,
            timings,
            saturation,
            base64.b64encode(result.body).decode("ascii"),
        )
        return JSONResponse(answer, headers=headers)
    answer = json_answer(request_id, result, timings, saturation, image_base64="")
    if len(result.body) <= OFFLOAD_BYTES:
        answer["image_base64"] = base64.b64encode(result.body).decode("ascii")
        return JSONResponse(answer, headers=headers)
    # a large answer's base64 is encoded on a worker thread, one piece at a time
    pieces = await asyncio.to_thread(json_pieces, answer, result.body)
    return PiecesResponse(pieces, headers=headers, media_type="application/json")


def json_answer(
    request_id: str,
    result: JobResult,
    timings: dict[str, float],
    saturation: float,
    image_base64: str,
) -> dict[str, Any]:
    return ColorizeJSON(
        request_id=request_id,
        model=result.model,
        model_version=result.model_version,
        media_type=result.media_type,
        image_base64=image_base64,
        instances=len(result.boxes),
        boxes=result.boxes,
        scores=result.scores,
        input_size=result.input_size,
        saturation=saturation,
        timings_ms={k: round(v * 1000, 3) for k, v in timings.items()},
        cached=result.cached,
        truncated=result.truncated,
        seed=result.seed,
        samples=None if result.seed is None else sample_list(result, image_base64),
    ).model_dump()


def sample_list(result: JobResult, first_base64: str) -> list[SampleJSON]:
    """Sample 0 (the body's base64, given or encoded here) and the others."""
    first = first_base64 or base64.b64encode(result.body).decode("ascii")
    return [
        SampleJSON(index=i, image_base64=b64)
        for i, b64 in enumerate([first, *result.samples_base64])
    ]


BASE64_PIECE = 3 * 256 * 1024  # image bytes per base64 piece (1 MiB of base64, about 2 ms)
_IMAGE_FIELD = b'"image_base64":""'


def json_pieces(answer: dict[str, Any], image: bytes) -> list[bytes]:
    """Pieces that join to exactly ``JSONResponse(answer with image_base64)``'s body.

    One ``b64encode`` or ``json.dumps`` of a whole 20 MB image holds the GIL throughout (tens of
    ms in which the event loop cannot run, even from a worker thread); a piece at a time lets the
    loop take the GIL between pieces. ``answer`` has an empty ``image_base64``, filled in here.
    """
    rendered = bytes(JSONResponse({**answer, "image_base64": ""}).body)
    head, tail = rendered.split(_IMAGE_FIELD, 1)
    view = memoryview(image)
    encoded = (
        base64.b64encode(view[i : i + BASE64_PIECE]) for i in range(0, len(view), BASE64_PIECE)
    )  # BASE64_PIECE is a multiple of 3: the pieces' base64 is the whole image's
    return [head + b'"image_base64":"', *encoded, b'"' + tail]


class PiecesResponse(Response):
    """A body sent as several ASGI messages, with its full Content-Length.

    One large message would be copied whole on the event loop (by h11 and the socket transport's
    buffer); pieces are written one at a time, with the transport's flow control between them.
    """

    def __init__(self, pieces: list[bytes], *, headers: dict[str, str], media_type: str) -> None:
        self.pieces = pieces
        super().__init__(b"", headers=headers, media_type=media_type)
        length = str(sum(len(piece) for piece in pieces)).encode("latin-1")
        self.raw_headers = [
            (name, length if name == b"content-length" else value)
            for name, value in self.raw_headers
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        for i, piece in enumerate(self.pieces):
            last = i == len(self.pieces) - 1
            await send({"type": "http.response.body", "body": piece, "more_body": not last})
        if self.background is not None:
            await self.background()
