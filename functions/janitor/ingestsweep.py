"""Uploads never missed: make the job of every object under the ingest prefix that has none.

A MinIO notification can be lost (MinIO's queue dir wiped, the NATS target disabled or
misconfigured, an event dropped before JetStream acknowledged it): the object sits in the
bucket and no job ever runs. Each sweep lists ``JETCUT_INGEST_PREFIX`` and, for every object
a rule matches whose job does not exist, makes that job through ``shared.submission`` --
the one way a job request becomes a job -- under the id a notification would have given it
(``shared.ingestrules``: bucket, key, ETag). So each object version gets exactly one job:
a second sweep finds it, a notification arriving later dedups on the same id (the record
exists; ``jobs.submit`` carries the id as ``Nats-Msg-Id``), and a notification racing the
sweep loses the record's create-only write.

Only objects aged between ``JETCUT_INGEST_SWEEP_GRACE_S`` (younger: the notification is
probably on its way) and ``JETCUT_INGEST_SWEEP_MAX_AGE_S`` (at most ``JETCUT_RETENTION_S``: a
job expires ``retention_s`` after it *finished*, so its object is older than that by then and
is never processed again) are looked at.
"""

from __future__ import annotations

import logging

from shared import submission
from shared.errors import JetcutError
from shared.function import Services
from shared.ingestrules import Start, plan_object
from shared.store.base import validate_key

log = logging.getLogger("jetcut.janitor")


async def make_missing_jobs(services: Services, known: set[str], now: float) -> list[str]:
    """Jobs made for objects under the ingest prefix that had none (their ids).

    ``known`` holds the ids of every job record read by this sweep. An object that cannot
    make a job (an unsafe key, a rule whose request no longer validates, a different
    request under the same id) is logged and skipped; the others still get theirs.
    """
    settings = services.settings
    window = min(settings.ingest_sweep_max_age_s, settings.retention_s)
    if not settings.ingest_rules or window <= 0:
        return []
    made: list[str] = []
    for obj in await services.store.list(settings.ingest_prefix):
        age = now - obj.last_modified
        if not settings.ingest_sweep_grace_s <= age <= window:
            continue
        try:
            key = validate_key(obj.key)
            decision = plan_object(settings, settings.bucket, key, obj.etag, obj.size)
            if not isinstance(decision, Start) or decision.job_id in known:
                continue
            job = await submission.prepare(services, decision.tenant, decision.request(),
                                           idempotency_key=decision.idempotency_key,
                                           job_id=decision.job_id, ingest=True)
            claim = await submission.commit(services, job)
        except JetcutError as exc:  # InvalidKey included
            if not exc.non_retryable:
                raise  # the store or the bus is down: the whole part fails, tried next sweep
            log.warning("janitor: object %r under the ingest prefix makes no job: %s",
                        obj.key, exc)
            continue
        if claim.created:
            log.info("janitor: %s had no job (its notification was lost): made job %s",
                     key, decision.job_id)
            made.append(decision.job_id)
    if made:
        log.warning("janitor: %d object(s) under %s had no job (notifications lost or off): "
                    "made their jobs", len(made), settings.ingest_prefix)
    return made
