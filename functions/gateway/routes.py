"""HTTP routes of the gateway. Errors always have one shape: {error: {code, message, details}}."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import time
import unicodedata
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from litestar import Litestar, Request, Response, delete, get, post
from litestar.exceptions import HTTPException, NotFoundException, ValidationException
from litestar.params import FromPath, FromQuery, QueryParameter
from litestar.response import Stream
from opentelemetry.trace import SpanKind

from shared import dlq
from shared.bus import PublishFailed
from shared.errors import ErrorCode, JetcutError, ObjectNotFound
from shared.events import ErrorInfo, InputRef, JobCancel, JobRetry, JobSubmit, StepSpec
from shared.function import Services
from shared.ids import job_id_for, new_job_id, new_upload_id
from shared.jobstate import JobRecord
from shared.jobstore import JobNotFound
from shared.recipes import resolve

log = logging.getLogger(__name__)
CHUNK = 1 << 20


class ApiError(JetcutError):
    """An error answered to the client with an HTTP status."""

    def __init__(self, status: int, code: ErrorCode, message: str,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message, code=code, details=details)
        self.status = status


class JobRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of POST /v1/jobs: a recipe (or inline steps) and the uploads it works on."""

    recipe: str | None = None
    steps: dict[str, StepSpec] | None = None
    input: str | None = None
    """An upload id (``u...``) or a store key under ``uploads/<tenant>/``."""
    inputs: list[str] = []
    params: dict[str, Any] = {}


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


def safe_filename(name: str) -> str:
    """A display name only (keys are built from minted ids); still keep it boring."""
    name = unicodedata.normalize("NFKC", os.path.basename(name.replace("\\", "/")))
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "upload"
    return name[:100]


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


@post("/v1/uploads", request_max_body_size=None, status_code=201)
async def upload(
    request: Request[Any, Any, Any], filename: FromQuery[str] = "upload"
) -> UploadView:
    services: Services = request.app.state.services
    tenant = tenant_of(request)
    limit = services.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, ErrorCode.PAYLOAD_TOO_LARGE, f"uploads are limited to {limit} bytes")
    upload_id = new_upload_id()
    name = safe_filename(filename)
    key = f"uploads/{tenant}/{upload_id}/{name}"
    digest = hashlib.sha256()
    size = 0
    # Spool to disk, never to memory: multi-GB uploads use constant memory.
    with tempfile.NamedTemporaryFile(dir=services.settings.work_dir, prefix="upload-") as spool:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, ErrorCode.PAYLOAD_TOO_LARGE,
                               f"uploads are limited to {limit} bytes")
            digest.update(chunk)
            spool.write(chunk)
        spool.flush()
        if size == 0:
            raise ApiError(400, ErrorCode.INVALID_REQUEST, "the upload is empty")
        await services.store.put_file(key, spool.name)
    return UploadView(upload_id=upload_id, key=key, filename=name, size=size,
                      sha256=digest.hexdigest())


async def resolve_input(services: Services, tenant: str, ref: str) -> InputRef:
    prefix = f"uploads/{tenant}/"
    if ref.startswith(prefix):
        key = ref
    elif re.fullmatch(r"u[a-z2-7]{26}", ref):
        found = await services.store.list(f"{prefix}{ref}/")
        if not found:
            raise ApiError(422, ErrorCode.INPUT_NOT_FOUND, f"no upload {ref!r}")
        key = found[0].key
    else:
        raise ApiError(422, ErrorCode.INVALID_REQUEST,
                       f"input {ref!r} must be an upload id or a key under {prefix}")
    try:
        info = await services.store.stat(key)
    except (ObjectNotFound, JetcutError):
        raise ApiError(422, ErrorCode.INPUT_NOT_FOUND, f"no upload at {key!r}") from None
    return InputRef(key=key, filename=key.rsplit("/", 1)[-1], size=info.size)


MAX_JOB_BODY_BYTES = 1_000_000
"""A job request is a recipe and references, never media: kept far below NATS's payload cap."""


@post("/v1/jobs", status_code=202, request_max_body_size=MAX_JOB_BODY_BYTES)
async def submit(request: Request[Any, Any, Any]) -> Response[Any]:
    """Each job is one trace: it starts here (or joins the caller's ``traceparent``)."""
    services: Services = request.app.state.services
    telemetry = services.telemetry
    with telemetry.tracer.start_as_current_span(
        "POST /v1/jobs", context=telemetry.extract(dict(request.headers)),
        kind=SpanKind.SERVER,
    ) as span:
        response = await _submit(request, services)
        if isinstance(response.content, dict) and "job_id" in response.content:
            span.set_attribute("jetcut.job_id", response.content["job_id"])
        return response


