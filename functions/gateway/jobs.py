"""Jobs: submit (idempotent), read, cancel, retry, list and download outputs."""

from __future__ import annotations

import hashlib
import re
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
    ApiError,
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
from shared.bus import PublishFailed, StreamFull
from shared.callbacks import InvalidCallback
from shared.callbacks import validate as validate_callback
from shared.errors import ErrorCode, JetcutError, NotSupported, ObjectNotFound
from shared.events import InputRef, JobCancel, JobRetry, JobSubmit
from shared.function import Services
from shared.ids import job_id_for, new_job_id
from shared.jobrequest import JobRequest
from shared.jobstate import JobRecord
from shared.recipes import resolve


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
    limit = services.settings.max_upload_bytes
    if info.size > limit:  # a presigned PUT cannot cap its size: it is checked here
        raise ApiError(413, ErrorCode.PAYLOAD_TOO_LARGE,
                       f"input {ref!r} is {info.size} bytes; uploads are limited to {limit}")
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
    job = await prepare_job(services, tenant, body, request.headers.get("idempotency-key"))
    await admit_job(request.app.state, job.record)  # 503 overloaded, 429 active-job cap
    claim = await claim_job(services, job)
    if claim.event is not None:
        try:
            await services.bus.publish(services.names.submit, claim.event, msg_id=job.job_id)
        except PublishFailed as exc:
            if job.idempotency_key is None:
                await services.jobs.delete(job.job_id)  # nobody can name it: leave no trace
            if isinstance(exc, StreamFull):
                raise ApiError(503, ErrorCode.OVERLOADED, "the job queue is full; retry later "
                               "(with the same Idempotency-Key)", {"retry_after_s": 5},
                               headers={"Retry-After": "5"}) from exc
            raise ApiError(503, ErrorCode.BUS_UNAVAILABLE,
                           "the job queue is unavailable; retry (with the same Idempotency-Key)",
                           {"retry_after_s": 1}) from exc
    headers = ({"Location": f"{services.settings.base_url}/v1/jobs/{job.job_id}"}
               if claim.event is not None else None)
    return Response(msgspec.to_builtins(view(claim.record, services.settings.base_url)),
                    status_code=202 if claim.event is not None else 200, headers=headers)


class PreparedJob(msgspec.Struct, frozen=True):
    """A validated job request, ready to be claimed (record) and queued (event)."""

    record: JobRecord
    event: JobSubmit

    @property
    def job_id(self) -> str:
        return self.record.job_id

    @property
    def idempotency_key(self) -> str | None:
        return self.record.idempotency_key


class Claim(msgspec.Struct, frozen=True):
    """What claiming a job found: the record to show and the event still to publish
    (``None``: an earlier identical request already queued it and it is underway)."""

    record: JobRecord
    event: JobSubmit | None


def check_idempotency_key(key: str | None, what: str = "Idempotency-Key") -> str | None:
    if key is not None and not 1 <= len(key) <= 255:
        raise ApiError(400, ErrorCode.INVALID_REQUEST, f"{what} must be 1-255 chars")
    return key


async def prepare_job(services: Services, tenant: str, body: JobRequest,
                      idem: str | None) -> PreparedJob:
    """Validate a job request completely (inputs exist, recipe plans) without side effects,
    so a batch can validate every item before it queues any."""
    refs = body.refs
    if not refs:
        raise ApiError(422, ErrorCode.INVALID_REQUEST, "a job needs 'input' or 'inputs'")
    resolve(body.recipe, body.steps, body.params, len(refs))  # invalid_recipe before queueing
    inputs = [await resolve_input(services, tenant, ref) for ref in refs]
    if body.callback_url is not None:
        try:
            await validate_callback(body.callback_url, body.callback_secret, services.settings)
        except InvalidCallback as exc:
            raise ApiError(422, exc.code, exc.message, exc.details) from None
    check_idempotency_key(idem)
    job_id = job_id_for(tenant, idem) if idem else new_job_id()
    fingerprint = hashlib.sha256(msgspec.json.encode(
        [body.recipe, body.steps, [i.key for i in inputs], body.params,
         *([body.callback_url] if body.callback_url else [])], order="sorted"
    )).hexdigest()
    now = time.time()
    record = JobRecord(job_id=job_id, tenant=tenant, recipe=body.recipe, inputs=inputs,
                       params=body.params, pipeline=body.steps, idempotency_key=idem,
                       request_hash=fingerprint, created_at=now,
                       callback_url=body.callback_url, callback_secret=body.callback_secret)
    event = JobSubmit(job_id=job_id, tenant=tenant, recipe=body.recipe, steps=body.steps,
                      inputs=inputs, params=body.params, idempotency_key=idem,
                      submitted_at=now, callback_url=body.callback_url,
                      callback_secret=body.callback_secret)
    return PreparedJob(record=record, event=event)


async def existing_conflict(services: Services, job: PreparedJob) -> JobRecord | None:
    """The record an earlier request made under this job's idempotency key, if any.

    Raises:
        ApiError: 409 when that request was a different one.
    """
    if job.idempotency_key is None:
        return None
    try:
        record = await services.jobs.get(job.job_id)
    except JetcutError:
        return None
    if record.tenant != job.record.tenant or record.request_hash != job.record.request_hash:
        raise ApiError(409, ErrorCode.CONFLICT,
                       "this Idempotency-Key was used for a different request",
                       {"job_id": job.job_id})
    return record


async def claim_job(services: Services, job: PreparedJob) -> Claim:
    """Create the job's record (create-only), or find the one an identical earlier request
    made. The gateway writes the record before publishing, so a GET right after the 202
    finds the job."""
    if await services.jobs.create(job.record) is not None:
        return Claim(record=job.record, event=job.event)
    record = await existing_conflict(services, job)
    if record is None:  # an unkeyed id cannot collide; a keyed one vanished meanwhile
        raise ApiError(409, ErrorCode.CONFLICT, f"job {job.job_id} changed meanwhile; retry",
                       {"job_id": job.job_id})
    if record.planned or record.status != "queued":
        return Claim(record=record, event=None)
    # Accepted before but maybe never queued (a 503, or a crash before the publish):
    # publish again; the message id makes this a no-op if the first one landed.
    return Claim(record=record,
                 event=msgspec.structs.replace(job.event, submitted_at=record.created_at))


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
    # A retried job is active again: it counts against its tenant's cap and waits behind
    # the same backpressure as a new one.
    await admit_job(request.app.state, record, retried=True)
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
        raise ApiError(404, ErrorCode.NOT_FOUND, f"job {job_id} has no output {step}/{name}")
    info = await services.store.stat(key)
    filename = key.rsplit("/", 1)[-1]

    async def body() -> AsyncIterator[bytes]:
        async for chunk in services.store.iter_chunks(key, CHUNK):
            yield chunk

    return Stream(body(), media_type=info.content_type or "application/octet-stream",
                  headers={"Content-Length": str(info.size),
                           "Content-Disposition": f'attachment; filename="{filename}"'})
