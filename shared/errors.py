"""Errors as types with stable codes, and how each one settles a message.

A handler never touches the NATS message: it returns (ack) or raises. The error carries
its own retry decision, as Temporal's ``ApplicationError`` does, and ``shared.retry.settle``
is the one place that turns it into a settlement verb:

* ``non_retryable`` set (``PermanentError`` and friends) -> ``term()``; the failure is
  recorded with its code and never retried.
* ``RetryLater``  -> ``nak(next_retry_delay)``: an explicit, expected retry.
* anything else   -> transient: ``nak`` after ``next_retry_delay`` when the error sets it,
  else exponential backoff and jitter, until ``MaxDeliver``, after which it fails with its
  own code when that names a known cause (``shared.retry.KNOWN_TRANSIENT``) or
  ``retries_exhausted``.

Codes are stable strings that users can search for; never rename one.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from shared.events import ErrorInfo


class ErrorCode(StrEnum):
    """Every error code jetcut reports. Stable: add, never rename."""

    INVALID_EVENT = "invalid_event"
    INVALID_INPUT = "invalid_input"
    INVALID_RECIPE = "invalid_recipe"
    INVALID_REQUEST = "invalid_request"
    NO_VIDEO_STREAM = "no_video_stream"
    NO_AUDIO_STREAM = "no_audio_stream"
    UNSUPPORTED_CODEC = "unsupported_codec"
    INPUT_NOT_FOUND = "input_not_found"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    TIMEOUT = "timeout"
    FFMPEG_FAILED = "ffmpeg_failed"
    RETRIES_EXHAUSTED = "retries_exhausted"
    STORE_UNAVAILABLE = "store_unavailable"
    BUS_UNAVAILABLE = "bus_unavailable"
    CANCELLED = "cancelled"
    DISK_FULL = "disk_full"
    LEASE_LOST = "lease_lost"
    NOT_SUPPORTED = "not_supported"
    INTERNAL = "internal"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_ACTIVE_JOBS = "too_many_active_jobs"
    OVERLOADED = "overloaded"
    UNSUPPORTED_FORMAT = "unsupported_format"
    INPUT_TOO_LARGE = "input_too_large"
    INVALID_CALLBACK = "invalid_callback"
    HANDED_BACK = "handed_back"
    OUTPUT_CHECK_FAILED = "output_check_failed"
    OVER_BUDGET = "over_budget"


class JetcutError(Exception):
    """Base of every error jetcut raises on purpose.

    Attributes:
        code: stable, searchable error code.
        message: human-readable explanation, safe to show to the submitter.
        details: small JSON-able context (key, returncode, stderr tail, ...).
        non_retryable: when true the consumer loop terminates the message instead of
            retrying it (the retry policy travels on the error, as in Temporal).
        next_retry_delay: seconds before the retry, when the place that failed knows
            better than the policy's backoff (None: the backoff decides).
    """

    code: ErrorCode = ErrorCode.INTERNAL
    non_retryable: bool = False
    next_retry_delay: float | None = None

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        details: dict[str, Any] | None = None,
        non_retryable: bool | None = None,
        next_retry_delay: float | None = None,
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        if non_retryable is not None:
            self.non_retryable = non_retryable
        if next_retry_delay is not None:
            self.next_retry_delay = next_retry_delay
        self.message = message
        self.details = details or {}

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class PermanentError(JetcutError):
    """Retrying cannot help (bad input, unknown recipe): terminate and record the code."""

    non_retryable = True

    def __init__(
        self, code: ErrorCode, message: str, *, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message, code=code, details=details)


class TransientError(JetcutError):
    """May succeed later (store or bus hiccup, ffmpeg killed by a signal, disk full)."""


class RetryLater(JetcutError):
    """Ask for redelivery after ``delay`` seconds; an expected wait, not a fault (it never
    exhausts the retries: a handler that may give up checks ``Delivery.last`` itself)."""

    def __init__(self, delay: float, message: str = "retry later") -> None:
        super().__init__(message, next_retry_delay=delay)

    @property
    def delay(self) -> float:
        return self.next_retry_delay or 0.0


class MalformedRequest(PermanentError):
    """A request that could not be read at all (not JSON, wrong types, a bad header or
    parameter), as opposed to a well-formed one that asks for something invalid. The code
    is ``invalid_request`` either way; HTTP answers this one 400, the other 422."""

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(ErrorCode.INVALID_REQUEST, message, details=details)


class ObjectNotFound(JetcutError):
    """The object store has no object under the key."""

    code = ErrorCode.NOT_FOUND
    non_retryable = True

    def __init__(self, key: str) -> None:
        super().__init__(f"no object at {key!r}", details={"key": key})
        self.key = key


class NotSupported(PermanentError):
    """The configured backend cannot do this (a presigned URL from the local store)."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.NOT_SUPPORTED, message)


class StoreUnavailable(TransientError):
    """The object store could not be reached or answered with a server error."""

    code = ErrorCode.STORE_UNAVAILABLE


class InvalidKey(PermanentError):
    """An object key that could escape its prefix or was not built from minted ids."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(ErrorCode.INVALID_REQUEST, f"invalid object key {key!r}: {reason}")
        self.key = key


class FFmpegError(JetcutError):
    """ffmpeg or ffprobe failed.

    ``non_retryable`` says who was at fault: the input (true: ``invalid_input``,
    ``no_video_stream``, ...) or the run (false: killed by a signal, disk full, timeout).
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        non_retryable: bool,
        returncode: int | None = None,
        stderr_tail: str = "",
    ) -> None:
        super().__init__(
            message,
            code=code,
            non_retryable=non_retryable,
            details={"returncode": returncode, "stderr_tail": stderr_tail},
        )
        self.returncode = returncode
        self.stderr_tail = stderr_tail


class Cancelled(JetcutError):
    """The job was cancelled while the step ran."""

    code = ErrorCode.CANCELLED
    non_retryable = True


class LeaseLost(Cancelled):
    """This worker no longer holds the task: it was paused or cut off past its AckWait and
    a redelivery took over. Its work is dropped (acked, nothing uploaded or reported)."""

    code = ErrorCode.LEASE_LOST


def error_info(exc: BaseException) -> ErrorInfo:
    """The user-facing form of an exception (unexpected ones become ``internal``)."""
    if isinstance(exc, JetcutError):
        return ErrorInfo(code=str(exc.code), message=exc.message, details=exc.details)
    return ErrorInfo(code=str(ErrorCode.INTERNAL), message=f"{type(exc).__name__}: {exc}")
