"""The process runtime: connect, provision, run functions' consumers and services, drain.

One ``Runtime`` serves any set of functions: ``jetcut run transcode`` serves one, and
``jetcut dev`` serves all of them in one process. Functions never wire clients themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import api

from shared.admission import Headroom, StoreBreaker
from shared.bus import Bus, connect
from shared.cancellation import CancelWatch
from shared.consumer import ConsumerLoop
from shared.costbook import CostBook
from shared.fairshare import FairShare, bulk_durable, bulk_subject
from shared.function import Context, Function, Services, Subscription
from shared.jobstore import JobStore
from shared.k8s_podcost import PodRef, TasksInHand, pod_from_environment
from shared.lanes import BulkLane
from shared.media import Binaries, FFmpegRunner, find_binaries
from shared.retry import policy_for
from shared.settings import Settings
from shared.store import ObjectStore, open_store
from shared.streams import consumer_config, provision
from shared.subjects import Names
from shared.telemetry import Telemetry

log = logging.getLogger(__name__)


class MediaTools:
    """Locates ffmpeg on first use and keeps one runner for the process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._tools: tuple[Binaries, FFmpegRunner] | None = None

    def child_pids(self) -> frozenset[int]:
        """ffmpeg children running now (none if no runner was made)."""
        return self._tools[1].pids if self._tools is not None else frozenset()

    def __call__(self) -> tuple[Binaries, FFmpegRunner]:
        if self._tools is None:
            binaries = find_binaries(self.settings)
            self._tools = (binaries, FFmpegRunner.from_settings(self.settings, binaries))
        return self._tools


