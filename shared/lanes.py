"""A stage worker's two lanes (``shared.fairshare``): take fast first, bulk when it is empty.

The fast lane is the stage's own pull subscription (the consumer loop's); this adds the bulk
lane's. Each round asks the fast consumer how many tasks it has undelivered (one
CONSUMER.INFO round trip, about a millisecond) and pulls fast when it has some; otherwise it
asks the bulk consumer the same (plus its unacked ones, which a pull may redeliver) and,
when it may have work, takes a brief look at bulk (``BULK_PULL_S``, where a waiting task is
delivered at once); when that is empty too it waits on fast for ``fair_poll_s``. So a run
of bulk tasks costs one round trip each, not a pull that waits out an empty fast lane; a
fast task that arrives while the worker looks at bulk is taken within about
``BULK_PULL_S``, one that arrives at an idle worker at once; a bulk task that arrives at an
idle worker within about ``fair_poll_s``. An idle worker makes a few requests
a second instead of one per ``fetch_timeout_s``.

A worker does not pre-empt a running task, so with every slot busy on bulk work a fast task
would still wait out a long one. ``overtaking`` gives such a worker up to
``fair_extra_slots`` more slots, filled from the fast lane only (the consumer loop still
checks memory and disk headroom before the fetch): while it is busy that way, it polls the
fast lane every ``fair_poll_s``, each poll ending early when a task in hand finishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from shared.fairshare import BULK_SUFFIX

log = logging.getLogger(__name__)
MIN_PULL_S = 0.05
BULK_PULL_S = 0.05
"""How long an idle worker waits on its bulk lane: a waiting message is delivered at once,
so a short pull loses no bulk work, and keeps a fast task from waiting behind it."""


def overtaking_slots(held: Iterable[str], concurrency: int, extra_slots: int) -> int:
    """Extra slots a worker may fill from the fast lane, given the subjects of the tasks it
    holds: only when bulk tasks fill all of its ``concurrency`` slots."""
    subjects = list(held)
    bulk = sum(s.endswith(BULK_SUFFIX) for s in subjects)
    if bulk < concurrency:
        return 0
    return max(0, concurrency + extra_slots - len(subjects))


class BulkLane:
    """The bulk lane's subscription beside one stage consumer's fast one."""

    def __init__(self, js: JetStreamContext, *, stream: str, durable: str, fast_durable: str,
                 poll_s: float, ensure_consumer: Callable[[], Awaitable[None]],
                 extra_slots: int = 0) -> None:
        self.js = js
        self.fast_durable = fast_durable
        self.extra_slots = extra_slots
        self._holding: list[asyncio.Task[None]] = []
        """The bulk tasks in hand when ``overtaking`` granted extra slots: the fast-lane poll
        that follows ends as soon as one of them does (a normal slot is then free)."""
        self.stream = stream
        self.durable = durable
        self.poll_s = poll_s
        self.ensure_consumer = ensure_consumer
        self.psub: JetStreamContext.PullSubscription | None = None

    async def _subscription(self) -> JetStreamContext.PullSubscription:
        if self.psub is None:
            self.psub = await self.js.pull_subscribe_bind(durable=self.durable,
                                                          stream=self.stream)
        return self.psub

    def overtaking(self, held: Mapping[asyncio.Task[None], Msg], concurrency: int) -> int:
        """Slots beyond ``concurrency`` the worker may fill now (``overtaking_slots``), from
        its tasks in hand and their messages; when there are some, the next ``fetch`` pulls
        the fast lane only, for one poll or until a task in hand is done."""
        slots = overtaking_slots((m.subject for m in held.values()), concurrency,
                                 self.extra_slots)
        self._holding = list(held) if slots > 0 else []
        return slots

    async def fetch(self, fast: JetStreamContext.PullSubscription, batch: int,
                    within_s: float) -> list[Msg]:
        """Up to ``batch`` messages, fast lane first, within about ``within_s`` seconds
        (one fast-lane poll only, after ``overtaking`` granted slots).

        Raises:
            nats.errors.TimeoutError: neither lane had anything (as a plain fetch would).
        """
        if self._holding:
            holding, self._holding = self._holding, []
            return await self._fast_while_busy(fast, batch, holding)
        deadline = time.monotonic() + within_s
        while True:
            if not await self._fast_pending() and await self._bulk_waiting():
                with contextlib.suppress(nats.errors.TimeoutError, TimeoutError):
                    return await self._fetch_bulk(batch, BULK_PULL_S)
            pull = max(MIN_PULL_S, min(self.poll_s, deadline - time.monotonic()))
            with contextlib.suppress(nats.errors.TimeoutError, TimeoutError):
                return await fast.fetch(batch, timeout=pull)
            if time.monotonic() >= deadline:
                raise nats.errors.TimeoutError

    async def _fast_while_busy(self, fast: JetStreamContext.PullSubscription, batch: int,
                               holding: list[asyncio.Task[None]]) -> list[Msg]:
        """One fast-lane poll that gives up once a task in hand finishes: the worker then
        has a normal slot, and the bulk lane may have the next task for it. (A message the
        given-up pull still receives waits in the subscription for its next fast pull.)"""
        pull = asyncio.ensure_future(fast.fetch(batch, timeout=self.poll_s))
        await asyncio.wait([pull, *holding], return_when=asyncio.FIRST_COMPLETED)
        if pull.done():
            return pull.result()
        pull.cancel()
        with contextlib.suppress(asyncio.CancelledError, nats.errors.TimeoutError, TimeoutError):
            await pull
        return []

    async def _fast_pending(self) -> bool:
        """Whether the fast lane has undelivered tasks (True when it cannot tell: the fast
        pull then finds out, and raises what the consumer loop knows how to handle)."""
        try:
            info = await self.js.consumer_info(self.stream, self.fast_durable)
        except Exception:
            return True
        return bool(info.num_pending)

    async def _bulk_waiting(self) -> bool:
        """Whether the bulk lane may have a task for this worker: undelivered ones, or
        delivered ones not acked yet (one of them may be due for redelivery, which only a
        pull brings). False lets an idle worker go straight to its fast-lane pull, so a fast
        task that arrives is delivered at once instead of after a look at an empty bulk
        lane (the single-tenant case: no latency added per step). True when it cannot
        tell."""
        try:
            info = await self.js.consumer_info(self.stream, self.durable)
        except Exception:
            return True
        return bool(info.num_pending or info.num_ack_pending)

    async def _fetch_bulk(self, batch: int, pull: float) -> list[Msg]:
        try:
            return await (await self._subscription()).fetch(batch, timeout=pull)
        except nats.js.errors.NotFoundError:
            log.warning("%s: consumer missing; re-provisioning", self.durable)
            await self.ensure_consumer()
            await self.close()
            return []

    async def close(self) -> None:
        if self.psub is not None:
            with contextlib.suppress(Exception):
                await self.psub.unsubscribe()
            self.psub = None
