"""MinIO bucket notifications: the event JSON MinIO's NATS target publishes, and what it asks for.

MinIO wraps each S3 event record as ``{EventName, Key, Records: [record]}`` (its
``event.Log``): ``Key`` is ``<bucket>/<object>`` decoded, while ``Records[].s3.object.key``
is URL-encoded the way S3 does it (``url.QueryEscape``: a space is ``+``, ``(`` is ``%28``).
Only the records are trusted here; the key is decoded once, with ``unquote_plus``.

Nothing in this module does I/O: ``decide`` turns one record into "start this job" or
"ignore, because ...", so the rules are unit-testable and the handler stays small.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

import msgspec

from shared.errors import ErrorCode, InvalidKey, PermanentError
from shared.ids import job_id_for
from shared.settings import IngestRule, Settings
from shared.store.base import validate_key


class S3Bucket(msgspec.Struct, frozen=True):
    name: str


class S3Object(msgspec.Struct, frozen=True):
    key: str
    size: int = 0
    etag: str = msgspec.field(default="", name="eTag")
    version_id: str = msgspec.field(default="", name="versionId")
    sequencer: str = ""


class S3Entity(msgspec.Struct, frozen=True):
    bucket: S3Bucket
    object: S3Object


class S3Record(msgspec.Struct, frozen=True):
    event_name: str = msgspec.field(name="eventName")
    s3: S3Entity
    event_time: str = msgspec.field(default="", name="eventTime")


class MinioNotification(msgspec.Struct, frozen=True):
    """MinIO's ``event.Log``. Unknown fields are ignored (S3 adds some over time)."""

    records: list[S3Record] = msgspec.field(name="Records")
    event_name: str = msgspec.field(default="", name="EventName")
    key: str = msgspec.field(default="", name="Key")


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


def object_key(record: S3Record) -> str:
    """The record's object key, URL-decoded and checked like every store key.

    Raises:
        PermanentError: ``invalid_event`` for a key that could escape its prefix (``..``,
            absolute, control characters, empty segments) or does not decode.
    """
    raw = record.s3.object.key
    try:
        key = unquote_plus(raw, errors="strict")
        validate_key(key)
    except (UnicodeDecodeError, InvalidKey) as exc:
        reason = exc.message if isinstance(exc, InvalidKey) else "not valid UTF-8 once decoded"
        raise PermanentError(ErrorCode.INVALID_EVENT, f"unusable object key {raw!r}: {reason}",
                             details={"key": raw}) from None
    return key


def version_of(record: S3Record) -> str:
    """What names this version of the object: MinIO's ``versionId`` on a versioned bucket,
    else ``eTag`` + ``sequencer`` (which changes with every write, so an overwrite with the
    same bytes is a new job while a repeated notification is not).

    Raises:
        PermanentError: ``invalid_event`` when the record carries none of them.
    """
    obj = record.s3.object
    if obj.version_id and obj.version_id != "null":
        return f"v:{obj.version_id}"
    if obj.etag or obj.sequencer:
        return f"e:{obj.etag}:{obj.sequencer}"
    raise PermanentError(ErrorCode.INVALID_EVENT,
                         "the record has no versionId, eTag or sequencer to tell versions apart")


def match(rules: list[IngestRule], bucket: str, key: str) -> IngestRule | None:
    """The first rule whose bucket (if set) and prefix match."""
    for rule in rules:
        if (rule.bucket is None or rule.bucket == bucket) and key.startswith(rule.prefix):
            return rule
    return None


def decide(record: S3Record, settings: Settings) -> Start | Ignore:
    """What one notification record asks for, under ``settings``' rules.

    Raises:
        PermanentError: ``invalid_event`` for a record no rule could make sense of.
    """
    if not record.event_name.startswith("s3:ObjectCreated:"):
        return Ignore(f"event {record.event_name!r} is not an ObjectCreated event")
    bucket = record.s3.bucket.name
    key = object_key(record)
    if bucket != settings.bucket:
        return Ignore(f"bucket {bucket!r} is not the store's bucket {settings.bucket!r}")
    if not key.startswith(settings.ingest_prefix):
        return Ignore(f"key {key!r} is outside the ingest prefix {settings.ingest_prefix!r}")
    rule = match(settings.ingest_rules, bucket, key)
    if rule is None:
        return Ignore(f"no ingest rule matches {bucket}/{key}")
    tenant = rule.tenant or settings.default_tenant
    # JSON keeps the parts apart: no bucket/key/version can be spelled two ways.
    idem = "minio:" + json.dumps([bucket, key, version_of(record)], separators=(",", ":"))
    return Start(
        job_id=job_id_for(tenant, idem), idempotency_key=idem, tenant=tenant, key=key,
        filename=key.rsplit("/", 1)[-1], size=record.s3.object.size or None, rule=rule,
    )
