"""MinIO bucket notifications: the event JSON MinIO's NATS target publishes, and what it asks for.

MinIO wraps each S3 event record as ``{EventName, Key, Records: [record]}`` (its
``event.Log``): ``Key`` is ``<bucket>/<object>`` decoded, while ``Records[].s3.object.key``
is URL-encoded the way S3 does it (``url.QueryEscape``: a space is ``+``, ``(`` is ``%28``).
Only the records are trusted here; the key is decoded once, with ``unquote_plus``.

Nothing in this module does I/O: ``decide`` turns one record into "start this job" or
"ignore, because ..." (``shared.ingestrules``), so the rules are unit-testable and the
handler stays small. The job id names the object version by (bucket, key, ETag), as the
janitor's reconciliation sweep does for objects whose notification was lost.
"""

from __future__ import annotations

from urllib.parse import unquote_plus

import msgspec

from shared.errors import ErrorCode, InvalidKey, PermanentError
from shared.ingestrules import Ignore, Start, plan_object
from shared.settings import Settings
from shared.store.base import validate_key

__all__ = ["Ignore", "MinioNotification", "S3Record", "Start", "decide", "object_key",
           "with_etag"]


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


def decide(record: S3Record, settings: Settings) -> Start | Ignore:
    """What one notification record asks for, under ``settings``' rules
    (``shared.ingestrules``: the janitor's sweep names the same object version the same way).

    Raises:
        PermanentError: ``invalid_event`` for a record no rule could make sense of, or one
            without an ETag (``with_etag`` fills one in from the store first).
    """
    if not record.event_name.startswith("s3:ObjectCreated:"):
        return Ignore(f"event {record.event_name!r} is not an ObjectCreated event")
    return plan_object(settings, record.s3.bucket.name, object_key(record),
                       record.s3.object.etag, record.s3.object.size or None)


def with_etag(record: S3Record, etag: str) -> S3Record:
    """The record with the ETag it lacked (read from the store)."""
    obj = msgspec.structs.replace(record.s3.object, etag=etag)
    return msgspec.structs.replace(record, s3=msgspec.structs.replace(record.s3, object=obj))
