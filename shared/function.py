"""How a function is declared: a name, the subjects it consumes, and a handler per subject.

A handler takes one event Struct and a ``Context`` and returns; it never sees the NATS
message. The consumer loop (``shared.consumer``) settles the message from what the handler
did: return -> ack, or an exception whose settlement ``shared.retry.settle`` decides
(``RetryLater`` -> nak(delay), non-retryable error -> term, anything else -> nak with backoff
until MaxDeliver).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from shared.events import ErrorInfo, Event
from shared.settings import Settings
from shared.subjects import Family, Names

if TYPE_CHECKING:
    import asyncio

    from shared.bus import Bus
    from shared.cancellation import CancelWatch
    from shared.costbook import CostBook
    from shared.fairshare import FairShare
    from shared.jobstore import JobStore
    from shared.media import Binaries, FFmpegRunner
    from shared.store import ObjectStore
    from shared.telemetry import Telemetry

E = TypeVar("E", bound=Event)


@dataclass(frozen=True)
class Services:
    """The process's connections, wired once by the entry point and handed to every handler."""

    settings: Settings
    names: Names
    bus: Bus
    jobs: JobStore
    store: ObjectStore
    telemetry: Telemetry
    media: Callable[[], tuple[Binaries, FFmpegRunner]]
    """ffmpeg is located on first use, so functions that never run it never need it."""
    cancels: CancelWatch
    """Running steps register here to hear about their job's cancellation at once."""
    costs: CostBook | None = None
    """The cost model's calibrated coefficients (``shared.costbook``): step deadlines, ETAs,
    admission. None only where a process was wired without one (predictions use priors)."""
    fair: FairShare | None = None
    """The lane chooser for stage tasks (``shared.fairshare``): the conductor publishes with
    it. None where a process was wired without one (every task takes the fast lane)."""


@dataclass(frozen=True)
class Delivery:
    subject: str = ""
    number: int = 1
    max_deliver: int = 1
    stream_seq: int | None = None

    @property
    def last(self) -> bool:
        """True on the final delivery: a transient failure now exhausts the retries."""
        return self.number >= self.max_deliver


@dataclass(frozen=True)
class Context:
    """What a handler gets besides its event: services, delivery info, a logger."""

    services: Services
    function: str
    delivery: Delivery = field(default_factory=Delivery)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("jetcut"))

    def for_delivery(self, delivery: Delivery) -> Context:
        return replace(self, delivery=delivery)


Handler = Callable[[E, Context], Awaitable[None]]
FailureHook = Callable[[E, ErrorInfo, Context], Awaitable[None]]
Service = Callable[[Services, "asyncio.Event"], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class Subscription(Generic[E]):
    """One durable pull consumer and the handler for its messages."""

    family: Family
    """Which stream the consumer lives on (``Names.stream``): ``jobs``, ``stages``,
    ``events``, ``ingest`` or ``advisories`` (``dlq`` too, though no function reads it)."""
    subject: Callable[[Names], str]
    durable: str
    event_type: type[E]
    handler: Handler[E]
    concurrency: int | None = None
    """This function's default for messages handled at once by one process (1 if unset);
    ``JETCUT_CONCURRENCY`` overrides it for the whole process."""
    batch: int = 1
    """Messages per fetch. Keep 1: long tasks then never wait in a local buffer while their
    AckWait ticks, and nats-py's batched fetch can hold a delivered message until an older
    pull request expires (measured: completions applied ~fetch_timeout_s late)."""
    on_failure: FailureHook[E] | None = None
    """Called before a message is terminated for good (non-retryable or exhausted)."""


@dataclass
class Function:
    """A named unit of deployment: ``jetcut run <name>`` runs exactly this."""

    name: str
    doc: str = ""
    subscriptions: list[Subscription[Any]] = field(default_factory=list)
    service: Service | None = None
    """A long-running coroutine besides the consumers (the gateway's HTTP server)."""

    def subscribe(
        self,
        family: Family,
        subject: Callable[[Names], str],
        event_type: type[E],
        *,
        durable: str | None = None,
        concurrency: int | None = None,
        batch: int = 1,
        on_failure: FailureHook[E] | None = None,
    ) -> Callable[[Handler[E]], Handler[E]]:
        """Register the decorated coroutine as the handler of ``subject``."""

        def register(handler: Handler[E]) -> Handler[E]:
            self.subscriptions.append(
                Subscription(
                    family=family, subject=subject,
                    durable=durable or f"{self.name}-{handler.__name__.removeprefix('on_')}",
                    event_type=event_type, handler=handler, concurrency=concurrency,
                    batch=batch, on_failure=on_failure,
                )
            )
            return handler

        return register
