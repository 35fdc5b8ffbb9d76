"""Which job an object under the ingest prefix makes, and under which id.

Two paths find such objects: a MinIO notification (``functions/ingest``) and the janitor's
reconciliation sweep, which lists the prefix for objects a lost or disabled notification
never announced (``functions/janitor/ingestsweep.py``). Both must make the *same* job for
the same object version, so that whichever comes second finds the job the first made:
the job id derives from (bucket, key, ETag) only -- what a notification carries and a
listing returns alike. A notification's ``versionId`` and ``sequencer`` are not in a
listing, so they are not part of the id: writing the same bytes to a key again (the same
ETag) is the job that already exists, whose outputs those bytes would make again; new
bytes are a new ETag and a new job.

Nothing here does I/O: rules and ids are unit-testable, the callers do the store and bus.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import msgspec

from shared.errors import ErrorCode, PermanentError
from shared.events import StepSpec
from shared.ids import job_id_for
from shared.jobrequest import JobRequest
from shared.settings import IngestRule, Settings


@dataclass(frozen=True)
class Ignore:
    """Acknowledge and drop: not an error, just nothing jetcut was asked to do."""

    reason: str


@dataclass(frozen=True)
class Start:
    """Start one job for an uploaded object version."""

    job_id: str
    idempotency_key: str
    tenant: str
    key: str
    filename: str
    size: int | None
    rule: IngestRule

    @property
    def steps(self) -> dict[str, Any] | None:
        return self.rule.steps

    def request(self) -> JobRequest:
        """The job request this object makes (checked by ``shared.submission``)."""
        return JobRequest(recipe=self.rule.recipe, steps=rule_steps(self.rule),
                          params=dict(self.rule.params), input=self.key)


def rule_steps(rule: IngestRule) -> dict[str, StepSpec] | None:
    """A rule's inline steps as the Structs a job carries.

    Raises:
        PermanentError: ``invalid_recipe`` when they do not decode.
    """
    if rule.steps is None:
        return None
    try:
        return msgspec.convert(rule.steps, dict[str, StepSpec])
    except msgspec.ValidationError as exc:
        raise PermanentError(ErrorCode.INVALID_RECIPE, f"ingest rule steps: {exc}") from None


def match(rules: list[IngestRule], bucket: str, key: str) -> IngestRule | None:
    """The first rule whose bucket (if set) and prefix match."""
    for rule in rules:
        if (rule.bucket is None or rule.bucket == bucket) and key.startswith(rule.prefix):
            return rule
    return None


def idempotency_key(bucket: str, key: str, etag: str) -> str:
    """What names one object version, for notifications and the sweep alike. JSON keeps
    the parts apart: no bucket/key/ETag can be spelled two ways."""
    return "object:" + json.dumps([bucket, key, etag.strip('"')], separators=(",", ":"))


def plan_object(settings: Settings, bucket: str, key: str, etag: str,
                size: int | None) -> Start | Ignore:
    """The job an object version starts under ``settings``' rules, or why none.

    ``key`` must already be a checked store key (``shared.store.base.validate_key``).

    Raises:
        PermanentError: ``invalid_event`` when there is no ETag to name the version by.
    """
    if bucket != settings.bucket:
        return Ignore(f"bucket {bucket!r} is not the store's bucket {settings.bucket!r}")
    if not key.startswith(settings.ingest_prefix):
        return Ignore(f"key {key!r} is outside the ingest prefix {settings.ingest_prefix!r}")
    rule = match(settings.ingest_rules, bucket, key)
    if rule is None:
        return Ignore(f"no ingest rule matches {bucket}/{key}")
    if not etag.strip('"'):
        raise PermanentError(ErrorCode.INVALID_EVENT,
                             f"object {key!r} has no ETag to tell its versions apart",
                             details={"key": key})
    tenant = rule.tenant or settings.default_tenant
    idem = idempotency_key(bucket, key, etag)
    return Start(job_id=job_id_for(tenant, idem), idempotency_key=idem, tenant=tenant, key=key,
                 filename=key.rsplit("/", 1)[-1], size=size, rule=rule)