class Runtime:
    """Everything one process needs to serve some functions."""

    def __init__(
        self, settings: Settings, functions: list[Function], *, service_name: str,
        telemetry: Telemetry | None = None, store: ObjectStore | None = None,
        pod: PodRef | None = None,
    ) -> None:
        self.settings = settings
        self.functions = functions
        self.service_name = service_name
        self.names = Names(settings.namespace)
        self.telemetry = telemetry or Telemetry(
            service_name, exporter=settings.otel_exporter, otlp_endpoint=settings.otel_endpoint
        )
        self._store = store
        self.nc: NATS | None = None
        self.services: Services | None = None
        self.stop_event = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.loops: list[ConsumerLoop] = []
        self.crashed: list[str] = []
        self._pod = pod
        self.in_hand: TasksInHand | None = None
        """Stage tasks held, kept as the pod's deletion cost in Kubernetes (k8s_podcost)."""

    def _stream_of(self, sub: Subscription[Any]) -> str:
        return self.names.stream(sub.family)

    def _consumer(self, fn: Function, sub: Subscription[Any], *,
                  bulk: bool = False) -> api.ConsumerConfig:
        s = self.settings
        subject = sub.subject(self.names)
        return consumer_config(
            durable=bulk_durable(sub.durable) if bulk else sub.durable,
            subject=bulk_subject(subject) if bulk else subject, ack_wait=s.ack_wait_s,
            max_deliver=policy_for(s, fn.name).max_deliver,
            max_ack_pending=s.max_ack_pending, replicas=s.replicas,
        )

    async def start(self) -> Services:
        """Connect, provision streams/KV/consumers, and start every consumer and service."""
        self.nc = await connect(self.settings, name=self.service_name)
        bus = Bus(self.nc, self.names, self.telemetry, source=f"jetcut/{self.service_name}")
        subs = [(fn, sub) for fn in self.functions for sub in fn.subscriptions]
        kv = await provision(
            bus.js, self.names, self.settings,
            [(self._stream_of(sub), self._consumer(fn, sub)) for fn, sub in subs]
            + [(self._stream_of(sub), self._consumer(fn, sub, bulk=True))
               for fn, sub in subs if sub.family == "stages"],
        )
        store = self._store or open_store(self.settings)
        await store.ensure_ready()
        cancels = CancelWatch()
        if any(sub.family == "stages" for _, sub in subs):
            await cancels.start(self.nc, self.names.cancel)
        self.services = Services(
            settings=self.settings, names=self.names, bus=bus, jobs=JobStore(kv), store=store,
            telemetry=self.telemetry, media=MediaTools(self.settings), cancels=cancels,
            costs=CostBook.lazy(bus.js, self.names, self.settings),
            fair=FairShare(self.settings),
        )
        headroom = Headroom(self.settings)
        breaker = StoreBreaker(
            store, failures=self.settings.store_breaker_failures,
            probe_interval_s=self.settings.store_probe_interval_s,
            gauge=self.telemetry.store_breaker_open,
        )
        if any(sub.family == "stages" for _, sub in subs):
            self.in_hand = TasksInHand(self._pod or pod_from_environment(os.environ))
        for fn in self.functions:
            ctx = Context(services=self.services, function=fn.name,
                          log=logging.getLogger(f"jetcut.{fn.name}"))
            for sub in fn.subscriptions:
                loop = ConsumerLoop(
                    sub, ctx, stream=self._stream_of(sub), subject=sub.subject(self.names),
                    ensure_consumer=partial(self._ensure_consumer, fn, sub),
                    headroom=headroom if sub.family == "stages" else None, breaker=breaker,
                    in_hand=self.in_hand if sub.family == "stages" else None,
                    bulk=self._bulk_lane(fn, sub) if sub.family == "stages" else None,
                )
                self.loops.append(loop)
                self._spawn(loop.run(self.stop_event), f"{fn.name}:{sub.durable}")
            if fn.service is not None:
                self._spawn(fn.service(self.services, self.stop_event), f"{fn.name}:service")
        return self.services

    async def _ensure_consumer(self, fn: Function, sub: Subscription[Any], *,
                               bulk: bool = False) -> None:
        assert self.services is not None
        await self.services.bus.js.add_consumer(self._stream_of(sub),
                                                self._consumer(fn, sub, bulk=bulk))

    def _bulk_lane(self, fn: Function, sub: Subscription[Any]) -> BulkLane:
        """A stage's bulk lane (fair share, ``shared.fairshare``), beside its own consumer."""
        assert self.services is not None
        return BulkLane(self.services.bus.js, stream=self._stream_of(sub),
                        durable=bulk_durable(sub.durable), fast_durable=sub.durable,
                        poll_s=self.settings.fair_poll_s,
                        ensure_consumer=partial(self._ensure_consumer, fn, sub, bulk=True),
                        extra_slots=self.settings.fair_extra_slots)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._on_task_done)
        self.tasks.append(task)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self.stop_event.is_set():
            return
        exc = task.exception()
        if exc is not None:
            # A crashed loop must not go unnoticed: stop the process so a supervisor restarts it.
            log.error("%s crashed: %r; stopping", task.get_name(), exc, exc_info=exc)
            self.crashed.append(task.get_name())
            self.stop_event.set()

    async def stop(self) -> None:
        """Stop fetching, let in-flight work finish (or hand it back), then disconnect."""
        self.stop_event.set()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.in_hand is not None:
            await self.in_hand.close()
        if self.services is not None:
            await self.services.cancels.stop()
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.drain()
        if self.services is not None:
            await self.services.store.close()
        self.telemetry.shutdown()

    async def serve_until_signalled(
        self, on_ready: Callable[[Services], None] | None = None,
        on_force: Callable[[], None] | None = None,
    ) -> None:
        """Run until SIGTERM/SIGINT (or a crashed loop), then stop gracefully.

        Signals stay handled while stopping: one that comes when the process is already
        stopping calls ``on_force`` (the CLI exits at once, killing its children).
        """
        loop = asyncio.get_running_loop()

        def signalled() -> None:
            if self.stop_event.is_set() and on_force is not None:
                on_force()
            self.stop_event.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, signalled)
        try:
            # A signal must stop a process that is still starting, too (NATS unreachable,
            # provisioning retried): start() does not look at the stop event itself.
            starting = asyncio.create_task(self.start())
            stopping = asyncio.create_task(self.stop_event.wait())
            await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
                log.info("stopped before start-up finished")
                return
            stopping.cancel()
            services = starting.result()
            if on_ready:
                on_ready(services)
            await self.stop_event.wait()
        finally:
            try:
                await self.stop()
            finally:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
