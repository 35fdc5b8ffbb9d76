"""ingest — jobs from outside HTTP: MinIO uploads, and requests from other services.

Consumes:
  ingest.minio    MinIO bucket notification (S3 event JSON; stream INGEST, durable
                  ``ingest-minio``)   an ObjectCreated record under ``JETCUT_INGEST_PREFIX``
                  that matches a rule of ``JETCUT_INGEST_RULES`` starts that rule's job; one
                  that matches none is acked and counted as ignored. The job id derives from
                  (bucket, key, eTag) (``shared.ingestrules``): a repeated notification, or
                  one for an object the janitor's sweep made the job of, is one job. A
                  malformed notification is dead-lettered with ``invalid_event``.
  ingest.request  JobSubmit or CloudEvent (structured or binary ``ce-*``), request/reply on
                  plain NATS (queue group ``ingest``)   checked as ``POST /v1/jobs`` checks a
                  job, then committed; the reply is ``{"job_id": ...}`` once the submit has
                  its PubAck, or ``{"error": {code, message, details}}``.
Emits:
  jobs.submit     JobSubmit   Nats-Msg-Id = job id (the job record is created first, as the
                              gateway does, so a GET right after the reply finds it)
Metrics:
  jetcut_ingest_total{source, outcome}   source minio|request; outcome job|ignored|error
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from typing import Any, cast

import msgspec
from nats.aio.msg import Msg
from prometheus_client import Counter

from functions.ingest import minio, requests
from shared import submission
from shared.errors import ErrorCode, JetcutError, ObjectNotFound, PermanentError, error_info
from shared.function import Context, Function, Services, Subscription
from shared.ingestrules import rule_steps
from shared.jobrequest import JobRequest
from shared.recipes import resolve
from shared.settings import Settings
from shared.telemetry import Telemetry

log = logging.getLogger("jetcut.ingest")

NAME = "ingest"
DURABLE = "ingest-minio"
QUEUE_GROUP = "ingest"
REQUEST_CONCURRENCY = 32
"""Requests answered at once by one process: each waits a PubAck, so more than one."""

_counters: weakref.WeakKeyDictionary[Telemetry, Counter] = weakref.WeakKeyDictionary()


def counter(telemetry: Telemetry) -> Counter:
    """``jetcut_ingest_total`` on this process's registry (made on first use)."""
    found = _counters.get(telemetry)
    if found is None:
        found = Counter("jetcut_ingest", "Notifications and requests ingest handled, by outcome.",
                        ("source", "outcome"), registry=telemetry.registry)
        _counters[telemetry] = found
    return found


def check_rules(settings: Settings) -> None:
    """Fail fast at start-up on a rule that could never make a valid job.

    Raises:
        PermanentError: ``invalid_recipe`` naming the rule.
    """
    for index, rule in enumerate(settings.ingest_rules):
        try:
            resolve(rule.recipe, rule_steps(rule), rule.params, 1)
        except JetcutError as exc:
            raise PermanentError(ErrorCode.INVALID_RECIPE,
                                 f"JETCUT_INGEST_RULES[{index}] (prefix {rule.prefix!r}): "
                                 f"{exc.message}") from None


async def on_notification(event: minio.MinioNotification, ctx: Context) -> None:
    """One MinIO notification: start a job per matching ObjectCreated record.

    A notification that cannot make sense is dead-lettered (``invalid_event``); a store or
    bus outage is retried. Its records may be handled again on a redelivery: each one's
    job id makes that a no-op.
    """
    try:
        await _start_jobs(event, ctx)
    except PermanentError:
        counter(ctx.services.telemetry).labels("minio", "error").inc()
        raise


