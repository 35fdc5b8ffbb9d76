"""The one way a job request becomes a committed job: ``POST /v1/jobs``, each item of
``POST /v1/jobs:batch``, and ingest (MinIO notifications and ``ingest.request``) all call it.

Four steps, kept apart so a batch can validate every item before it commits any:

1. ``prepare``: check the request completely without side effects -- inputs exist (upload
   ids and keys resolved by ``resolve_input``), the recipe plans, the callback URL is one
   jetcut will call -- and build the job's record and its ``jobs.submit`` event, with the
   request's ``fingerprint``.
2. ``existing``: the record an earlier request made under the same job id, if any; a
   different request under that id is a ``conflict``.
3. ``claim``: create the record (create-only, so a ``GET`` right after the answer finds the
   job), or find the one an identical earlier request made.
4. ``publish``: ``jobs.submit`` with the job id as ``Nats-Msg-Id`` once its PubAck is in;
   when the bus fails, a fresh record nobody could name again is deleted.

Every refusal is a ``JetcutError`` with a stable code (the gateway maps codes to HTTP
statuses in one table, ingest answers them as they are).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from shared import msgids
from shared.bus import PublishFailed, StreamFull
from shared.callbacks import validate as validate_callback
from shared.errors import (
    ErrorCode,
    InvalidKey,
    MalformedRequest,
    ObjectNotFound,
    PermanentError,
    TransientError,
)
from shared.events import InputRef, JobSubmit, StepSpec
from shared.function import Services
from shared.ids import job_id_for, new_job_id
from shared.jobrequest import JobRequest
from shared.jobstate import JobRecord
from shared.jobstore import JobNotFound
from shared.recipes import resolve
from shared.store.base import validate_key
from shared.subjects import check_token

UPLOAD_ID = re.compile(r"u[a-z2-7]{26}")
"""What ``shared.ids.new_upload_id`` mints: ``u`` and 26 base32 characters."""

OVERLOADED_RETRY_S = 5
BUS_RETRY_S = 1


def is_upload_id(ref: str) -> bool:
    """Whether ``ref`` names an upload by its id (rather than by a store key)."""
    return UPLOAD_ID.fullmatch(ref) is not None


def uploads_prefix(tenant: str) -> str:
    """Where a tenant's uploads live in the store."""
    return f"uploads/{tenant}/"


def upload_key(tenant: str, upload_id: str, filename: str) -> str:
    """``uploads/<tenant>/<upload_id>/<filename>`` (the filename already sanitised)."""
    return f"{uploads_prefix(tenant)}{upload_id}/{filename}"


async def resolve_input(services: Services, tenant: str, ref: str, *,
                        ingest: bool = False) -> InputRef:
    """An upload id (``u...``) or a store key, as an ``InputRef`` of an existing object.

    A key must lie under the tenant's uploads; with ``ingest`` also under the ingest prefix
    (objects dropped into the bucket by MinIO users; not tenant-scoped, so only services
    that may publish on the ingest subjects can name them). An upload is checked against
    ``JETCUT_MAX_UPLOAD_BYTES`` here because a presigned PUT cannot cap its size.

    Raises:
        PermanentError: ``input_not_found`` when nothing is there; ``invalid_request`` for
            a reference of the wrong shape or one that could escape its prefix;
            ``payload_too_large`` for an upload over the limit.
    """
    prefixes = (uploads_prefix(tenant),
                *((services.settings.ingest_prefix,) if ingest else ()))
    if is_upload_id(ref):
        found = await services.store.list(f"{prefixes[0]}{ref}/")
        if not found:
            raise PermanentError(ErrorCode.INPUT_NOT_FOUND, f"no upload {ref!r}",
                                 details={"input": ref})
        key = found[0].key
    else:
        try:
            key = validate_key(ref)
        except InvalidKey as exc:
            raise PermanentError(ErrorCode.INVALID_REQUEST, exc.message,
                                 details={"input": ref}) from None
        if not key.startswith(prefixes):
            raise PermanentError(ErrorCode.INVALID_REQUEST,
                                 f"input {ref!r} must be an upload id or a key under "
                                 f"{' or '.join(prefixes)}", details={"input": ref})
    try:
        info = await services.store.stat(key)
    except ObjectNotFound:
        raise PermanentError(ErrorCode.INPUT_NOT_FOUND, f"no upload at {key!r}",
                             details={"input": ref}) from None
    limit = services.settings.max_upload_bytes
    if key.startswith(prefixes[0]) and info.size > limit:
        raise PermanentError(ErrorCode.PAYLOAD_TOO_LARGE,
                             f"input {ref!r} is {info.size} bytes; uploads are limited to "
                             f"{limit}", details={"input": ref, "limit": limit})
    return InputRef(key=key, filename=key.rsplit("/", 1)[-1], size=info.size)


