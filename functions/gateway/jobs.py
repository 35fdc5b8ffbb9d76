"""Jobs: submit (idempotent), read, cancel, retry, list and download outputs."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.params import FromPath, FromQuery
from litestar.response import Stream
from opentelemetry.trace import SpanKind

from functions.gateway.api import (
    CHUNK,
    JobView,
    OutputList,
    OutputView,
    load_job,
    load_job_revision,
    tenant_of,
    view,
)
from functions.gateway.openapi import errors
from functions.gateway.queue import queue_spot
from functions.gateway.quotas import admit_job
from shared import submission
from shared.bus import PublishFailed
from shared.errors import (
    ErrorCode,
    MalformedRequest,
    NotSupported,
    PermanentError,
    TransientError,
)
from shared.events import JobCancel, JobRetry
from shared.function import Services
from shared.jobrequest import JobRequest

MAX_JOB_BODY_BYTES = 1_000_000


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
        raise MalformedRequest(f"bad job request: {exc}") from exc
    job = await submission.prepare(services, tenant, body,
                                   idempotency_key=submission.check_idempotency_key(
                                       request.headers.get("idempotency-key")))
    await admit_job(request.app.state, job.record)  # 503 overloaded, 429 active-job cap
    claim = await submission.commit(services, job)
    queued = claim.event is not None
    headers = {"Location": f"{services.settings.base_url}/v1/jobs/{job.job_id}"} if queued \
        else None
    return Response(msgspec.to_builtins(view(claim.record, services.settings.base_url)),
                    status_code=202 if queued else 200, headers=headers)


@get("/v1/jobs/{job_id:str}", responses=errors(404, 503))
async def get_job(request: Request[Any, Any, Any], job_id: FromPath[str]) -> JobView:
    """The job: status, progress, steps with timings and attempts, error; while queued,
    its place in the queue."""
    services: Services = request.app.state.services
    record = await load_job(services, tenant_of(request), job_id)
    job = view(record, services.settings.base_url)
    if record.status == "queued":
        job.queue = await queue_spot(services, record)
    return job


@delete("/v1/jobs/{job_id:str}", status_code=202)
async def cancel(request: Request[Any, Any, Any], job_id: FromPath[str]) -> Response[Any]:
    """Cancel a queued or running job: 202, and the job is ``cancelled`` within moments;
    a finished job is 409 with its state."""
    services: Services = request.app.state.services
    record = await load_job(services, tenant_of(request), job_id)
    if record.terminal:
        raise PermanentError(ErrorCode.CONFLICT, f"job {job_id} already {record.status}",
                             details={"status": str(record.status)})
    reason = request.query_params.get("reason", "cancelled on request")[:200]
    try:
        await services.bus.publish(services.names.cancel,
                                   JobCancel(job_id=job_id, tenant=record.tenant, reason=reason),
                                   msg_id=f"{job_id}:cancel")
    except PublishFailed as exc:
        raise TransientError("could not cancel now; retry", code=ErrorCode.BUS_UNAVAILABLE,
                             details={"retry_after_s": 1}) from exc
    return Response({"job_id": job_id, "status": "cancelling"}, status_code=202)


@post("/v1/jobs/{job_id:str}", status_code=202)
async def job_action(request: Request[Any, Any, Any], job_id: FromPath[str]) -> Response[Any]:
    """``POST /v1/jobs/{id}:retry``. Litestar matches whole path segments only, so the
    segment is ``<id>:<action>`` and is split here (Google's custom-method style)."""
    target, _, action = job_id.rpartition(":")
    if action != "retry" or not target:
        raise PermanentError(ErrorCode.NOT_FOUND, "no such resource; did you mean "
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
        raise PermanentError(ErrorCode.CONFLICT, f"job {job_id} is {status}: only a failed "
                             "or cancelled job can be retried", details={"status": status})
    if not record.planned:
        code = record.error.code if record.error else None
        raise PermanentError(ErrorCode.CONFLICT,
                             f"job {job_id} failed before it was planned ({code}): nothing "
                             "can resume; fix the request and submit again",
                             details={"status": status, "error_code": code})
    # A retried job is active again: it counts against its tenant's cap and waits behind
    # the same backpressure as a new one.
    await admit_job(request.app.state, record, retried=True)
    reason = request.query_params.get("reason", "retried on request")[:200]
    event = JobRetry(job_id=job_id, tenant=record.tenant, mode="failed", reason=reason)
    try:
        await services.bus.publish(services.names.retry, event,
                                   msg_id=f"retry:{job_id}:{revision}")
    except PublishFailed as exc:
        raise TransientError("could not retry now; retry", code=ErrorCode.BUS_UNAVAILABLE,
                             details={"retry_after_s": 1}) from exc
    return Response(msgspec.to_builtins(view(record, services.settings.base_url)),
                    status_code=202,
                    headers={"Location": f"{services.settings.base_url}/v1/jobs/{job_id}"})


@get("/v1/jobs/{job_id:str}/outputs", responses=errors(404, 503))
async def list_outputs(request: Request[Any, Any, Any], job_id: FromPath[str],
                       presign: FromQuery[bool | None] = None) -> OutputList:
    """Every output so far with a download URL: through the gateway, or (``presign=true``,
    or ``JETCUT_PRESIGN_OUTPUTS``, S3 store only) a direct S3 URL valid until
    ``expires_at``. With the local store ``presign`` is ignored: URLs name the gateway."""
    services: Services = request.app.state.services
    record = await load_job(services, tenant_of(request), job_id)
    base = services.settings.base_url
    direct = services.settings.presign_outputs if presign is None else presign
    expiry = services.settings.presign_expiry_s
    outputs: list[OutputView] = []
    for step, state in record.steps.items():
        for name, key in state.outputs.items():
            url, expires_at = f"{base}/v1/jobs/{job_id}/outputs/{step}/{name}", None
            if direct:
                try:
                    url = await services.store.presign_get(key, expiry, key.rsplit("/", 1)[-1])
                    expires_at = time.time() + expiry
                except NotSupported:
                    direct = False
            outputs.append(OutputView(step=step, name=name, key=key, url=url,
                                      expires_at=expires_at))
    return OutputList(job_id=job_id, status=str(record.status), outputs=outputs)


@get("/v1/jobs/{job_id:str}/outputs/{step:str}/{name:str}")
async def download(request: Request[Any, Any, Any], job_id: FromPath[str], step: FromPath[str],
                   name: FromPath[str]) -> Stream:
    services: Services = request.app.state.services
    record = await load_job(services, tenant_of(request), job_id)
    state = record.steps.get(step)
    key = state.outputs.get(name) if state else None
    if key is None:
        raise PermanentError(ErrorCode.NOT_FOUND, f"job {job_id} has no output {step}/{name}")
    info = await services.store.stat(key)
    filename = key.rsplit("/", 1)[-1]

    async def body() -> AsyncIterator[bytes]:
        async for chunk in services.store.iter_chunks(key, CHUNK):
            yield chunk

    return Stream(body(), media_type=info.content_type or "application/octet-stream",
                  headers={"Content-Length": str(info.size),
                           "Content-Disposition": f'attachment; filename="{filename}"'})
