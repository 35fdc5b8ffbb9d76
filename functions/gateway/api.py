"""What every gateway route shares: the error shape, views of a job, tenant and job lookup.

Errors always have one shape: ``{error: {code, message, details}}``, and no input of any shape
produces a stack trace (``on_error``).
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, NotFoundException, ValidationException

from shared.errors import ErrorCode, JetcutError, ObjectNotFound
from shared.events import ErrorInfo
from shared.function import Services
from shared.jobstate import JobRecord
from shared.jobstore import JobNotFound

log = logging.getLogger("jetcut.gateway")


CHUNK = 1 << 20


class ApiError(JetcutError):
    """An error answered to the client with an HTTP status."""

    def __init__(self, status: int, code: ErrorCode, message: str,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message, code=code, details=details)
        self.status = status


class UploadView(msgspec.Struct):
    upload_id: str
    key: str
    filename: str
    size: int
    sha256: str


class StepView(msgspec.Struct):
    stage: str
    status: str
    attempt: int
    progress: float
    started_at: float | None
    finished_at: float | None
    error: ErrorInfo | None
    outputs: dict[str, str]
    meta: dict[str, Any]
    skipped: str | None
    deliveries: int = 0
    """Deliveries of the current attempt so far (more than 1: it was retried or taken
    over from a lost worker)."""
    last_error: ErrorInfo | None = None
    """Why the current attempt's last delivery failed, while it is being retried."""


class JobView(msgspec.Struct):
    job_id: str
    status: str
    recipe: str | None
    progress: float
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: ErrorInfo | None
    steps: dict[str, StepView]
    links: dict[str, str]


class OutputView(msgspec.Struct):
    step: str
    name: str
    key: str
    url: str


def error_response(status: int, error: ErrorInfo) -> Response[Any]:
    return Response({"error": msgspec.to_builtins(error)}, status_code=status)


def tenant_of(request: Request[Any, Any, Any]) -> str:
    """The caller's tenant. API keys map to tenants in a later change; until then, one."""
    services: Services = request.app.state.services
    return services.settings.default_tenant


def view(record: JobRecord, base: str) -> JobView:
    return JobView(
        job_id=record.job_id, status=record.status, recipe=record.recipe,
        progress=record.progress, created_at=record.created_at, started_at=record.started_at,
        finished_at=record.finished_at, error=record.error,
        steps={
            name: StepView(stage=s.stage, status=s.status, attempt=s.attempt,
                           progress=s.progress, started_at=s.started_at,
                           finished_at=s.finished_at, error=s.error, outputs=s.outputs,
                           meta=s.meta, skipped=s.skipped,
                           deliveries=max([s.lease, *(p.lease for p in s.parts)]),
                           last_error=s.last_error)
            for name, s in record.steps.items()
        },
        links={"self": f"{base}/v1/jobs/{record.job_id}",
               "outputs": f"{base}/v1/jobs/{record.job_id}/outputs"},
    )


async def load_job(services: Services, tenant: str, job_id: str) -> JobRecord:
    """Another tenant's job is indistinguishable from a missing one (404, never 403)."""
    record, _ = await load_job_revision(services, tenant, job_id)
    return record


async def load_job_revision(services: Services, tenant: str,
                            job_id: str) -> tuple[JobRecord, int]:
    """``load_job`` with the record's KV revision (which names one state of the job)."""
    try:
        found: tuple[JobRecord, int] | None = await services.jobs.get_with_revision(job_id)
    except (JobNotFound, ValueError):
        found = None
    except Exception as exc:  # nats-py rejects malformed keys with its own error types
        if type(exc).__name__ != "InvalidKeyError":
            raise
        found = None
    if found is None or found[0].tenant != tenant:
        raise ApiError(404, ErrorCode.NOT_FOUND, f"no job {job_id!r}")
    return found


def on_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    if isinstance(exc, ApiError):
        return error_response(exc.status, ErrorInfo(code=str(exc.code), message=exc.message,
                                                    details=exc.details))
    if isinstance(exc, ObjectNotFound):
        return error_response(404, ErrorInfo(code=str(ErrorCode.NOT_FOUND),
                                             message="the object is gone from the store"))
    if isinstance(exc, JetcutError):
        status = 422 if exc.non_retryable else 503
        return error_response(status, ErrorInfo(code=str(exc.code), message=exc.message,
                                                details=exc.details))
    if isinstance(exc, ValidationException):
        return error_response(400, ErrorInfo(code=str(ErrorCode.INVALID_REQUEST),
                                             message=str(exc.detail)))
    if isinstance(exc, NotFoundException):
        return error_response(404, ErrorInfo(code=str(ErrorCode.NOT_FOUND),
                                             message="no such resource"))
    if isinstance(exc, HTTPException):
        code = ErrorCode.PAYLOAD_TOO_LARGE if exc.status_code == 413 else \
            ErrorCode.INVALID_REQUEST
        return error_response(exc.status_code, ErrorInfo(code=str(code),
                                                         message=str(exc.detail)))
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, ErrorInfo(code=str(ErrorCode.INTERNAL),
                                         message="internal error; it has been logged"))