def check_idempotency_key(key: str | None, what: str = "Idempotency-Key") -> str | None:
    """The key as given, or None (HTTP's rule for keys a person writes; ingest derives
    longer ones from CloudEvent and MinIO attributes).

    Raises:
        MalformedRequest: when it is not 1-255 characters.
    """
    if key is not None and not 1 <= len(key) <= 255:
        raise MalformedRequest(f"{what} must be 1-255 chars")
    return key


def fingerprint(recipe: str | None, steps: dict[str, StepSpec] | None,
                inputs: Sequence[InputRef], params: dict[str, Any],
                callback_url: str | None) -> str:
    """What makes two requests the same job: same job id, different fingerprint is a
    ``conflict``. Sorted keys, so the order of a JSON body's fields does not matter."""
    return hashlib.sha256(msgspec.json.encode(
        [recipe, steps, [i.key for i in inputs], params,
         *([callback_url] if callback_url else [])], order="sorted",
    )).hexdigest()


def job_record(event: JobSubmit, job_id: str, request_hash: str | None = None) -> JobRecord:
    """The ``queued`` record of a submitted job, as whoever creates it first writes it (the
    submitter here, or the conductor for a ``jobs.submit`` published straight on the bus)."""
    return JobRecord(
        job_id=job_id, tenant=event.tenant, recipe=event.recipe, inputs=list(event.inputs),
        params=dict(event.params), pipeline=event.steps,
        idempotency_key=event.idempotency_key, request_hash=request_hash,
        created_at=event.submitted_at, callback_url=event.callback_url,
        callback_secret=event.callback_secret,
    )


class PreparedJob(msgspec.Struct, frozen=True):
    """A validated job request, ready to be claimed (record) and queued (event)."""

    record: JobRecord
    event: JobSubmit
    named: bool
    """Its id was given or derived from an idempotency key, so the requester can name it
    again; a fresh random id cannot be, and its record is deleted when publishing fails."""

    @property
    def job_id(self) -> str:
        return self.record.job_id


class Claim(msgspec.Struct, frozen=True):
    """What claiming a job found: the record to show and the event still to publish
    (``None``: an earlier identical request already queued it and it is underway)."""

    job: PreparedJob
    record: JobRecord
    event: JobSubmit | None
    created: bool
    """This claim wrote the record (false: an earlier identical request did)."""


def _check_ids(tenant: str, job_id: str | None) -> None:
    try:
        check_token("tenant", tenant)
        if job_id is not None:
            check_token("job id", job_id)
    except ValueError as exc:
        raise PermanentError(ErrorCode.INVALID_REQUEST, str(exc)) from None


async def prepare(services: Services, tenant: str, request: JobRequest, *,
                  idempotency_key: str | None = None, job_id: str | None = None,
                  ingest: bool = False) -> PreparedJob:
    """Validate a job request completely, without side effects.

    Args:
        services: the process's clients.
        tenant: whose job it is (from the API key, or the ingest rule / request).
        request: what was asked for.
        idempotency_key: names the job: the same key and tenant always give the same id.
        job_id: the id to use (ingest: derived from the notification, or given).
        ingest: inputs may also be keys under the ingest prefix.

    Raises:
        JetcutError: ``invalid_request``, ``invalid_recipe``, ``input_not_found``,
            ``payload_too_large``, ``invalid_callback``; transient store errors as they are.
    """
    _check_ids(tenant, job_id)
    refs = request.refs
    if not refs:
        raise PermanentError(ErrorCode.INVALID_REQUEST, "a job needs 'input' or 'inputs'")
    resolve(request.recipe, request.steps, request.params, len(refs))  # before any I/O
    if request.callback_url is not None:
        await validate_callback(request.callback_url, request.callback_secret,
                                services.settings)
    inputs = [await resolve_input(services, tenant, ref, ingest=ingest) for ref in refs]
    named = job_id is not None or idempotency_key is not None
    if job_id is None:
        job_id = job_id_for(tenant, idempotency_key) if idempotency_key else new_job_id()
    event = JobSubmit(job_id=job_id, tenant=tenant, recipe=request.recipe,
                      steps=request.steps, inputs=inputs, params=request.params,
                      idempotency_key=idempotency_key, submitted_at=time.time(),
                      callback_url=request.callback_url,
                      callback_secret=request.callback_secret)
    digest = fingerprint(request.recipe, request.steps, inputs, request.params,
                         request.callback_url)
    return PreparedJob(record=job_record(event, job_id, digest), event=event, named=named)