async def _submit(request: Request[Any, Any, Any], services: Services) -> Response[Any]:
    tenant = tenant_of(request)
    try:
        body = msgspec.json.decode(await request.body(), type=JobRequest)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ApiError(400, ErrorCode.INVALID_REQUEST, f"bad job request: {exc}") from exc
    refs = ([body.input] if body.input else []) + list(body.inputs)
    if not refs:
        raise ApiError(422, ErrorCode.INVALID_REQUEST, "a job needs 'input' or 'inputs'")
    resolve(body.recipe, body.steps, body.params, len(refs))  # invalid_recipe before queueing
    inputs = [await resolve_input(services, tenant, ref) for ref in refs]
    idem = request.headers.get("idempotency-key")
    if idem is not None and not 1 <= len(idem) <= 255:
        raise ApiError(400, ErrorCode.INVALID_REQUEST, "Idempotency-Key must be 1-255 chars")
    job_id = job_id_for(tenant, idem) if idem else new_job_id()
    fingerprint = hashlib.sha256(msgspec.json.encode(
        [body.recipe, body.steps, [i.key for i in inputs], body.params], order="sorted"
    )).hexdigest()
    now = time.time()
    record = JobRecord(job_id=job_id, tenant=tenant, recipe=body.recipe, inputs=inputs,
                       params=body.params, pipeline=body.steps, idempotency_key=idem,
                       request_hash=fingerprint, created_at=now)
    event = JobSubmit(job_id=job_id, tenant=tenant, recipe=body.recipe, steps=body.steps,
                      inputs=inputs, params=body.params, idempotency_key=idem,
                      submitted_at=now)
    if await services.jobs.create(record) is None:
        record = await load_job(services, tenant, job_id)
        if record.request_hash != fingerprint:
            raise ApiError(409, ErrorCode.CONFLICT,
                           "this Idempotency-Key was used for a different request",
                           {"job_id": job_id})
        if record.planned or record.status != "queued":
            return Response(msgspec.to_builtins(view(record, services.settings.base_url)),
                            status_code=200)
        # Accepted before but maybe never queued (a 503, or a crash before the publish):
        # publish again; the message id makes this a no-op if the first one landed.
        event = msgspec.structs.replace(event, submitted_at=record.created_at)
    try:
        await services.bus.publish(services.names.submit, event, msg_id=job_id)
    except PublishFailed as exc:
        if idem is None:
            await services.jobs.delete(job_id)  # nobody can name this job: leave no trace
        raise ApiError(503, ErrorCode.BUS_UNAVAILABLE,
                       "the job queue is unavailable; retry (with the same Idempotency-Key)",
                       {"retry_after_s": 1}) from exc
    return Response(msgspec.to_builtins(view(record, services.settings.base_url)),
                    status_code=202,
                    headers={"Location": f"{services.settings.base_url}/v1/jobs/{job_id}"})


@get("/v1/jobs/{job_id:str}")
async def get_job(request: Request[Any, Any, Any], job_id: FromPath[str]) -> JobView:
    services: Services = request.app.state.services
    record = await load_job(services, tenant_of(request), job_id)
    return view(record, services.settings.base_url)


@delete("/v1/jobs/{job_id:str}", status_code=202)
async def cancel(request: Request[Any, Any, Any], job_id: FromPath[str]) -> Response[Any]:
    """Cancel a queued or running job: 202, and the job is ``cancelled`` within moments;
    a finished job is 409 with its state."""
    services: Services = request.app.state.services
    record = await load_job(services, tenant_of(request), job_id)
    if record.terminal:
        raise ApiError(409, ErrorCode.CONFLICT, f"job {job_id} already {record.status}",
                       {"status": str(record.status)})
    reason = request.query_params.get("reason", "cancelled on request")[:200]
    try:
        await services.bus.publish(services.names.cancel,
                                   JobCancel(job_id=job_id, tenant=record.tenant, reason=reason),
                                   msg_id=f"{job_id}:cancel")
    except PublishFailed as exc:
        raise ApiError(503, ErrorCode.BUS_UNAVAILABLE, "could not cancel now; retry",
                       {"retry_after_s": 1}) from exc
    return Response({"job_id": job_id, "status": "cancelling"}, status_code=202)


