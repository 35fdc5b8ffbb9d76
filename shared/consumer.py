"""The durable pull-consumer loop every function runs, and how it settles messages.

* Backpressure: a process fetches only when it has a free slot (``concurrency``), and long
  tasks one at a time, so work waits in the stream, not in a worker's buffer.
* Heartbeats: ``in_progress()`` every AckWait/3 while a handler runs; a killed worker stops
  heartbeating and its task is redelivered within one AckWait.
* Settlement from exceptions, decided by ``shared.retry.settle``; poison messages and
  exhausted retries are copied to the DLQ stream before they are terminated.
* Watchdog: pull subscriptions can silently stop after a server restart (nats.py #504) or
  stall in ``fetch`` (#986); a loop that sees nothing for ``watchdog_s`` while its consumer
  reports pending work rebuilds its subscription.
* Admission: before each fetch, a stage worker checks its memory and disk headroom (a
  check that found room stands for ``HEADROOM_RECHECK_S``), and
  every loop checks the store's circuit breaker (``shared.admission``); when either says
  "not now" the loop waits, and the task waits in the stream.
* Retry policy per function (``JETCUT_RETRY_POLICY``, ``shared.retry.policy_for``):
  MaxDeliver and backoff.
* Drain: on stop, no new fetch starts (one already waiting ends within
  ``fetch_timeout_s``); in-flight handlers get ``drain_grace_s`` to finish,
  then are cancelled and their messages nak'ed for immediate redelivery elsewhere. Nothing
  unfinished is ever acked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from shared import msgids
from shared.admission import Headroom, StoreBreaker
from shared.errors import ErrorCode, StoreUnavailable
from shared.events import DeadLetter, ErrorInfo, decode
from shared.function import Context, Delivery, Subscription
from shared.k8s_podcost import TasksInHand
from shared.lanes import BulkLane
from shared.retry import TRANSIENT_NATS_OR_CLOSED, policy_for, settle

log = logging.getLogger(__name__)
HEADROOM_RECHECK_S = 0.25
"""A headroom check that found room stands this long: reading /proc/meminfo and statvfs
before every fetch was 3% of a noop worker's CPU, and memory does not fill in 250 ms."""