async def existing(services: Services, job: PreparedJob) -> JobRecord | None:
    """The record an earlier request made under this job's id, if any (only a named job
    can have one).

    Raises:
        PermanentError: ``conflict`` when that request was a different one.
    """
    if not job.named:
        return None
    try:
        record = await services.jobs.get(job.job_id)
    except JobNotFound:
        return None
    if record.tenant != job.record.tenant \
            or record.request_hash not in (None, job.record.request_hash):
        # (None: the conductor made the record from a jobs.submit published on the bus.)
        raise PermanentError(ErrorCode.CONFLICT,
                             "this Idempotency-Key was used for a different request",
                             details={"job_id": job.job_id})
    return record


async def claim(services: Services, job: PreparedJob) -> Claim:
    """Create the job's record (create-only), or find the one an identical earlier request
    made. The record is written before publishing, so a GET right after the answer finds
    the job.

    Raises:
        PermanentError: ``conflict`` for a different request under the same id, or a
            record that vanished between the create and the read.
    """
    if await services.jobs.create(job.record) is not None:
        return Claim(job=job, record=job.record, event=job.event, created=True)
    record = await existing(services, job)
    if record is None:  # an unnamed id cannot collide; a named one vanished meanwhile
        raise PermanentError(ErrorCode.CONFLICT, f"job {job.job_id} changed meanwhile; retry",
                             details={"job_id": job.job_id})
    if record.planned or record.status != "queued":
        return Claim(job=job, record=record, event=None, created=False)
    # Accepted before but maybe never queued (a 503, or a crash before the publish):
    # publish again; the message id makes this a no-op if the first one landed.
    return Claim(job=job, record=record, created=False,
                 event=msgspec.structs.replace(job.event, submitted_at=record.created_at))


async def publish(services: Services, claims: Sequence[Claim]) -> None:
    """Queue every claimed job that still needs it, in order.

    Publishing is the one step that cannot be undone: when the bus fails part way, the
    fresh records of unnamed jobs not yet queued are deleted (nobody could name them
    again); the rest stay, and repeating the request finishes the work.

    Raises:
        TransientError: ``overloaded`` when the stream is full, else ``bus_unavailable``;
            ``details.retry_after_s``, and for more than one job ``details.queued``.
    """
    published: list[str] = []
    try:
        for item in claims:
            if item.event is not None:
                await services.bus.publish(services.names.submit, item.event,
                                           msg_id=msgids.submit(item.job.job_id))
                published.append(item.job.job_id)
    except PublishFailed as exc:
        for item in claims:
            if item.created and not item.job.named and item.job.job_id not in published:
                await services.jobs.delete(item.job.job_id)
        if len(claims) > 1:
            raise TransientError(
                f"the job queue is unavailable after {len(published)} of {len(claims)} "
                "jobs; repeat the request with the same Idempotency-Key",
                code=ErrorCode.BUS_UNAVAILABLE,
                details={"retry_after_s": BUS_RETRY_S, "queued": published}) from exc
        if isinstance(exc, StreamFull):
            raise TransientError("the job queue is full; retry later (with the same "
                                 "Idempotency-Key)", code=ErrorCode.OVERLOADED,
                                 details={"retry_after_s": OVERLOADED_RETRY_S}) from exc
        raise TransientError("the job queue is unavailable; retry (with the same "
                             "Idempotency-Key)", code=ErrorCode.BUS_UNAVAILABLE,
                             details={"retry_after_s": BUS_RETRY_S}) from exc


async def commit(services: Services, job: PreparedJob) -> Claim:
    """Claim and queue one prepared job; the claim says whether this call queued it.

    Raises:
        JetcutError: as ``claim`` and ``publish``.
    """
    found = await claim(services, job)
    await publish(services, [found])
    return found
