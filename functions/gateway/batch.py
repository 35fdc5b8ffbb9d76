"""``POST /v1/jobs:batch``: many jobs in one request, all or nothing.

Atomic where it can be: every item is validated (body, recipe, inputs, idempotency) before
any record is written or any submit published, and one bad item rejects the whole batch
with a reason per item. Publishing is the one step that cannot be undone: if the bus fails
half way, the answer is 503 and repeating the request with the same ``Idempotency-Key``
finishes the batch without doubling a job (every item's job id and message id is derived
from the batch key and its index, or from its own key).
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Request, post

from functions.gateway.deps import AdmissionDep, ServicesDep
from functions.gateway.errors import status_of
from functions.gateway.jobs import MAX_JOB_BODY_BYTES
from functions.gateway.openapi import errors, request_body
from functions.gateway.quotas import Admission
from functions.gateway.views import JobView, tenant_of, view
from shared import submission
from shared.errors import ErrorCode, JetcutError, MalformedRequest, PermanentError
from shared.function import Services
from shared.jobrequest import JobRequest
from shared.submission import PreparedJob, check_idempotency_key


class BatchItem(JobRequest, kw_only=True, forbid_unknown_fields=True):
    """One job of a batch: a job request plus its own optional idempotency key."""

    idempotency_key: str | None = None


class BatchRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    jobs: list[Any]
    """Decoded item by item, so each bad item gets its own reason."""


class BatchRequestDoc(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/jobs:batch`` (as documented; items are decoded one by one)."""

    jobs: list[BatchItem]


class BatchView(msgspec.Struct):
    jobs: list[JobView]
    """In request order; each as ``GET /v1/jobs/{id}`` shows it."""
    created: list[bool]
    """Per item: queued by this request (false: an earlier identical request made it)."""


def _item_key(batch_key: str | None, index: int, item: BatchItem) -> str | None:
    if item.idempotency_key is not None:
        return check_idempotency_key(item.idempotency_key, "idempotency_key")
    return f"batch\x00{batch_key}\x00{index}" if batch_key is not None else None


async def _validate(services: Services, tenant: str, raw: Any, index: int,
                    batch_key: str | None) -> tuple[PreparedJob, bool]:
    """The item as a job, and whether an identical earlier request already made it."""
    try:
        item = msgspec.convert(raw, BatchItem)
    except msgspec.ValidationError as exc:
        raise MalformedRequest(f"bad job request: {exc}") from exc
    job = await submission.prepare(services, tenant, item,
                                   idempotency_key=_item_key(batch_key, index, item))
    return job, await submission.existing(services, job) is not None


async def _admit(admission: Admission, jobs: list[tuple[PreparedJob, bool]]) -> None:
    """Backpressure and the active-job cap for every new job, or for none: a refusal takes
    back the admissions this batch already made."""
    admitted: list[PreparedJob] = []
    try:
        for job, existed in jobs:
            if not existed:
                await admission.admit(job.record)
                admitted.append(job)
    except JetcutError:
        for job in admitted:
            await admission.release(job.record)
        raise


class BatchController(Controller):
    """``POST /v1/jobs:batch`` (a custom method on the jobs collection)."""

    path = "/jobs:batch"
    tags = ["jobs"]

    @post("/", status_code=202, request_max_body_size=MAX_JOB_BODY_BYTES * 10,
          responses=errors(400, 409, 413, 422, 429, 503), opt=request_body(BatchRequestDoc))
    async def submit_batch(self, request: Request[Any, Any, Any], services: ServicesDep,
                           admission: AdmissionDep) -> BatchView:
        """Validate every job, then queue them all: ``202`` with the jobs in request order.

        One invalid item (or a conflicting idempotency key) rejects the batch with nothing
        queued: ``details.items[i]`` is ``null`` for a good item and ``{code, message,
        details}`` for a bad one.
        """
        return await _submit(request, services, admission)


async def _submit(request: Request[Any, Any, Any], services: Services,
                  admission: Admission) -> BatchView:
    tenant = tenant_of(request)
    try:
        data = msgspec.json.decode(await request.body(), type=BatchRequest)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise MalformedRequest(f"bad batch request: {exc}") from exc
    limit = services.settings.max_batch
    if not 1 <= len(data.jobs) <= limit:
        raise PermanentError(ErrorCode.INVALID_REQUEST,
                             f"a batch holds 1 to {limit} jobs, not {len(data.jobs)}",
                             details={"max_batch": limit})
    batch_key = check_idempotency_key(request.headers.get("idempotency-key"))
    prepared: list[tuple[PreparedJob, bool] | None] = []
    reasons: list[dict[str, Any] | None] = []
    for index, raw in enumerate(data.jobs):
        try:
            prepared.append(await _validate(services, tenant, raw, index, batch_key))
            reasons.append(None)
        except JetcutError as exc:
            prepared.append(None)
            reasons.append({"code": str(exc.code), "message": exc.message,
                            "details": exc.details, "status": status_of(exc)})
    ids = [p[0].job_id for p in prepared if p is not None]
    if len(set(ids)) != len(ids):
        reasons = [r or {"code": str(ErrorCode.CONFLICT), "details": {}, "status": 409,
                         "message": "two items of the batch have the same idempotency key"}
                   if p is not None and ids.count(p[0].job_id) > 1 else r
                   for p, r in zip(prepared, reasons, strict=True)]
    bad = [r for r in reasons if r is not None]
    if bad:
        code = ErrorCode.CONFLICT if all(r["status"] == 409 for r in bad) \
            else ErrorCode.INVALID_REQUEST
        raise PermanentError(code, f"{len(bad)} of {len(reasons)} jobs are invalid; nothing "
                             "was queued",
                             details={"items": [None if r is None else
                                                {k: v for k, v in r.items() if k != "status"}
                                                for r in reasons]})
    valid = [p for p in prepared if p is not None]
    await _admit(admission, valid)  # 503 overloaded, 429 active-job cap: nothing queued
    claims = [await submission.claim(services, job) for job, _ in valid]
    await submission.publish(services, claims)  # 503 part way: repeat with the same key
    base = services.settings.base_url
    body = BatchView(jobs=[view(c.record, base) for c in claims],
                     created=[c.event is not None for c in claims])
    return body
