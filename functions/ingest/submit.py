"""Checking and committing a job that came from outside HTTP: the same rules as the gateway.

A job is committed exactly as ``POST /v1/jobs`` commits one: the record is created
(``queued``, create-only) so a ``GET`` right after the reply finds it, then ``jobs.submit`` is
published with the job id as ``Nats-Msg-Id`` and its PubAck awaited. A repeat with the same
job id is one job: the stream drops the message within its window, the create-only record
after it.
"""

from __future__ import annotations

import hashlib
import re
import time

import msgspec

from shared.bus import PublishFailed
from shared.errors import ErrorCode, InvalidKey, ObjectNotFound, PermanentError, TransientError
from shared.events import InputRef, JobSubmit
from shared.function import Services
from shared.jobstate import JobRecord
from shared.recipes import resolve
from shared.store.base import validate_key
from shared.subjects import check_token

UPLOAD_ID = re.compile(r"u[a-z2-7]{26}")


def allowed_key(services: Services, tenant: str, key: str) -> str:
    """A store key a job from outside may read: the tenant's uploads, or the ingest prefix
    (objects dropped into the bucket by MinIO users; not tenant-scoped, so only services
    that may publish on the ingest subjects can name them).

    Raises:
        PermanentError: ``invalid_request`` for any other key, or one that could escape.
    """
    try:
        validate_key(key)
    except InvalidKey as exc:
        raise PermanentError(ErrorCode.INVALID_REQUEST, exc.message,
                             details={"input": key}) from None
    prefixes = (f"uploads/{tenant}/", services.settings.ingest_prefix)
    if not key.startswith(prefixes):
        raise PermanentError(ErrorCode.INVALID_REQUEST,
                             f"input {key!r} must be an upload id or a key under "
                             f"{prefixes[0]} or {prefixes[1]}", details={"input": key})
    return key


async def input_ref(services: Services, tenant: str, ref: str) -> InputRef:
    """An upload id (``u...``) or an allowed key, as an ``InputRef`` of an existing object.

    Raises:
        PermanentError: ``input_not_found`` when nothing is there; ``invalid_request`` for
            a reference of the wrong shape.
    """
    if UPLOAD_ID.fullmatch(ref):
        found = await services.store.list(f"uploads/{tenant}/{ref}/")
        if not found:
            raise PermanentError(ErrorCode.INPUT_NOT_FOUND, f"no upload {ref!r}",
                                 details={"input": ref})
        key = found[0].key
    else:
        key = allowed_key(services, tenant, ref)
    try:
        info = await services.store.stat(key)
    except ObjectNotFound:
        raise PermanentError(ErrorCode.INPUT_NOT_FOUND, f"no object at {key!r}",
                             details={"input": ref}) from None
    return InputRef(key=key, filename=key.rsplit("/", 1)[-1], size=info.size)


def check(event: JobSubmit) -> None:
    """What the gateway refuses before queueing: bad tenant or job id, no inputs, a recipe
    or pipeline that does not resolve.

    Raises:
        PermanentError: ``invalid_request`` or ``invalid_recipe``.
    """
    try:
        check_token("tenant", event.tenant)
        if event.job_id is not None:
            check_token("job id", event.job_id)
    except ValueError as exc:
        raise PermanentError(ErrorCode.INVALID_REQUEST, str(exc)) from None
    if not event.inputs:
        raise PermanentError(ErrorCode.INVALID_REQUEST, "a job needs at least one input")
    resolve(event.recipe, event.steps, event.params, len(event.inputs))


def fingerprint(event: JobSubmit) -> str:
    """Same job id, different request: the hash tells them apart (a 409 at the gateway)."""
    return hashlib.sha256(msgspec.json.encode(
        [event.recipe, event.steps, [i.key for i in event.inputs], event.params,
         *([event.callback_url] if event.callback_url else [])],
        order="sorted",
    )).hexdigest()


async def commit(services: Services, event: JobSubmit, *, forget_on_failure: bool) -> str:
    """Create the job's record and publish its ``jobs.submit``; the job id once stored.

    ``event`` must be checked (``check``) and carry its ``job_id``. ``forget_on_failure``
    deletes the fresh record when the publish fails, for a job nobody could name again.

    Raises:
        PermanentError: ``conflict`` when the job id already names a different request.
        TransientError: ``bus_unavailable`` when no PubAck came within the publish window.
    """
    assert event.job_id is not None
    job_id = event.job_id
    digest = fingerprint(event)
    record = JobRecord(
        job_id=job_id, tenant=event.tenant, recipe=event.recipe, inputs=list(event.inputs),
        params=dict(event.params), pipeline=event.steps, idempotency_key=event.idempotency_key,
        request_hash=digest, created_at=event.submitted_at or time.time(),
        callback_url=event.callback_url, callback_secret=event.callback_secret,
    )
    created = await services.jobs.create(record) is not None
    if not created:
        existing = await services.jobs.get(job_id)
        if existing.tenant != event.tenant or existing.request_hash not in (None, digest):
            raise PermanentError(ErrorCode.CONFLICT,
                                 "this job id / idempotency key was used for a different "
                                 "request", details={"job_id": job_id})
        if existing.planned or existing.status != "queued":
            return job_id  # the conductor has it already
        # Accepted before but maybe never queued: publish again (a no-op if it landed).
        event = msgspec.structs.replace(event, submitted_at=existing.created_at)
    try:
        await services.bus.publish(services.names.submit, event, msg_id=job_id)
    except PublishFailed as exc:
        if created and forget_on_failure:
            await services.jobs.delete(job_id)
        raise TransientError("the job queue is unavailable; retry with the same id",
                             code=ErrorCode.BUS_UNAVAILABLE) from exc
    return job_id