@post("/v1/jobs/{job_id:str}", status_code=202)
async def job_action(request: Request[Any, Any, Any], job_id: FromPath[str]) -> Response[Any]:
    """``POST /v1/jobs/{id}:retry``. Litestar matches whole path segments only, so the
    segment is ``<id>:<action>`` and is split here (Google's custom-method style)."""
    target, _, action = job_id.rpartition(":")
    if action != "retry" or not target:
        raise ApiError(404, ErrorCode.NOT_FOUND, "no such resource; did you mean "
                       "POST /v1/jobs/{job_id}:retry?")
    return await retry_job(request, target)


async def retry_job(request: Request[Any, Any, Any], job_id: str) -> Response[Any]:
    """Run a failed or cancelled job again from its checkpoints: 202 with the job as it is
    now (the conductor sets it running within moments). Anything else is 409.

    The message id is the record's revision: a double click, or a client retrying the
    request, is one retry; a retry of the job after it failed again is a new one.
    """
    services: Services = request.app.state.services
    record, revision = await load_job_revision(services, tenant_of(request), job_id)
    status = str(record.status)
    if status not in ("failed", "cancelled"):
        raise ApiError(409, ErrorCode.CONFLICT,
                       f"job {job_id} is {status}: only a failed or cancelled job can be retried",
                       {"status": status})
    if not record.planned:
        code = record.error.code if record.error else None
        raise ApiError(409, ErrorCode.CONFLICT,
                       f"job {job_id} failed before it was planned ({code}): nothing can "
                       "resume; fix the request and submit again",
                       {"status": status, "error_code": code})
    reason = request.query_params.get("reason", "retried on request")[:200]
    event = JobRetry(job_id=job_id, tenant=record.tenant, mode="failed", reason=reason)
    try:
        await services.bus.publish(services.names.retry, event,
                                   msg_id=f"retry:{job_id}:{revision}")
    except PublishFailed as exc:
        raise ApiError(503, ErrorCode.BUS_UNAVAILABLE, "could not retry now; retry",
                       {"retry_after_s": 1}) from exc
    return Response(msgspec.to_builtins(view(record, services.settings.base_url)),
                    status_code=202,
                    headers={"Location": f"{services.settings.base_url}/v1/jobs/{job_id}"})


@get("/v1/jobs/{job_id:str}/outputs")
async def list_outputs(request: Request[Any, Any, Any], job_id: FromPath[str]) -> dict[str, Any]:
    services: Services = request.app.state.services
    record = await load_job(services, tenant_of(request), job_id)
    base = services.settings.base_url
    outputs = [
        OutputView(step=step, name=name, key=key,
                   url=f"{base}/v1/jobs/{job_id}/outputs/{step}/{name}")
        for step, state in record.steps.items() for name, key in state.outputs.items()
    ]
    return {"job_id": job_id, "status": record.status, "outputs": msgspec.to_builtins(outputs)}


@get("/v1/jobs/{job_id:str}/outputs/{step:str}/{name:str}")
async def download(request: Request[Any, Any, Any], job_id: FromPath[str], step: FromPath[str],
                   name: FromPath[str]) -> Stream:
    services: Services = request.app.state.services
    record = await load_job(services, tenant_of(request), job_id)
    state = record.steps.get(step)
    key = state.outputs.get(name) if state else None
    if key is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, f"job {job_id} has no output {step}/{name}")
    info = await services.store.stat(key)
    filename = key.rsplit("/", 1)[-1]

    async def body() -> AsyncIterator[bytes]:
        async for chunk in services.store.iter_chunks(key, CHUNK):
            yield chunk

    return Stream(body(), media_type=info.content_type or "application/octet-stream",
                  headers={"Content-Length": str(info.size),
                           "Content-Disposition": f'attachment; filename="{filename}"'})


# --- DLQ (admin) ---------------------------------------------------------------------------
# Admin-scoped: entries belong to every tenant. Until API keys and tenants arrive (issue 5)
# every caller is the default tenant; then these endpoints take an admin key.


