"""Stream, consumer and KV definitions as plain data, and idempotent provisioning.

Every function provisions at start-up, so whichever process starts first creates everything,
and every consumer exists before the first message that it must see is published. Running
it again, from any number of processes at once, changes nothing.
"""

from __future__ import annotations

import logging

from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, BucketNotFoundError
from nats.js.kv import KeyValue

from shared.settings import Settings
from shared.subjects import Names

log = logging.getLogger(__name__)

DAY = 24 * 3600.0
STREAM_EXISTS_DIFFERENT = 10058


def stream_configs(names: Names, settings: Settings) -> list[api.StreamConfig]:
    """The four streams of the contract (DESIGN.md, "Streams, subjects, consumers")."""
    common = {"storage": api.StorageType.FILE, "num_replicas": settings.replicas}
    return [
        api.StreamConfig(
            name=names.jobs_stream, subjects=[names.all("jobs")],
            retention=api.RetentionPolicy.LIMITS, max_age=7 * DAY,
            # jobs.submit dedups on Nats-Msg-Id = idempotency key within this window;
            # beyond it the conductor's create-only job record catches repeats.
            duplicate_window=3600.0, **common,
        ),
        api.StreamConfig(
            name=names.stages_stream, subjects=[names.all("stages")],
            retention=api.RetentionPolicy.WORK_QUEUE, max_age=7 * DAY,
            duplicate_window=600.0, **common,
        ),
        api.StreamConfig(
            name=names.events_stream, subjects=[names.all("events")],
            retention=api.RetentionPolicy.LIMITS, max_age=DAY,
            duplicate_window=120.0, allow_direct=True, **common,
        ),
        api.StreamConfig(
            name=names.dlq_stream, subjects=[names.all("dlq")],
            retention=api.RetentionPolicy.LIMITS, max_age=30 * DAY,
            duplicate_window=600.0, **common,
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
    js: JetStreamContext, names: Names, settings: Settings, consumers: list[tuple[str, api.ConsumerConfig]],
) -> KeyValue:
    """Create or update every stream, the jobs KV bucket and the given consumers."""
    for config in stream_configs(names, settings):
        await ensure_stream(js, config)
    kv = await ensure_jobs_kv(js, names, settings)
    for stream, config in consumers:
        await js.add_consumer(stream, config)
    return kv
