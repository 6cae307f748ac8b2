"""What a request brings: the body within its limit, the image part, the boxes and the query."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from fastapi import Request
from fastapi.dependencies.models import Dependant
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from service.core.boxes import BoxesError, validate_boxes
from service.core.errors import (
    InvalidParameterError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
    parse_json_query,
)
from service.core.offload import off_loop_if_large

ACCEPTED_CONTENT_TYPES = "image/* or application/octet-stream"
MAX_NUMBER_CHARS = 32  # digits a boxes number may have (a 4,000-digit integer is refused)


def check_content_type(content_type: str | None) -> None:
    """Refuse (415) a declared media type that is not an image; a missing one is refused too."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media.startswith("image/") or media == "application/octet-stream":
        return
    shown = media or "none"
    raise UnsupportedMediaTypeError(
        f"content type {shown!r} is not an image: send {ACCEPTED_CONTENT_TYPES} "
        "(as the raw body or as the multipart field 'image')"
    )


BODY_TIMED_OUT = "instcolor.body_timed_out"
"""Scope key the server's protocol sets to True when it answered 408 and closed the connection
because the body did not arrive within ``body_timeout_s`` (``service.router.server``)."""


class ClientGone(Exception):
    """The client disconnected before its answer was sent."""


class BodyTimedOut(ClientGone):
    """The body came too slowly: the protocol has answered 408 and closed the connection."""


async def read_body(request: Request, limit: int) -> bytes:
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
        chunks.clear()  # release what was buffered at once
        if request.scope.get(BODY_TIMED_OUT):
            raise BodyTimedOut from None
        raise ClientGone from None
    # bytes.join of a large body releases the GIL for its copy: on a thread the loop runs on
    return await off_loop_if_large(size, b"".join, chunks)


async def image_from_request(request: Request, limit: int) -> bytes:
    """The image bytes: the multipart field ``image``, or the raw body with an image type."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        check_content_type(content_type)
        return await read_body(request, limit)
    body = await read_body(request, limit)

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


def boxes_max_chars(max_boxes: int) -> int:
    """The longest ``boxes`` text accepted (checked before parsing): room for ``max_boxes``
    boxes and their scores with every number at its longest (MAX_NUMBER_CHARS) and ", " between
    them, so any value of the documented schema written that way fits."""
    per_box = 4 * (MAX_NUMBER_CHARS + 2) + 4 + (MAX_NUMBER_CHARS + 2)
    return per_box * (max_boxes + 1)


def parse_boxes(
    text: str | None, max_boxes: int
) -> tuple[list[list[float]] | None, list[float] | None]:
    """``[[x1,y1,x2,y2], ...]`` or ``{"boxes": [...], "scores": [...]}``, within limits.

    The text is parsed within its own limits (length, digits per number, no NaN or Infinity);
    the structure is checked by ``service.core.boxes.validate_boxes``.
    """
    if text is None:
        return None, None
    data = parse_json_query(
        "boxes", text, boxes_max_chars(max_boxes), f"at most {max_boxes} boxes are accepted",
        "see the expected shape",
        parse_int=_json_number, parse_float=_json_number, parse_constant=_json_constant,
    )  # fmt: skip
    try:
        return validate_boxes(data, max_boxes)
    except BoxesError as exc:
        raise InvalidParameterError(str(exc)) from None


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


async def until_disconnected(request: Request) -> None:
    """Returns when the client has gone away (call only after the body was read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
