"""Errors as types with stable codes, and how each one settles a message.

A handler never touches the NATS message: it returns (ack) or raises. The consumer loop
maps the exception to a settlement verb:

* ``non_retryable`` set (``PermanentError`` and friends) -> ``term()``; the failure is
  recorded with its code and never retried.
* ``RetryLater``  -> ``nak(delay)``: an explicit, expected retry.
* anything else   -> transient: ``nak`` with exponential backoff and jitter until
  ``MaxDeliver``, after which it fails with code ``retries_exhausted``.

Codes are stable strings that users can search for; never rename one.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


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
    OUTPUT_CHECK_FAILED = "output_check_failed"


class JetcutError(Exception):
    """Base of every error jetcut raises on purpose.

    Attributes:
        code: stable, searchable error code.
        message: human-readable explanation, safe to show to the submitter.
        details: small JSON-able context (key, returncode, stderr tail, ...).
        non_retryable: when true the consumer loop terminates the message instead of
            retrying it (the retry policy travels on the error, as in Temporal).
    """

    code: ErrorCode = ErrorCode.INTERNAL
    non_retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        details: dict[str, Any] | None = None,
        non_retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        if non_retryable is not None:
            self.non_retryable = non_retryable
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
    """Ask for redelivery after ``delay`` seconds; an expected wait, not a fault."""

    def __init__(self, delay: float, message: str = "retry later") -> None:
        super().__init__(message)
        self.delay = delay


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