def _dlq_seq(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise ApiError(400, ErrorCode.INVALID_REQUEST,
                       f"a DLQ entry is named by its sequence, a positive integer, not {value!r}")
    return int(value)


def _dlq_error(exc: JetcutError) -> ApiError:
    status = {ErrorCode.NOT_FOUND: 404, ErrorCode.CONFLICT: 409}.get(exc.code, 503)
    return ApiError(status, exc.code, exc.message, exc.details)


@get("/v1/dlq")
async def dlq_list(request: Request[Any, Any, Any], function: FromQuery[str | None] = None,
                   after: FromQuery[int] = 0, limit: FromQuery[int] = 50) -> Response[Any]:
    """Dead letters, oldest first, ``limit`` at a time after sequence ``after``."""
    services: Services = request.app.state.services
    try:
        page = await dlq.list_entries(services, function=function or None, after=after,
                                      limit=limit)
    except ValueError as exc:
        raise ApiError(400, ErrorCode.INVALID_REQUEST, str(exc)) from exc
    return Response(msgspec.to_builtins(page))


@get("/v1/dlq/{seq:str}")
async def dlq_show(request: Request[Any, Any, Any], seq: FromPath[str]) -> Response[Any]:
    services: Services = request.app.state.services
    try:
        entry = await dlq.get_entry(services, _dlq_seq(seq))
    except (dlq.EntryNotFound, dlq.ReplayConflict) as exc:
        raise _dlq_error(exc) from exc
    return Response(msgspec.to_builtins(entry))


@post("/v1/dlq/{seq:str}", status_code=200)
async def dlq_action(request: Request[Any, Any, Any], seq: FromPath[str]) -> Response[Any]:
    """``POST /v1/dlq/{seq}:replay`` (see ``job_action`` for the path shape)."""
    services: Services = request.app.state.services
    target, _, action = seq.rpartition(":")
    if action != "replay":
        raise ApiError(404, ErrorCode.NOT_FOUND, "no such resource; did you mean "
                       "POST /v1/dlq/{seq}:replay?")
    try:
        result = await dlq.replay(services, _dlq_seq(target))
    except (dlq.EntryNotFound, dlq.ReplayConflict) as exc:
        raise _dlq_error(exc) from exc
    return Response(msgspec.to_builtins(result))


@delete("/v1/dlq/{seq:str}", status_code=200)
async def dlq_delete(request: Request[Any, Any, Any], seq: FromPath[str]) -> Response[Any]:
    services: Services = request.app.state.services
    try:
        purged = await dlq.purge_entry(services, _dlq_seq(seq))
    except dlq.EntryNotFound as exc:
        raise _dlq_error(exc) from exc
    return Response({"purged": purged})


@delete("/v1/dlq", status_code=200)
async def dlq_purge(
    request: Request[Any, Any, Any], function: FromQuery[str | None] = None,
    purge_all: Annotated[bool, QueryParameter(name="all")] = False,
) -> Response[Any]:
    """Purge one function's entries (``?function=``) or, only when asked with ``?all=true``,
    every entry: an empty query must never wipe the DLQ."""
    services: Services = request.app.state.services
    if not function and not purge_all:
        raise ApiError(400, ErrorCode.INVALID_REQUEST,
                       "say what to purge: ?function=<name>, or ?all=true for every entry")
    try:
        purged = await dlq.purge(services, function=function or None)
    except ValueError as exc:
        raise ApiError(400, ErrorCode.INVALID_REQUEST, str(exc)) from exc
    return Response({"purged": purged, "function": function or None})


DLQ_ROUTES = [dlq_list, dlq_show, dlq_action, dlq_delete, dlq_purge]


@get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz")
async def readyz(request: Request[Any, Any, Any]) -> Response[Any]:
    services: Services = request.app.state.services
    checks: dict[str, str] = {}
    checks["nats"] = "ok" if services.bus.nc.is_connected else "disconnected"
    try:
        await services.store.check()
        checks["store"] = "ok"
    except Exception as exc:
        checks["store"] = f"error: {exc}"
    ready = all(v == "ok" for v in checks.values())
    return Response({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


@get("/metrics", media_type="text/plain; version=0.0.4")
async def metrics(request: Request[Any, Any, Any]) -> bytes:
    services: Services = request.app.state.services
    return services.telemetry.metrics_text()


def _on_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
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


def build_app(services: Services) -> Litestar:
    app = Litestar(
        route_handlers=[upload, submit, get_job, cancel, job_action, list_outputs, download,
                        *DLQ_ROUTES, healthz, readyz, metrics],
        exception_handlers={Exception: _on_error},
        debug=False,
    )
    app.state.services = services
    return app
