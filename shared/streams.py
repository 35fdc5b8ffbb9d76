"""Stream, consumer and KV definitions as plain data, and idempotent provisioning.

Every function provisions at start-up, so whichever process starts first creates the streams
and KV bucket, and each function creates its own consumers. Consumers deliver from the start
of their stream, so work published before a consumer existed still reaches it. Running this
again, from any number of processes at once, changes nothing.
"""

from __future__ import annotations

import logging

from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, BucketNotFoundError
from nats.js.kv import KeyValue

from shared.settings import Settings
from shared.subjects import Family, Names

log = logging.getLogger(__name__)

DAY = 24 * 3600.0
STREAM_EXISTS_DIFFERENT = 10058


def stream_configs(names: Names, settings: Settings) -> list[api.StreamConfig]:
    """Every stream, one per ``shared.subjects.Family``: the four of the contract
    (docs/design.md, "Streams, subjects, consumers"); ``INGEST``, MinIO's bucket
    notifications for the ingest function; and ``ADVISORIES``, which keeps JetStream's
    max-deliveries advisories for the deadletter function (a plain subscription would miss
    those sent while no deadletter runs)."""

    def stream(name: str, family: Family, retention: api.RetentionPolicy, max_age: float,
               duplicate_window: float, allow_direct: bool | None = None,
               discard: api.DiscardPolicy = api.DiscardPolicy.NEW) -> api.StreamConfig:
        # Bounded, and a full stream refuses the publish (the publisher sees an error and
        # retries or answers 503) instead of silently dropping its oldest work.
        return api.StreamConfig(
            name=name, subjects=[names.all(family)], retention=retention, max_age=max_age,
            duplicate_window=duplicate_window, allow_direct=allow_direct,
            storage=api.StorageType.FILE, num_replicas=settings.replicas,
            max_msgs=settings.stream_max_msgs, max_bytes=settings.stream_max_bytes,
            discard=discard,
        )

    limits, work_queue = api.RetentionPolicy.LIMITS, api.RetentionPolicy.WORK_QUEUE
    return [
        # jobs.submit dedups on Nats-Msg-Id = job id within the hour; beyond it the
        # conductor's create-only job record catches repeats.
        stream(names.jobs_stream, "jobs", limits, 7 * DAY, 3600.0),
        stream(names.stages_stream, "stages", work_queue, 7 * DAY, 600.0),
        # Progress events are a replayable log, not the record (the job KV is): when full,
        # the oldest go, so a flood of progress can never block a job's work.
        stream(names.events_stream, "events", limits, DAY, 120.0, allow_direct=True,
               discard=api.DiscardPolicy.OLD),
        stream(names.dlq_stream, "dlq", limits, 30 * DAY, 600.0),
        # MinIO notifications wait here while ingest is down (MinIO publishes with JetStream
        # on and keeps what gets no PubAck in its queue dir). Only ``ingest.minio``: the
        # request/reply subject ``ingest.request`` must stay outside every stream.
        api.StreamConfig(
            name=names.ingest_stream, subjects=[names.minio_notifications],
            retention=work_queue, max_age=7 * DAY, duplicate_window=600.0,
            storage=api.StorageType.FILE, num_replicas=settings.replicas,
            max_msgs=settings.stream_max_msgs, max_bytes=settings.stream_max_bytes,
            discard=api.DiscardPolicy.NEW,
        ),
        api.StreamConfig(
            name=names.advisories_stream, retention=limits, max_age=3 * DAY,
            subjects=[names.max_deliveries(names.jobs_stream),
                      names.max_deliveries(names.stages_stream)],
            storage=api.StorageType.FILE, num_replicas=settings.replicas,
        ),
    ]


def consumer_config(
    *, durable: str, subject: str, ack_wait: float, max_deliver: int, max_ack_pending: int,
    replicas: int,
) -> api.ConsumerConfig:
    """A durable pull consumer with explicit acks.

    ``backoff`` is deliberately unset: it applies only to ack timeouts (a worker that died),
    which must be redelivered within one AckWait. Failures nak with an explicit delay instead.
    """
    return api.ConsumerConfig(
        name=durable, durable_name=durable, filter_subject=subject,
        ack_policy=api.AckPolicy.EXPLICIT, deliver_policy=api.DeliverPolicy.ALL,
        ack_wait=ack_wait, max_deliver=max_deliver, max_ack_pending=max_ack_pending,
        num_replicas=replicas,
    )


async def ensure_stream(js: JetStreamContext, config: api.StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except BadRequestError as exc:
        if exc.err_code != STREAM_EXISTS_DIFFERENT:
            raise
        log.info("updating stream %s to the current definition", config.name)
        await js.update_stream(config)


async def ensure_jobs_kv(js: JetStreamContext, names: Names, settings: Settings) -> KeyValue:
    try:
        return await js.key_value(names.jobs_bucket)
    except BucketNotFoundError:
        return await js.create_key_value(
            api.KeyValueConfig(
                bucket=names.jobs_bucket, history=5, storage=api.StorageType.FILE,
                replicas=settings.replicas, description="jetcut job records",
            )
        )


async def provision(
    js: JetStreamContext, names: Names, settings: Settings,
    consumers: list[tuple[str, api.ConsumerConfig]],
) -> KeyValue:
    """Create or update every stream, the jobs KV bucket and the given consumers."""
    for stream_config in stream_configs(names, settings):
        await ensure_stream(js, stream_config)
    kv = await ensure_jobs_kv(js, names, settings)
    for stream, consumer in consumers:
        await js.add_consumer(stream, consumer)
    return kv
