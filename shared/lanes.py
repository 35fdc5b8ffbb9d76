"""A stage worker's two lanes (``shared.fairshare``): take fast first, bulk when it is empty.

The fast lane is the stage's own pull subscription (the consumer loop's); this adds the bulk
lane's. While idle, the worker alternates a pull on fast of ``fair_poll_s`` with a brief one
(``BULK_PULL_S``) on bulk, so a fast task that arrives while it looks at bulk is taken
within about ``BULK_PULL_S``, and a bulk task that arrives while it waits on fast within
about ``fair_poll_s``. A pull that finds work returns at once, so a busy queue pays nothing
extra; an idle worker makes about 2 / ``fair_poll_s`` pull requests a second instead of one
per ``fetch_timeout_s``.

A worker does not pre-empt a running task, so with every slot busy on bulk work a fast task
would still wait out a long one. ``overtaking`` gives such a worker up to
``fair_extra_slots`` more slots, filled from the fast lane only (the consumer loop still
checks memory and disk headroom before the fetch): while it is busy that way, it polls the
fast lane every ``fair_poll_s``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

log = logging.getLogger(__name__)
MIN_PULL_S = 0.05
BULK_PULL_S = 0.05
"""How long an idle worker waits on its bulk lane: a waiting message is delivered at once,
so a short pull loses no bulk work, and keeps a fast task from waiting behind it."""
BULK_SUFFIX = ".bulk"


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

    def __init__(self, js: JetStreamContext, *, stream: str, durable: str, poll_s: float,
                 ensure_consumer: Callable[[], Awaitable[None]], extra_slots: int = 0) -> None:
        self.js = js
        self.extra_slots = extra_slots
        self._fast_only = False
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

    def overtaking(self, held: Iterable[Msg], concurrency: int) -> int:
        """Slots beyond ``concurrency`` the worker may fill now (``overtaking_slots``); when
        there are some, the next ``fetch`` pulls the fast lane only, for one poll."""
        slots = overtaking_slots((m.subject for m in held), concurrency, self.extra_slots)
        self._fast_only = slots > 0
        return slots

    async def fetch(self, fast: JetStreamContext.PullSubscription, batch: int,
                    within_s: float) -> list[Msg]:
        """Up to ``batch`` messages, fast lane first, within about ``within_s`` seconds
        (one fast-lane poll only, after ``overtaking`` granted slots).

        Raises:
            nats.errors.TimeoutError: neither lane had anything (as a plain fetch would).
        """
        if self._fast_only:
            self._fast_only = False
            return await fast.fetch(batch, timeout=self.poll_s)
        deadline = time.monotonic() + within_s
        while True:
            pull = max(MIN_PULL_S, min(self.poll_s, deadline - time.monotonic()))
            with contextlib.suppress(nats.errors.TimeoutError, TimeoutError):
                return await fast.fetch(batch, timeout=pull)
            with contextlib.suppress(nats.errors.TimeoutError, TimeoutError):
                return await self._fetch_bulk(batch, BULK_PULL_S)
            if time.monotonic() >= deadline:
                raise nats.errors.TimeoutError

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
