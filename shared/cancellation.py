"""Running work hears about cancelled jobs at once.

Every process serving stages listens on ``jobs.cancel`` with a plain subscription (the JOBS
stream keeps the durable copy for the conductor). A running step registers its job here and
gets an event; a cancel sets it, and the ffmpeg runner then stops the child (SIGTERM, then
SIGKILL). A cancel this process misses is still safe: the job record is terminal, so the
step's result is fenced off, and a later task for the job is dropped before it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterator

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from shared.events import JobCancel, decode

log = logging.getLogger(__name__)


class CancelWatch:
    """Job id -> events of the steps this process is running for it."""

    def __init__(self) -> None:
        self._running: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._sub: Subscription | None = None

    async def start(self, nc: NATS, subject: str) -> None:
        self._sub = await nc.subscribe(subject, cb=self._on_cancel)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            event = decode(JobCancel, msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return  # the conductor dead-letters it from the stream
        for running in self._running.get(event.job_id, ()):
            running.set()
        if event.job_id in self._running:
            log.info("job %s cancelled: stopping its running steps", event.job_id)

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event that is set if ``job_id`` is cancelled while the block runs."""
        event = asyncio.Event()
        self._running[job_id].add(event)
        try:
            yield event
        finally:
            self._running[job_id].discard(event)
            if not self._running[job_id]:
                del self._running[job_id]
