"""What every gateway route shares: views of a job, the caller, tenant and job lookup.

Errors are answered by ``errors.on_error``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, cast

import msgspec
from litestar import Request
from litestar.connection import ASGIConnection
from litestar.types import Scope

from functions.gateway.errors import Unauthorized
from shared import playback
from shared.errors import ErrorCode, MalformedRequest, PermanentError
from shared.events import CheckResult, ErrorInfo
from shared.function import Services
from shared.jobstate import JobRecord
from shared.jobstore import JobNotFound

CHUNK = 1 << 20


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
    ready_at: float | None = None
    """When the current attempt was queued (its inputs were all ready)."""
    elapsed_s: float | None = None
    """Run time: finished - started, or now - started while it runs."""
    waited_s: float | None = None
    """Time queued before a worker took it: started (or now) - ready."""
    checks: list[CheckResult] = []
    """Output checks of the step's outputs (docs/media.md#output-checks), with ``part`` for
    a part's."""


class QueueSpot(msgspec.Struct):
    """Where a queued job waits (see functions/gateway/queue.py for how it is counted)."""

    stage: str
    """The queue: a stage, or ``submit`` while the conductor has not planned the job."""
    ahead: int
    """Tasks ahead of the job's in that queue (0: it is next)."""
    capped: bool = False
    """True when counting stopped at JETCUT_QUEUE_POSITION_SCAN: at least ``ahead``."""


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
    percent: float = 0.0
    """``progress`` as a percentage, one decimal."""
    queue: QueueSpot | None = None
    """Only on ``GET /v1/jobs/{id}`` of a queued job: its place in the queue."""
    eta_s: float | None = None
    """Only on ``GET /v1/jobs/{id}`` of an active job: predicted seconds until it finishes,
    from the calibrated cost model (``shared/costmodel.py``); null once it has finished."""
    playable_at: float | None = None
    """A progressive ``hls`` job: when its stream became playable (the first part of its
    first rung was encoded); ``null`` until then, and for other jobs."""
    playback_url: str | None = None
    """Where a player starts (an HLS master playlist): the growing stream while the job
    runs, the packaged VOD once it succeeded (docs/recipes/hls.md#playable-in-seconds)."""


class OutputView(msgspec.Struct):
    step: str
    name: str
    key: str
    url: str
    expires_at: float | None = None
    """When a presigned S3 URL stops working; ``null`` for a gateway URL."""


class OutputList(msgspec.Struct):
    job_id: str
    status: str
    outputs: list[OutputView]


SCOPE_KEY = "jetcut"
"""Where the auth guard leaves what it learnt about a request (in the ASGI scope)."""


@dataclass(frozen=True)
class Caller:
    """The authenticated caller of one request (set by ``auth.authenticate``)."""

    tenant: str
    key_id: str | None
    """None for an anonymous caller (``JETCUT_ALLOW_ANONYMOUS``)."""
    admin: bool


def request_state(scope: Scope) -> dict[str, Any]:
    return cast(dict[str, Any], scope).setdefault(SCOPE_KEY, {})


def caller_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Caller | None:
    caller = request_state(connection.scope).get("caller")
    return caller if isinstance(caller, Caller) else None


def tenant_of(request: Request[Any, Any, Any]) -> str:
    """The caller's tenant, from its API key: every read and write is scoped to it.

    Raises:
        Unauthorized: on a route the auth guard did not cover (never a default tenant).
    """
    caller = caller_of(request)
    if caller is None:
        raise Unauthorized("an API key is required", invalid_token=False)
    return caller.tenant


def _span(start: float | None, end: float | None, now: float) -> float | None:
    return None if start is None else round(max(0.0, (end or now) - start), 3)


def view(record: JobRecord, base: str) -> JobView:
    now = time.time()
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
                           last_error=s.last_error, ready_at=s.ready_at,
                           elapsed_s=_span(s.started_at, s.finished_at, now),
                           waited_s=_span(s.ready_at, s.started_at, now)
                           if s.started_at is not None or s.status == "ready" else None,
                           checks=s.checks)
            for name, s in record.steps.items()
        },
        links={"self": f"{base}/v1/jobs/{record.job_id}",
               "outputs": f"{base}/v1/jobs/{record.job_id}/outputs",
               "events": f"{base}/v1/jobs/{record.job_id}/events"},
        percent=round(record.progress * 100, 1),
        playable_at=playback.playable_at(record),
        playback_url=playback.playback_url(record, base),
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
        raise PermanentError(ErrorCode.NOT_FOUND, f"no job {job_id!r}")
    return found


MAX_SEQ = 10**15 - 1
"""The largest stream sequence accepted from a client (15 digits: a stream taking a million
messages a second for 31 years). NATS sequences are unsigned 64-bit and the server answers
a larger number with a parse error, never "not found". Fifteen digits is a bound the
OpenAPI document can state (``SEQ_PATTERN``) and every JSON client reads exactly (a double
holds any integer below 2**53)."""
SEQ_PATTERN = r"^[1-9][0-9]{0,14}$"
"""A stream sequence as a path segment or header: 1..MAX_SEQ, in ASCII digits."""


def stream_seq(value: str, what: str, *, minimum: int = 1) -> int:
    """A stream sequence a client wrote (a path segment, a header): checked at the edge.

    Only ASCII digits count: ``str.isdigit`` is also true for ``"²"``, which ``int``
    refuses.

    Raises:
        MalformedRequest: anything but an integer within ``minimum..MAX_SEQ``.
    """
    if not (value.isascii() and value.isdigit()) or not minimum <= int(value) <= MAX_SEQ:
        raise MalformedRequest(f"{what} must be an integer within {minimum}..{MAX_SEQ}, "
                               f"not {value[:40]!r}")
    return int(value)
