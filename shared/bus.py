"""Publishing on the bus: headers every message carries, and retries that never double work.

A PubAck is the only commit point. A publish that times out, or finds no responder while the
server restarts, is retried with the *same* ``Nats-Msg-Id``, so the stream stores it once.
Every message carries W3C ``traceparent`` and CloudEvents ``ce-*`` headers.
"""

from __future__ import annotations

import logging
import ssl
import uuid
from datetime import UTC, datetime

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api

from shared.events import Event, JobEvent, encode
from shared.retry import ELECTION_WINDOW_S, TRANSIENT_NATS_OR_CLOSED, ride_out
from shared.settings import Settings
from shared.subjects import Names
from shared.telemetry import Telemetry, subject_kind

log = logging.getLogger(__name__)

class PublishFailed(Exception):
    """Every attempt of a publish failed; the message may or may not be stored."""


class StreamFull(PublishFailed):
    """The stream is at its ``max_msgs`` / ``max_bytes`` limit and refused the message
    (``discard: new``). Not retried within the publish: the backlog has to drain first."""


STREAM_STORE_FAILED = 10077
"""JetStream's error code for a publish the stream refused to store (a full stream)."""


async def connect(settings: Settings, *, name: str) -> NATS:
    """Connect to any seed and keep reconnecting forever (the bus is never optional).

    Authenticates with a user credentials file (``nats_creds``, operator mode) or a user
    and password (``nats_user``/``nats_password``, infra/nats/auth), and verifies the
    server's TLS certificate against ``nats_tls_ca`` when set.
    """
    tls: ssl.SSLContext | None = None
    if settings.nats_tls_ca:
        tls = ssl.create_default_context(cafile=settings.nats_tls_ca)

    async def on_error(exc: Exception) -> None:
        log.warning("nats error: %s", exc)

    client: list[NATS] = []

    async def on_disconnected() -> None:
        if client and (client[0].is_closed or client[0].is_draining):
            return  # our own shutdown, not an outage
        log.warning("nats disconnected; reconnecting")

    async def on_reconnected() -> None:
        log.info("nats reconnected")

    nc = await nats.connect(
        servers=settings.nats_servers,
        name=name,
        user_credentials=settings.nats_creds,
        user=settings.nats_user,
        password=settings.nats_password,
        tls=tls,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        connect_timeout=5,
        error_cb=on_error,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
    )
    client.append(nc)
    return nc


class Bus:
    """Publishes events with trace context, CloudEvents headers and idempotent retries."""

    def __init__(
        self, nc: NATS, names: Names, telemetry: Telemetry, *, source: str,
        publish_window_s: float = ELECTION_WINDOW_S, publish_timeout_s: float = 5.0,
    ) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=publish_timeout_s)
        self.names = names
        self.telemetry = telemetry
        self.source = source
        self.publish_window_s = publish_window_s
        self.publish_timeout_s = publish_timeout_s

    def headers(self, event: Event, msg_id: str) -> dict[str, str]:
        tag = str(type(event).__struct_config__.tag)
        headers = {
            "Nats-Msg-Id": msg_id,
            "ce-specversion": "1.0",
            "ce-type": f"io.jetcut.{tag}",
            "ce-source": self.source,
            "ce-id": msg_id,
            "ce-time": datetime.now(UTC).isoformat(),
            "content-type": "application/json",
        }
        return self.telemetry.inject(headers)

    async def publish(
        self, subject: str, event: Event, *, msg_id: str | None = None,
        extra_headers: dict[str, str] | None = None,
    ) -> api.PubAck:
        """Publish to a stream and wait for its PubAck, retrying with the same message id.

        Retries for ``publish_window_s``: long enough to ride out a leader election or a
        reconnect to another seed, which a caller would otherwise see as a failure.

        Raises:
            PublishFailed: when no attempt within the window got a PubAck.
        """
        msg_id = msg_id or uuid.uuid4().hex
        payload = encode(event)
        contract = self.names.strip(subject)
        kind = subject_kind(contract)
        with self.telemetry.publish_span(subject, message_id=msg_id,
                                         contract_subject=contract):
            headers = self.headers(event, msg_id)
            if extra_headers:
                headers.update(extra_headers)
            attempts = 1

            async def attempt() -> api.PubAck:
                try:
                    return await self.js.publish(
                        subject, payload, headers=headers, timeout=self.publish_timeout_s
                    )
                except TRANSIENT_NATS_OR_CLOSED as exc:
                    if getattr(exc, "err_code", None) == STREAM_STORE_FAILED:
                        raise StreamFull(f"{subject}: the stream is full ({exc})") from exc
                    raise

            def retrying(number: int, exc: BaseException) -> None:
                nonlocal attempts
                attempts = number + 1
                log.info("publish to %s failed (%r); retry %d", subject, exc, number)

            try:
                ack = await ride_out(attempt, window_s=self.publish_window_s,
                                     retry_on=TRANSIENT_NATS_OR_CLOSED, on_retry=retrying)
            except StreamFull:
                self.telemetry.publishes.labels(kind, "failed").inc()
                raise
            except TRANSIENT_NATS_OR_CLOSED as exc:
                self.telemetry.publishes.labels(kind, "failed").inc()
                raise PublishFailed(
                    f"publish to {subject} failed for {self.publish_window_s:.0f}s "
                    f"({attempts} attempts): {exc!r}"
                ) from exc
            self.telemetry.publishes.labels(kind, "retried" if attempts > 1 else "ok").inc()
            return ack

    async def emit(self, event: JobEvent, *, durable: bool = False,
                   msg_id: str | None = None) -> None:
        """Announce job lifecycle/progress on ``events.<tenant>.<job_id>``.

        Fire-and-forget by default: the EVENTS stream still stores what reaches the server,
        and the job record in KV, not this stream, is the truth a watcher reconciles with.
        ``durable`` waits for the PubAck, for callers that must know it was stored (status
        changes drive callbacks); ``msg_id`` then makes a repeat a no-op.
        """
        subject = self.names.events(event.tenant, event.job_id)
        if durable:
            await self.publish(subject, event, msg_id=msg_id)
            return
        msg_id = uuid.uuid4().hex
        try:
            await self.nc.publish(subject, encode(event), headers=self.headers(event, msg_id))
        except (nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError) as exc:
            log.debug("progress event dropped: %r", exc)