class ConsumerLoop:
    """Fetch, handle and settle messages of one subscription until told to stop."""

    def __init__(
        self, sub: Subscription[Any], ctx: Context, *, stream: str, subject: str,
        ensure_consumer: Any, headroom: Headroom | None = None,
        breaker: StoreBreaker | None = None, in_hand: TasksInHand | None = None,
        bulk: BulkLane | None = None,
    ) -> None:
        self.sub = sub
        self.bulk = bulk
        """A stage's bulk lane (``shared.lanes``): fetched from when the fast one is empty."""
        self.in_hand = in_hand
        self.ctx = ctx
        self.stream = stream
        self.subject = subject
        self.ensure_consumer = ensure_consumer
        settings = ctx.services.settings
        self.settings = settings
        self.policy = policy_for(settings, ctx.function)
        self.headroom = headroom
        self.breaker = breaker
        self.concurrency = settings.concurrency or sub.concurrency or 1
        self.js: JetStreamContext = ctx.services.bus.js
        self.telemetry = ctx.services.telemetry
        self.kind = ctx.services.names.strip(subject)
        self.inflight: dict[asyncio.Task[None], Msg] = {}
        self.psub: JetStreamContext.PullSubscription | None = None
        self.last_activity = time.monotonic()
        self.rebuilds = 0
        self.waiting_for: str | None = None
        self.headroom_ok_until = 0.0
        """Until when the last headroom check that found room stands (see _admitted)."""

    async def _subscribe(self) -> None:
        if self.psub is not None:
            with contextlib.suppress(Exception):
                await self.psub.unsubscribe()
        self.psub = await self.js.pull_subscribe_bind(durable=self.sub.durable, stream=self.stream)
        self.last_activity = time.monotonic()

    async def run(self, stop: asyncio.Event) -> None:
        await self._subscribe()
        try:
            while not stop.is_set():
                free = self.concurrency - len(self.inflight)
                if free <= 0 and self.bulk is not None:
                    free = self.bulk.overtaking(self.inflight, self.concurrency)
                if free <= 0:
                    await self._wait_for_slot(stop)
                    continue
                if not await self._admitted(stop):
                    continue
                msgs = await self._fetch(min(free, self.sub.batch))
                if msgs and free > len(msgs):
                    msgs += await self._top_up(msgs[-1], free - len(msgs))
                for msg in msgs:
                    task = asyncio.create_task(self._handle(msg))
                    self.inflight[task] = msg
                    task.add_done_callback(self.inflight.pop)
                    if self.in_hand is not None:
                        self.in_hand.changed(+1)
                        task.add_done_callback(self.in_hand.settled)
        finally:
            await self._drain()
            if self.bulk is not None:
                await self.bulk.close()
            if self.psub is not None:
                with contextlib.suppress(Exception):
                    await self.psub.unsubscribe()

    async def _wait_for_slot(self, stop: asyncio.Event) -> None:
        stopper = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([*self.inflight, stopper], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()

    async def _admitted(self, stop: asyncio.Event) -> bool:
        """True when this loop may fetch now; otherwise wait one poll interval (or until
        stopped) and return False, so the caller looks again."""
        reason: str | None = None
        interval = self.settings.admission_poll_s
        if self.breaker is not None and self.breaker.open:
            if await self.breaker.probe():
                return True
            reason, interval = "store", self.breaker.probe_interval_s
        elif self.headroom is not None and time.monotonic() >= self.headroom_ok_until:
            shortage = self.headroom.shortage()
            if shortage is None:
                self.headroom_ok_until = time.monotonic() + HEADROOM_RECHECK_S
            else:
                reason = shortage.split(":", 1)[0]
                if self.waiting_for != reason:
                    log.warning("%s: not fetching: %s", self.sub.durable, shortage)
        if reason is None:
            if self.waiting_for is not None:
                log.info("%s: fetching again (%s recovered)", self.sub.durable, self.waiting_for)
            self.waiting_for = None
            return True
        if self.waiting_for != reason:
            self.telemetry.admission_waits.labels(self.ctx.function, reason).inc()
        self.waiting_for = reason
        self.last_activity = time.monotonic()  # waiting on purpose is not a stalled pull
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        return False

    async def _fetch(self, batch: int) -> list[Msg]:
        assert self.psub is not None
        try:
            if self.bulk is not None:
                msgs = await self.bulk.fetch(self.psub, batch, self.settings.fetch_timeout_s)
            else:
                msgs = await self.psub.fetch(batch, timeout=self.settings.fetch_timeout_s)
        except (nats.errors.TimeoutError, TimeoutError):
            # nats-py raises its own TimeoutError for batch=1 and the builtin for batch>1.
            await self._watchdog()
            return []
        except TRANSIENT_NATS_OR_CLOSED as exc:
            log.info("%s: fetch interrupted (%r); retrying", self.sub.durable, exc)
            await asyncio.sleep(0.5)
            return []
        except nats.js.errors.NotFoundError:
            log.warning("%s: consumer missing; re-provisioning", self.sub.durable)
            await self.ensure_consumer()
            await self._subscribe()
            return []
        self.last_activity = time.monotonic()
        return msgs

    async def _top_up(self, last: Msg, room: int) -> list[Msg]:
        """More messages in one pull, when the last one delivered says more are waiting.

        Fetching one at a time (``Subscription.batch``) costs a pull request per message;
        a busy loop with free slots instead asks once for what the stream holds right now
        (``no_wait``: nothing is held back in a lingering pull, unlike nats-py's batched
        ``fetch``). Idle loops never pay for it: the count comes with each delivery.
        """
        try:
            waiting = last.metadata.num_pending
        except Exception:  # not a JetStream delivery: nothing to go by
            return []
        want = min(room, waiting or 0)
        if want <= 0 or self.psub is None:
            return []
        psub: Any = self.psub  # nats-py keeps the pull subject and inbox private
        got: list[Msg] = []
        try:
            await self.js._nc.publish(psub._nms, json.dumps({"batch": want, "no_wait": True})
                                      .encode(), reply=psub._deliver)
            while len(got) < want:
                msg = await psub._sub.next_msg(timeout=self.settings.fetch_timeout_s)
                if JetStreamContext.is_status_msg(msg):
                    break  # 404/408: the stream had fewer than it said
                got.append(msg)
        except (nats.errors.TimeoutError, TimeoutError):
            pass  # anything arriving later waits in the inbox for the next fetch
        except TRANSIENT_NATS_OR_CLOSED as exc:  # what came is handled; the rest redelivered
            log.info("%s: top-up pull interrupted (%r)", self.sub.durable, exc)
        return got

    async def _watchdog(self) -> None:
        if time.monotonic() - self.last_activity < self.settings.watchdog_s:
            return
        self.last_activity = time.monotonic()
        try:
            info = await self.js.consumer_info(self.stream, self.sub.durable)
        except nats.js.errors.NotFoundError:
            await self.ensure_consumer()
            await self._subscribe()
            return
        except Exception as exc:  # the server may be mid-restart; look again next round
            log.info("%s: watchdog could not read consumer info: %r", self.sub.durable, exc)
            return
        if (info.num_pending or 0) > 0 and (info.num_ack_pending or 0) < (
            info.config.max_ack_pending or 1
        ):
            self.rebuilds += 1
            log.warning(
                "%s: %d pending but nothing fetched for %.0fs; rebuilding subscription",
                self.sub.durable, info.num_pending, self.settings.watchdog_s,
            )
            await self._subscribe()

    async def _heartbeat(self, msg: Msg) -> None:
        interval = max(0.5, self.settings.ack_wait_s / 3)
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _handle(self, msg: Msg) -> None:
        meta = msg.metadata
        delivery = Delivery(
            subject=msg.subject, number=meta.num_delivered or 1,
            max_deliver=self.policy.max_deliver,
            stream_seq=meta.sequence.stream,
        )
        ctx = self.ctx.for_delivery(delivery)
        function = self.ctx.function
        in_flight = self.telemetry.in_flight.labels(function)
        in_flight.inc()
        started = time.monotonic()
        outcome = "ack"
        with self.telemetry.consume_span(
            msg.subject, msg.headers, function=function, consumer_group=self.sub.durable,
            contract_subject=ctx.services.names.strip(msg.subject),
        ) as span:
            heartbeat = asyncio.create_task(self._heartbeat(msg))
            try:
                outcome = await self._settle(msg, ctx)
            except asyncio.CancelledError:
                # Drain ran out of grace: hand the message back for immediate redelivery.
                outcome = "nak"
                with contextlib.suppress(Exception):
                    await asyncio.shield(msg.nak())
                raise
            finally:
                heartbeat.cancel()
                in_flight.dec()
                span.set_attribute("jetcut.outcome", outcome)
                span.set_attribute("jetcut.delivery", delivery.number)
                self.telemetry.messages.labels(function, self.kind, outcome).inc()
                self.telemetry.handler_seconds.labels(function, self.kind, outcome).observe(
                    time.monotonic() - started
                )

    async def _settle(self, msg: Msg, ctx: Context) -> str:
        try:
            event = decode(self.sub.event_type, msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            error = ErrorInfo(
                code=str(ErrorCode.INVALID_EVENT),
                message=f"cannot decode {self.sub.event_type.__name__}: {exc}",
            )
            log.warning("%s: poison message seq=%s: %s", self.sub.durable,
                        ctx.delivery.stream_seq, error.message)
            await self._dead_letter(msg, ctx, error)
            await msg.term()
            return "dead_letter"
        try:
            await self.sub.handler(event, ctx)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self.breaker is not None and isinstance(exc, StoreUnavailable):
                self.breaker.record_failure()
            return await self._settle_failure(msg, ctx, event, exc)
        if self.breaker is not None:
            self.breaker.record_success()
        await msg.ack()
        return "ack"

    async def _settle_failure(self, msg: Msg, ctx: Context, event: Any, exc: Exception) -> str:
        verdict = settle(exc, delivery=ctx.delivery.number, policy=self.policy)
        if verdict.verb == "nak":
            if not verdict.expected:
                assert verdict.error is not None
                log.info("%s: transient failure (delivery %d/%d), retry in %.1fs: %s",
                         self.sub.durable, ctx.delivery.number, ctx.delivery.max_deliver,
                         verdict.delay, verdict.error.message)
            await msg.nak(delay=verdict.delay)
            return "retry_later" if verdict.expected else "nak"
        error, permanent = verdict.error, verdict.permanent
        assert error is not None
        try:
            if self.sub.on_failure is not None:
                await self.sub.on_failure(event, error, ctx)
            if not permanent or self.sub.on_failure is None:
                await self._dead_letter(msg, ctx, error)
        except Exception as hook_exc:
            # Recording the failure failed (bus or store down): keep the message and retry.
            log.warning("%s: could not record failure (%r); will retry", self.sub.durable,
                        hook_exc)
            await msg.nak(delay=self.policy.backoff_base_s)
            return "nak"
        await msg.term()
        log.info("%s: terminated (%s): %s", self.sub.durable, error.code, error.message)
        return "term" if permanent and self.sub.on_failure is not None else "dead_letter"

    async def _dead_letter(self, msg: Msg, ctx: Context, error: ErrorInfo) -> None:
        services = ctx.services
        entry = DeadLetter(
            function=ctx.function, subject=services.names.strip(msg.subject), data=msg.data,
            headers=dict(msg.headers or {}), error=error, num_delivered=ctx.delivery.number,
            stream_seq=ctx.delivery.stream_seq,
        )
        await services.bus.publish(services.names.dlq(ctx.function), entry,
                                   msg_id=msgids.dlq_entry(self.stream, ctx.delivery.stream_seq))

    async def _drain(self) -> None:
        if not self.inflight:
            return
        log.info("%s: draining %d in-flight message(s)", self.sub.durable, len(self.inflight))
        _, pending = await asyncio.wait(
            list(self.inflight), timeout=self.settings.drain_grace_s
        )
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
