"""How the gateway answers an error: one shape, one table from error code to HTTP status.

Handlers and the code they call raise ``JetcutError``s with stable codes (``shared/errors.py``)
and never pick a status themselves; ``on_error`` answers every exception as
``{error: {code, message, details}}`` with the status ``STATUS`` gives its code. No input of
any shape produces a stack trace: an unexpected exception is logged once, with the request's
trace id, and answered 500 ``internal``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import msgspec
import nats.errors
from litestar import Request, Response
from litestar.exceptions import HTTPException, NotFoundException, ValidationException
from opentelemetry import trace

from shared.errors import (
    ErrorCode,
    JetcutError,
    MalformedRequest,
    ObjectNotFound,
    PermanentError,
    TransientError,
)
from shared.events import ErrorInfo
from shared.retry import TRANSIENT_NATS

log = logging.getLogger("jetcut.gateway")

STATUS: Mapping[ErrorCode, int] = MappingProxyType({
    ErrorCode.INVALID_REQUEST: 422,  # well-formed but invalid; MalformedRequest is 400
    ErrorCode.INVALID_RECIPE: 422,
    ErrorCode.INVALID_INPUT: 422,
    ErrorCode.INVALID_EVENT: 422,
    ErrorCode.INVALID_CALLBACK: 422,
    ErrorCode.INPUT_NOT_FOUND: 422,
    ErrorCode.UNSUPPORTED_CODEC: 422,
    ErrorCode.UNSUPPORTED_FORMAT: 422,
    ErrorCode.NO_VIDEO_STREAM: 422,
    ErrorCode.NO_AUDIO_STREAM: 422,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.INPUT_TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.TOO_MANY_ACTIVE_JOBS: 429,
    ErrorCode.OVER_BUDGET: 429,
    ErrorCode.INTERNAL: 500,
    ErrorCode.NOT_SUPPORTED: 501,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.BUS_UNAVAILABLE: 503,
    ErrorCode.STORE_UNAVAILABLE: 503,
})
"""Every code the gateway answers, and its status. A code missing here is answered 422
when the error says retrying cannot help, else 503."""

REALM = 'Bearer realm="jetcut"'
BUS_TROUBLE = (*TRANSIENT_NATS, nats.errors.ConnectionClosedError,
               nats.errors.OutboundBufferLimitError)
"""NATS errors that mean "not now", wherever in a request they surface."""


class ErrorBody(msgspec.Struct):
    """Every error of every endpoint has this one shape."""

    error: ErrorInfo


class Unauthorized(PermanentError):
    """No key, or one that is not valid: 401 with a ``WWW-Authenticate`` challenge."""

    def __init__(self, message: str, *, invalid_token: bool = True) -> None:
        super().__init__(ErrorCode.UNAUTHORIZED, message)
        self.invalid_token = invalid_token
        """A key was presented but refused (RFC 6750 ``error="invalid_token"``)."""


def status_of(exc: JetcutError) -> int:
    """The HTTP status of a jetcut error (see ``STATUS``)."""
    if isinstance(exc, MalformedRequest):
        return 400
    return STATUS.get(exc.code, 422 if exc.non_retryable else 503)


def headers_of(exc: JetcutError) -> dict[str, str]:
    """``Retry-After`` for an error that says when to retry; the challenge on a 401."""
    headers: dict[str, str] = {}
    retry_after = exc.details.get("retry_after_s")
    if isinstance(retry_after, int | float):
        headers["Retry-After"] = str(int(retry_after))
    if exc.code == ErrorCode.UNAUTHORIZED:
        invalid = getattr(exc, "invalid_token", False)
        headers["WWW-Authenticate"] = f'{REALM}, error="invalid_token"' if invalid else REALM
    return headers


def error_response(status: int, error: ErrorInfo,
                   headers: dict[str, str] | None = None) -> Response[Any]:
    return Response({"error": msgspec.to_builtins(error)}, status_code=status, headers=headers)


def answer(exc: JetcutError) -> Response[Any]:
    """A jetcut error as its HTTP response."""
    return error_response(status_of(exc), ErrorInfo(code=str(exc.code), message=exc.message,
                                                    details=exc.details), headers_of(exc))


def _framework(exc: HTTPException) -> JetcutError:
    """Litestar's own refusals (bad parameter, no route, body too large, wrong method)."""
    if isinstance(exc, ValidationException):
        # ``extra`` names each parameter at fault: [{message, key, source}].
        fields = exc.extra if isinstance(exc.extra, list) else []
        return MalformedRequest(str(exc.detail), details={"fields": fields} if fields else None)
    if isinstance(exc, NotFoundException):
        return PermanentError(ErrorCode.NOT_FOUND, "no such resource")
    code = ErrorCode.PAYLOAD_TOO_LARGE if exc.status_code == 413 else ErrorCode.INVALID_REQUEST
    return JetcutError(str(exc.detail), code=code, non_retryable=True)


def trace_id() -> str | None:
    """The current request's trace id (hex), to find its log line from a 500."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def on_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """Litestar's exception handler for every exception (see the module doc)."""
    if isinstance(exc, ObjectNotFound):  # an output vanished: never echo the store key
        return error_response(404, ErrorInfo(code=str(ErrorCode.NOT_FOUND),
                                             message="the object is gone from the store"))
    if isinstance(exc, JetcutError):
        return answer(exc)
    if isinstance(exc, HTTPException):
        headers = dict(exc.headers or {})
        error = _framework(exc)
        return error_response(exc.status_code, ErrorInfo(code=str(error.code),
                                                         message=error.message,
                                                         details=error.details), headers)
    if isinstance(exc, BUS_TROUBLE):
        # NATS is restarting, electing a leader, or unreachable: the client should retry.
        log.warning("NATS unavailable on %s %s: %r", request.method, request.url.path, exc)
        return answer(TransientError(
            "the job queue is unavailable for a moment; retry (with the same "
            "Idempotency-Key)", code=ErrorCode.BUS_UNAVAILABLE, details={"retry_after_s": 1}))
    found = trace_id()
    log.error("unhandled error on %s %s (trace %s)", request.method, request.url.path, found,
              exc_info=exc)
    return error_response(500, ErrorInfo(code=str(ErrorCode.INTERNAL),
                                         message="internal error; it has been logged",
                                         details={"trace_id": found} if found else {}))

