"""What goes back: problem+json errors, Accept negotiation, the image or JSON answer."""

from __future__ import annotations

import base64
import math

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from service.core.api_keys import ANONYMOUS
from service.core.errors import (
    ServiceError,
)
from service.core.jobs import JobResult
from service.core.metrics import METRICS, STAGES, outcome_for
from service.router.schemas import PROBLEM_JSON, ColorizeJSON

CLIENT_CLOSED = 499  # nginx's "client closed request": logged and counted, never sent


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


def server_timing(timings: dict[str, float]) -> str:
    return ", ".join(
        f"{stage};dur={timings[stage] * 1000:.2f}" for stage in STAGES if stage in timings
    )


def count_outcome(request: Request, status: int, kind: str | None = None) -> None:
    if request.url.path == "/colorize":
        outcome = outcome_for(status, kind)
        METRICS.requests.labels(outcome=outcome, status=str(status)).inc()
        key = str(getattr(request.state, "api_key_name", "") or ANONYMOUS)
        METRICS.requests_by_key.labels(key=key, outcome=outcome).inc()


def result_response(
    request: Request,
    request_id: str,
    result: JobResult,
    timings: dict[str, float],
    saturation: float,
) -> Response:
    headers = {
        "X-Instances": str(len(result.boxes)),
        "X-Model-Version": result.model_version,
        "Server-Timing": server_timing(timings),
    }
    if result.cached:
        headers["X-Cache"] = "hit"
    if result.truncated:  # COLORIZE_ALLOW_TRUNCATED_IMAGES: decoded as far as the data went
        headers["X-Image-Truncated"] = "true"
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
            truncated=result.truncated,
        )
        return JSONResponse(body.model_dump(), headers=headers)
    return Response(result.body, media_type=result.media_type, headers=headers)
