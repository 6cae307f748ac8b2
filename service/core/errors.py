"""Every error the service returns: one type per kind, mapped to HTTP status in one place.

Errors travel as ``application/problem+json`` (RFC 9457) with a stable ``type`` URI, and between
processes (Redis mode) as the dict from ``to_dict`` / ``from_dict``.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

PROBLEM_BASE = "https://instcolor.dev/problems/"


class ServiceError(Exception):
    """Base class: subclasses fix ``status``, ``kind`` (the problem type's slug) and ``title``."""

    status: ClassVar[int] = 500
    kind: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str, *, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after

    @property
    def type_uri(self) -> str:
        return PROBLEM_BASE + self.kind

    def to_problem(self, request_id: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": self.type_uri,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if request_id is not None:
            body["request_id"] = request_id
        return body

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "detail": self.detail, "retry_after": self.retry_after}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> ServiceError:
        cls = ERROR_KINDS.get(str(data.get("kind")), InternalError)
        return cls(str(data.get("detail", "")), retry_after=data.get("retry_after"))


class InvalidImageError(ServiceError):
    status, kind, title = 400, "invalid-image", "Image could not be decoded"


class TruncatedImageError(InvalidImageError):
    """The data ends before the image its header declares (cut short), whatever it ends with."""

    status, kind, title = 400, "truncated-image", "Image data is truncated"


class PayloadTooLargeError(ServiceError):
    status, kind, title = 413, "payload-too-large", "Request body too large"


class ImageTooLargeError(ServiceError):
    status, kind, title = 413, "image-too-large", "Image has too many pixels"


class UnsupportedMediaTypeError(ServiceError):
    status, kind, title = 415, "unsupported-media-type", "Unsupported media type"


class InvalidParameterError(ServiceError):
    status, kind, title = 422, "invalid-parameter", "Invalid parameter"


def parse_json_query(
    name: str, text: str, max_chars: int, too_long: str, too_deep: str, **loads: Any
) -> Any:
    """A query parameter holding JSON (``boxes``, ``hints``): its length bounded before parsing,
    parse errors and excessive nesting as 422s naming the parameter."""
    if len(text) > max_chars:
        raise InvalidParameterError(f"{name} is {len(text)} characters long; {too_long}")
    try:
        return json.loads(text, **loads)
    except json.JSONDecodeError as exc:
        raise InvalidParameterError(
            f"{name} is not valid JSON ({exc.msg} at character {exc.pos})"
        ) from exc
    except RecursionError:
        raise InvalidParameterError(f"{name} is nested too deeply; {too_deep}") from None


class NotFoundError(ServiceError):
    """No such resource for this API key (another key's batch is not found either)."""

    status, kind, title = 404, "not-found", "Not found"


class LimitExceededError(ServiceError):
    """A per-key limit (open batches, items in open batches) is reached."""

    status, kind, title = 429, "limit-exceeded", "Limit exceeded"


class OverloadedError(ServiceError):
    status, kind, title = 503, "overloaded", "Service overloaded"


class DeadlineExceededError(ServiceError):
    status, kind, title = 504, "deadline-exceeded", "Request deadline exceeded"


class UnavailableError(ServiceError):
    status, kind, title = 503, "unavailable", "Service unavailable"


class NoWorkersError(ServiceError):
    """Redis mode: no worker has sent a heartbeat recently, so nothing would serve the job."""

    status, kind, title = 503, "no-workers", "No live worker"


class ProcessingFailedError(ServiceError):
    """A job failed repeatedly and went to the dead-letter stream (Redis mode)."""

    status, kind, title = 500, "processing-failed", "Processing failed"


class InternalError(ServiceError):
    status, kind, title = 500, "internal", "Internal error"


ERROR_KINDS: dict[str, type[ServiceError]] = {
    cls.kind: cls
    for cls in (
        InvalidImageError, TruncatedImageError, PayloadTooLargeError, ImageTooLargeError, UnsupportedMediaTypeError,
        InvalidParameterError, NotFoundError, LimitExceededError, OverloadedError, DeadlineExceededError, UnavailableError, NoWorkersError,
        ProcessingFailedError, InternalError,
    )
}  # fmt: skip