async def _start_jobs(event: minio.MinioNotification, ctx: Context) -> None:
    services = ctx.services
    count = counter(services.telemetry)
    if not event.records:
        raise PermanentError(ErrorCode.INVALID_EVENT, "the notification has no Records")
    for record in event.records:
        if not record.s3.object.etag and record.event_name.startswith("s3:ObjectCreated:"):
            record = minio.with_etag(record, await _stored_etag(services, record))
        decision = minio.decide(record, services.settings)
        if isinstance(decision, minio.Ignore):
            ctx.log.info("ignored MinIO notification: %s", decision.reason)
            count.labels("minio", "ignored").inc()
            continue
        job = await submission.prepare(services, decision.tenant, decision.request(),
                                       idempotency_key=decision.idempotency_key,
                                       job_id=decision.job_id, ingest=True)
        await submission.commit(services, job)
        ctx.log.info("MinIO upload %s -> job %s", decision.key, job.job_id)
        count.labels("minio", "job").inc()


async def _stored_etag(services: Services, record: minio.S3Record) -> str:
    """The ETag of the object a record without one names (S3 always sends it; a foreign
    publisher may not): the store's, as the janitor's sweep would see it.

    Raises:
        PermanentError: ``input_not_found`` when the object is gone.
    """
    key = minio.object_key(record)
    try:
        return (await services.store.stat(key)).etag
    except ObjectNotFound:
        raise PermanentError(ErrorCode.INPUT_NOT_FOUND, f"no object at {key!r}",
                             details={"key": key}) from None


NOTIFICATIONS: Subscription[Any] = Subscription(
    family="ingest", subject=lambda n: n.minio_notifications, durable=DURABLE,
    # Not a bus Event (MinIO's own JSON), which the consumer loop decodes just the same.
    event_type=cast(Any, minio.MinioNotification), handler=on_notification, concurrency=8,
)


async def answer(services: Services, headers: dict[str, str] | None, body: bytes) -> str:
    """Check and commit one request; the job id.

    Raises:
        JetcutError: with the code the requester is answered with.
    """
    draft = requests.parse(headers, body, services.settings.default_tenant)
    request = JobRequest(recipe=draft.recipe, steps=draft.steps, params=draft.params,
                         inputs=draft.refs, callback_url=draft.callback_url,
                         callback_secret=draft.callback_secret)
    job = await submission.prepare(services, draft.tenant, request,
                                   idempotency_key=draft.idempotency_key, job_id=draft.job_id,
                                   ingest=True)
    await submission.commit(services, job)
    return job.job_id


class Responder:
    """Answers ``ingest.request`` in a queue group: any number of ingest processes share it."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.slots = asyncio.Semaphore(REQUEST_CONCURRENCY)
        self.tasks: set[asyncio.Task[None]] = set()
        self.sub: Any = None

    async def start(self) -> None:
        subject = self.services.names.ingest_request
        self.sub = await self.services.bus.nc.subscribe(subject, queue=QUEUE_GROUP,
                                                        cb=self._on_msg)

    async def _on_msg(self, msg: Msg) -> None:
        await self.slots.acquire()  # a full house holds the next message in the client
        task = asyncio.create_task(self._handle(msg))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _handle(self, msg: Msg) -> None:
        count = counter(self.services.telemetry)
        try:
            reply: dict[str, Any]
            try:
                job_id = await answer(self.services, msg.headers, msg.data)
                reply = {"job_id": job_id}
                count.labels("request", "job").inc()
            except Exception as exc:
                info = error_info(exc)
                if info.code == ErrorCode.INTERNAL:
                    log.exception("request on %s failed", msg.subject)
                else:
                    log.info("request refused: %s: %s", info.code, info.message)
                reply = {"error": msgspec.to_builtins(info)}
                count.labels("request", "error").inc()
            if msg.reply:
                with contextlib.suppress(Exception):  # the requester may have given up
                    await msg.respond(msgspec.json.encode(reply))
        finally:
            self.slots.release()

    async def stop(self) -> None:
        """Stop taking requests and let those in hand finish (their requesters wait)."""
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


async def serve(services: Services, stop: asyncio.Event) -> None:
    """Answer requests until stopped; the notifications' consumer is the runtime's, as
    every function's is (``NOTIFICATIONS``)."""
    check_rules(services.settings)
    responder = Responder(services)
    await responder.start()
    try:
        await stop.wait()
    finally:
        await responder.stop()


function = Function(name=NAME, doc=__doc__ or "", subscriptions=[NOTIFICATIONS], service=serve)
