"""Jobs: submit (idempotent), read, cancel, retry, list and download outputs."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.params import FromPath
from litestar.response import Stream
from opentelemetry.trace import SpanKind

from functions.gateway.api import (
    CHUNK,
    ApiError,
    JobView,
    OutputView,
    load_job,
    load_job_revision,
    tenant_of,
    view,
)
from shared.bus import PublishFailed
from shared.errors import ErrorCode, JetcutError, ObjectNotFound
from shared.events import InputRef, JobCancel, JobRetry, JobSubmit, StepSpec
from shared.function import Services
from shared.ids import job_id_for, new_job_id
from shared.jobstate import JobRecord
from shared.recipes import resolve


class JobRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of POST /v1/jobs: a recipe (or inline steps) and the uploads it works on."""

    recipe: str | None = None
    steps: dict[str, StepSpec] | None = None
    input: str | None = None
    """An upload id (``u...``) or a store key under ``uploads/<tenant>/``."""
    inputs: list[str] = []
    params: dict[str, Any] = {}


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
