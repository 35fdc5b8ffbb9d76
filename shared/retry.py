"""The one retry story: what is worth another try, how long to wait, when to give up.

* **Policy**: ``policy_for(settings, function)`` merges a function's
  ``JETCUT_RETRY_POLICY`` entry with the global defaults, once; nothing else falls back.
* **Classification**: ``TRANSIENT_NATS`` is what JetStream answers while a stream elects a
  leader, the server restarts or the client moves to another seed. A ``JetcutError``
  carries its own decision (``non_retryable``, ``next_retry_delay``, as Temporal's
  ``ApplicationError``); anything else is an unexpected, transient fault.
* **Settlement**: ``settle`` turns a handler's exception into ``nak(delay)`` or ``term``;
  the consumer loop only performs the verb it is given.
* **Exhaustion**: ``exhausted`` is the error a message ends with when its transient
  failures used up its deliveries.
* **Riding out**: ``ride_out`` retries one bus or KV request through an election,
  with a time budget and jittered backoff.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

import nats.errors
import nats.js.errors

from shared.errors import ErrorCode, RetryLater, error_info
from shared.events import ErrorInfo

if TYPE_CHECKING:
    from shared.settings import Settings

T = TypeVar("T")

TRANSIENT_NATS: tuple[type[Exception], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.js.errors.ServiceUnavailableError,
)
"""What a JetStream request answers while a stream elects a leader, the server restarts or
the client moves to another seed: worth asking again (publishes, KV, fetches)."""

TRANSIENT_NATS_OR_CLOSED: tuple[type[Exception], ...] = (
    *TRANSIENT_NATS, nats.errors.ConnectionClosedError,
)
"""Publishes and fetches also ride out a connection the client is re-opening; a KV request
does not, so that a process shutting down is not held up for a window."""

ELECTION_WINDOW_S = 30.0
"""How long one request keeps retrying before it gives up. A JetStream stream on a cluster
has no leader for one election when its leader's node dies (measured 5-8 s on loopback:
a 4-9 s raft election timeout, plus the client's reconnect to another seed), and every
request in that window fails fast with "no response from stream". Counting attempts with
jittered backoff gave up after 3.5-10 s, inside that window; a time budget outlasts it."""

KNOWN_TRANSIENT = frozenset({
    ErrorCode.TIMEOUT, ErrorCode.DISK_FULL, ErrorCode.STORE_UNAVAILABLE,
    ErrorCode.BUS_UNAVAILABLE, ErrorCode.FFMPEG_FAILED,
})
"""Transient failures with a cause users can act on: when retries run out, the step fails
with this code (``timeout`` says more than ``retries_exhausted``)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How one function retries transient failures, every field resolved."""

    max_deliver: int
    """Deliveries of one message (the consumer's ``MaxDeliver``) before it fails for good."""
    backoff_base_s: float
    backoff_max_s: float

    def delay(self, delivery: int) -> float:
        """Delay before redelivery number ``delivery + 1`` (see ``backoff_delay``)."""
        return backoff_delay(delivery, base_s=self.backoff_base_s, max_s=self.backoff_max_s)


def policy_for(settings: Settings, function: str) -> RetryPolicy:
    """``function``'s retry policy: its ``JETCUT_RETRY_POLICY`` entry, unset fields taken
    from ``JETCUT_MAX_DELIVER`` / ``JETCUT_BACKOFF_BASE_S`` / ``JETCUT_BACKOFF_MAX_S``.

    The only place the two meet, so every reader sees the same numbers.
    """
    own = settings.retry_policy.get(function)
    return RetryPolicy(
        max_deliver=(own and own.max_deliver) or settings.max_deliver,
        backoff_base_s=(own and own.backoff_base_s) or settings.backoff_base_s,
        backoff_max_s=(own and own.backoff_max_s) or settings.backoff_max_s,
    )


def backoff_delay(delivery: int, *, base_s: float, max_s: float) -> float:
    """Delay before redelivery number ``delivery + 1``.

    Doubling from ``base_s`` up to ``max_s``, then jittered to 50-100% so that many tasks
    failing together (a store outage) do not come back together.
    """
    ceiling = min(max_s, base_s * 2 ** max(0, delivery - 1))
    return ceiling * (0.5 + random.random() / 2)


def exhausted(error: ErrorInfo, attempts: int) -> ErrorInfo:
    """The final error of a message whose transient failures used up its deliveries.

    It keeps the last error's code when that names a known cause, ``retries_exhausted``
    otherwise (an unclassified failure); ``details`` says which and how many attempts.
    """
    code = error.code if error.code in KNOWN_TRANSIENT else str(ErrorCode.RETRIES_EXHAUSTED)
    return ErrorInfo(
        code=code,
        message=f"gave up after {attempts} attempts; last error: {error.code}: {error.message}",
        details={**error.details, "last_error": error.code, "attempts": attempts,
                 "retries_exhausted": True},
    )


@dataclass(frozen=True)
class Settlement:
    """What to do with a message whose handler raised."""

    verb: Literal["nak", "term"]
    delay: float = 0.0
    """Seconds before redelivery (``nak``)."""
    error: ErrorInfo | None = None
    """Why it failed for good (``term``): the error that is recorded and dead-lettered."""
    permanent: bool = False
    """True when the error itself ruled out retrying; False when retries ran out."""
    expected: bool = False
    """A ``RetryLater``: a planned wait, not a failure."""


def settle(exc: BaseException, *, delivery: int, policy: RetryPolicy) -> Settlement:
    """Turn a handler's exception on delivery number ``delivery`` into a settlement.

    * ``non_retryable`` -> ``term`` with the error's own code;
    * ``RetryLater`` -> ``nak(next_retry_delay)``: an expected wait, never exhausting;
    * anything else, before the last delivery -> ``nak`` after the error's
      ``next_retry_delay``, or the policy's jittered backoff;
    * anything else, on the last delivery -> ``term`` with ``exhausted``'s error.
    """
    error = error_info(exc)
    if getattr(exc, "non_retryable", False):
        return Settlement("term", error=error, permanent=True)
    requested = getattr(exc, "next_retry_delay", None)
    if isinstance(exc, RetryLater):
        return Settlement("nak", delay=float(requested or 0.0), expected=True)
    if delivery < policy.max_deliver:
        delay = float(requested) if requested is not None else policy.delay(delivery)
        return Settlement("nak", delay=delay, error=error)
    return Settlement("term", error=exhausted(error, delivery))


async def ride_out(
    op: Callable[[], Awaitable[T]], *, window_s: float = ELECTION_WINDOW_S,
    retry_on: tuple[type[BaseException], ...] = TRANSIENT_NATS,
    on_retry: Callable[[int, BaseException], None] | None = None,
) -> T:
    """Run one request, retrying it through a leader election or a reconnect.

    Jittered backoff from 0.1 s doubling to 2 s, for at most ``window_s``; then the last
    error is raised. Retrying a request whose outcome is unknown must be safe for the
    caller: publishes repeat their ``Nats-Msg-Id`` (the stream keeps one), KV writes are
    compare-and-set (a repeat of one that landed loses and is re-applied).

    Args:
        op: makes one attempt.
        window_s: time budget for all attempts.
        retry_on: exceptions worth another attempt; anything else is raised at once.
        on_retry: called with the attempt number and its error before each retry.
    """
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + window_s
    delay = 0.1
    for attempt in itertools.count(1):
        try:
            return await op()
        except retry_on as exc:
            left = give_up_at - loop.time()
            if left <= 0:
                raise
            if on_retry is not None:
                on_retry(attempt, exc)
            await asyncio.sleep(min(left, delay * (0.5 + random.random())))
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")
