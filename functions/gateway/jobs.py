"""``/v1/jobs``: submit (idempotent), list, read, cancel, retry, outputs, events, graph.

One controller for the job resource; the work behind the longer handlers lives beside it
(``listing``: the paged scan, ``events``: the SSE stream, ``dashboard``: the step graph,
``queue``: a queued job's place).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, FromQuery, HeaderParameter, QueryParameter
from litestar.response import Stream
from opentelemetry.trace import SpanKind

from functions.gateway import events, listing
from functions.gateway.dashboard import JobGraph, job_graph
from functions.gateway.deps import AdmissionDep, ServicesDep
from functions.gateway.openapi import errors, request_body, response_media
from functions.gateway.queue import queue_spot
from functions.gateway.quotas import Admission
from functions.gateway.views import (
    CHUNK,
    MAX_SEQ,
    JobView,
    OutputList,
    OutputView,
    load_job,
    load_job_revision,
    tenant_of,
    view,
)
from shared import msgids, submission
from shared.bus import PublishFailed
from shared.costbook import job_eta
from shared.errors import (
    ErrorCode,
    MalformedRequest,
    NotSupported,
    PermanentError,
    TransientError,
)
from shared.events import JobCancel, JobRetry, RetryChanges, RetryRequest
from shared.function import Services
from shared.jobrequest import JobRequest
from shared.jobstate import JobRecord
from shared.recipes import resolve

MAX_JOB_BODY_BYTES = 1_000_000
REASON = QueryParameter(description="Why (kept on the job's events; the first 200 characters).")


class CancelView(msgspec.Struct):
    job_id: str
    status: str
    """``cancelling``: the job is ``cancelled`` within moments."""


class JobController(Controller):
    """The job resource. Path parameters are plain strings: ids are minted by jetcut, and
    one that names nothing (or another tenant's job) is a 404."""

    path = "/jobs"
    tags = ["jobs"]

    @post("/", status_code=202, request_max_body_size=MAX_JOB_BODY_BYTES,
          responses={200: ResponseSpec(JobView, description="An identical earlier request "
                                       "(same Idempotency-Key) made this job already",
                                       generate_examples=False),
                     **errors(400, 409, 413, 422, 429, 503)},
          opt=request_body(JobRequest))
    async def submit(self, request: Request[Any, Any, Any], services: ServicesDep,
                     admission: AdmissionDep) -> Response[JobView]:
        """Validate and queue a job: ``202`` once ``jobs.submit`` has its PubAck, with the
        job and its ``Location``. Each job is one trace: it starts here (or joins the
        caller's ``traceparent``)."""
        telemetry = services.telemetry
        with telemetry.tracer.start_as_current_span(
            "POST /v1/jobs", context=telemetry.extract(dict(request.headers)),
            kind=SpanKind.SERVER,
        ) as span:
            response = await _submit(request, services, admission)
            span.set_attribute("jetcut.job_id", response.content.job_id)
            return response

    @get("/", responses=errors(400, 503))
    async def list_jobs(
        self, request: Request[Any, Any, Any], services: ServicesDep,
        status: Annotated[str | None, QueryParameter(pattern=listing.STATUS_PATTERN)] = None,
        recipe: FromQuery[str | None] = None,
        created_after: Annotated[float, QueryParameter(ge=0)] = 0.0,
        created_before: Annotated[float, QueryParameter(gt=0)] = listing.FAR_FUTURE,
        limit: Annotated[int, QueryParameter(ge=1, le=listing.MAX_LIMIT)] = 50,
        cursor: Annotated[str | None, QueryParameter(pattern=listing.CURSOR_PATTERN)] = None,
    ) -> listing.JobPage:
        """The caller's jobs, newest first. ``status`` takes one status or a comma list;
        ``recipe`` a recipe name (``inline`` for jobs with inline steps); ``created_after``
        / ``created_before`` Unix seconds (exclusive; by default no bound)."""
        return await listing.page(services, tenant_of(request), status=status,
                                  recipe=recipe, created_after=created_after,
                                  created_before=created_before, limit=limit, cursor=cursor)

    @get("/{job_id:str}", responses=errors(404, 503))
    async def get_job(self, request: Request[Any, Any, Any], services: ServicesDep,
                      job_id: FromPath[str]) -> JobView:
        """The job: status, progress, steps with timings and attempts, error; while queued,
        its place in the queue."""
        record = await load_job(services, tenant_of(request), job_id)
        job = view(record, services.settings.base_url)
        if record.status == "queued":
            job.queue = await queue_spot(services, record)
        job.eta_s = await job_eta(services.costs, record, time.time())
        return job

    @delete("/{job_id:str}", status_code=202, responses=errors(400, 404, 409, 503))
    async def cancel(self, request: Request[Any, Any, Any], services: ServicesDep,
                     job_id: FromPath[str],
                     reason: Annotated[str, REASON] = "cancelled on request") -> CancelView:
        """Cancel a queued or running job: 202, and the job is ``cancelled`` within moments;
        a finished job is 409 with its state."""
        record = await load_job(services, tenant_of(request), job_id)
        if record.terminal:
            raise PermanentError(ErrorCode.CONFLICT, f"job {job_id} already {record.status}",
                                 details={"status": str(record.status)})
        try:
            await services.bus.publish(
                services.names.cancel,
                JobCancel(job_id=job_id, tenant=record.tenant, reason=reason[:200]),
                msg_id=msgids.cancel(job_id))
        except PublishFailed as exc:
            raise TransientError("could not cancel now; retry", code=ErrorCode.BUS_UNAVAILABLE,
                                 details={"retry_after_s": 1}) from exc
        return CancelView(job_id=job_id, status="cancelling")

    @post("/{job_id:str}", status_code=202, responses=errors(400, 404, 409, 422, 429, 503),
          request_max_body_size=MAX_JOB_BODY_BYTES,
          opt=request_body(RetryRequest, required=False))
    async def retry_job(self, request: Request[Any, Any, Any], services: ServicesDep,
                        admission: AdmissionDep, job_id: FromPath[str],
                        reason: Annotated[str, REASON] = "retried on request",
                        ) -> Response[JobView]:
        """``POST /v1/jobs/{id}:retry``: run a failed or cancelled job again from its
        checkpoints: 202 with the job as it is now (the conductor sets it running within
        moments); anything else is 409.

        An optional body (``RetryChanges``: ``recipe`` or ``steps``, and/or ``params``)
        re-plans the job first: finished steps the change does not touch keep their
        outputs, the others run again; a plan that does not validate is 422
        ``invalid_recipe``.

        Litestar matches whole path segments only, so the segment is ``<id>:<action>`` and
        is split here (Google's custom-method style)."""
        target, _, action = job_id.rpartition(":")
        if action != "retry" or not target:
            raise PermanentError(ErrorCode.NOT_FOUND, "no such resource; did you mean "
                                 "POST /v1/jobs/{job_id}:retry?")
        changes = _changes(await request.body())
        return await _retry(request, services, admission, target, reason, changes)

    @get("/{job_id:str}/outputs", responses=errors(400, 404, 503))
    async def list_outputs(self, request: Request[Any, Any, Any], services: ServicesDep,
                           job_id: FromPath[str],
                           presign: FromQuery[bool | None] = None) -> OutputList:
        """Every output so far with a download URL: through the gateway, or
        (``presign=true``, or ``JETCUT_PRESIGN_OUTPUTS``, S3 store only) a direct S3 URL
        valid until ``expires_at``. With the local store ``presign`` is ignored: URLs name
        the gateway."""
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
                        url = await services.store.presign_get(key, expiry,
                                                                key.rsplit("/", 1)[-1])
                        expires_at = time.time() + expiry
                    except NotSupported:
                        direct = False
                outputs.append(OutputView(step=step, name=name, key=key, url=url,
                                          expires_at=expires_at))
        return OutputList(job_id=job_id, status=str(record.status), outputs=outputs)

    @get("/{job_id:str}/outputs/{step:str}/{name:str}", responses=errors(404, 503),
         opt=response_media("*/*", "The output's bytes, with its own content type"))
    async def download(self, request: Request[Any, Any, Any], services: ServicesDep,
                       job_id: FromPath[str], step: FromPath[str],
                       name: FromPath[str]) -> Stream:
        """One output's bytes, streamed from the store."""
        record = await load_job(services, tenant_of(request), job_id)
        state = record.steps.get(step)
        key = state.outputs.get(name) if state else None
        if key is None:
            raise PermanentError(ErrorCode.NOT_FOUND,
                                 f"job {job_id} has no output {step}/{name}")
        info = await services.store.stat(key)
        filename = key.rsplit("/", 1)[-1]

        async def body() -> AsyncIterator[bytes]:
            async for chunk in services.store.iter_chunks(key, CHUNK):
                yield chunk

        return Stream(body(), media_type=info.content_type or "application/octet-stream",
                      headers={"Content-Length": str(info.size),
                               "Content-Disposition": f'attachment; filename="{filename}"'})

    @get("/{job_id:str}/events", media_type="text/event-stream",
         responses={204: ResponseSpec(None, description="Resumed past the job's end: "
                                      "nothing more will come"),
                    **errors(400, 404, 503)})
    async def job_events(self, request: Request[Any, Any, Any], services: ServicesDep,
                         job_id: FromPath[str],
                         last_event_id: Annotated[int, QueryParameter(
                             ge=0, le=MAX_SEQ)] = 0,
                         resume: Annotated[str | None, HeaderParameter(
                             name="Last-Event-ID", required=False, pattern=r"^[0-9]{1,15}$",
                             description="The id of the last event seen (a browser sends "
                                         "it when it reconnects)")] = None,
                         ) -> Response[Any]:
        """Server-sent events: the job's history, then live events until it finishes.

        Resume with the ``Last-Event-ID`` header (or ``?last_event_id=``). Events are
        ``status``, ``step`` and ``progress``; ``data`` is the JobEvent as JSON.
        """
        return await events.respond(services, tenant_of(request), job_id,
                                    header=resume, query=last_event_id or None,
                                    stopping=getattr(request.app.state, "stopping", None))

    @get("/{job_id:str}/graph", responses=errors(404, 503))
    async def get_job_graph(self, request: Request[Any, Any, Any], services: ServicesDep,
                            job_id: FromPath[str]) -> JobGraph:
        """The job's steps as a graph: nodes with status and layer, and ``uses`` edges."""
        return job_graph(await load_job(services, tenant_of(request), job_id))


async def _submit(request: Request[Any, Any, Any], services: Services,
                  admission: Admission) -> Response[JobView]:
    tenant = tenant_of(request)
    try:
        body = msgspec.json.decode(await request.body(), type=JobRequest)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise MalformedRequest(f"bad job request: {exc}") from exc
    key = submission.check_idempotency_key(request.headers.get("idempotency-key"))
    job = await submission.prepare(services, tenant, body, idempotency_key=key)
    await admission.admit(job.record)  # 503 overloaded, 429 active-job cap
    claim = await submission.commit(services, job)
    queued = claim.event is not None
    base = services.settings.base_url
    return Response(view(claim.record, base), status_code=202 if queued else 200,
                    headers={"Location": f"{base}/v1/jobs/{job.job_id}"} if queued else None)


def _changes(body: bytes) -> RetryChanges | None:
    """A retry's optional body; ``None`` for none (or ``{}``: nothing changes)."""
    if not body.strip():
        return None
    try:
        request = msgspec.json.decode(body, type=RetryRequest)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise MalformedRequest(f"bad retry body: {exc}") from exc
    if request.recipe is not None and request.steps is not None:
        raise MalformedRequest("give 'recipe' or 'steps' to re-plan the job, not both")
    changes = RetryChanges(recipe=request.recipe, steps=request.steps, params=request.params)
    return None if changes == RetryChanges() else changes


async def _retry(request: Request[Any, Any, Any], services: Services, admission: Admission,
                 job_id: str, reason: str,
                 changes: RetryChanges | None = None) -> Response[JobView]:
    """The message id is the record's revision: a double click, or a client retrying the
    request, is one retry; a retry of the job after it failed again is a new one."""
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
    if changes is not None:
        _check_plan(record, changes)
    # A retried job is active again: it counts against its tenant's cap and waits behind
    # the same backpressure as a new one.
    await admission.admit(record, retried=True)
    event = JobRetry(job_id=job_id, tenant=record.tenant, mode="failed", reason=reason[:200],
                     changes=changes)
    try:
        await services.bus.publish(services.names.retry, event,
                                   msg_id=msgids.retry(job_id, revision))
    except PublishFailed as exc:
        raise TransientError("could not retry now; retry", code=ErrorCode.BUS_UNAVAILABLE,
                             details={"retry_after_s": 1}) from exc
    base = services.settings.base_url
    return Response(view(record, base), status_code=202,
                    headers={"Location": f"{base}/v1/jobs/{job_id}"})


def _check_plan(record: JobRecord, changes: RetryChanges) -> None:
    """The changed job must plan before it is queued, as a new one must.

    Raises:
        PermanentError: ``invalid_recipe`` naming the step and field at fault.
    """
    replaced = changes.recipe is not None or changes.steps is not None
    recipe, steps = (changes.recipe, changes.steps) if replaced else (record.recipe,
                                                                      record.pipeline)
    params = changes.params if changes.params is not None else record.params
    resolve(recipe, steps, params, len(record.inputs))
