"""Count what a process asks of nats-server, by kind, while a benchmark runs.

The bus benchmark divides these counts by the jobs it ran, so its report says how many
request/reply round trips (KV reads, KV compare-and-set writes, publishes awaiting a PubAck)
and one-way messages (fetch requests, acks, fire-and-forget events) one job costs, measured
rather than read off the code. It wraps ``nats.aio.client.Client.request`` and ``publish``
for every connection of this process while the ``counting()`` block runs.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

from nats.aio.client import Client

ROUND_TRIPS = ("kv_get", "kv_write", "publish_acked", "api_other")
"""Kinds that wait for the server's answer (a request/reply round trip)."""


def kind_of_request(subject: str) -> str:
    """What a request on ``subject`` is (every request waits for its reply)."""
    if subject.startswith(("$JS.API.DIRECT.GET.", "$JS.API.STREAM.MSG.GET.")):
        return "kv_get"
    if subject.startswith("$KV."):
        return "kv_write"
    if subject.startswith("$JS.API."):
        return "api_other"
    return "publish_acked"


def kind_of_publish(subject: str, reply: str) -> str | None:
    """What a one-way publish is; None for the publish half of a request (counted there)."""
    if ".CONSUMER.MSG.NEXT." in subject:
        return "fetch"
    if subject.startswith("$JS.ACK."):
        return "ack"
    if reply:
        return None
    return "fire_and_forget"


@contextlib.contextmanager
def counting() -> Iterator[Counter[str]]:
    """Count requests and publishes of every NATS client in this process, by kind (and
    ``acked:<subject kind>`` for publishes awaiting a PubAck) until the block ends."""
    counts: Counter[str] = Counter()
    request, publish = Client.request, Client.publish

    async def counted_request(self: Client, subject: str, *args: Any, **kwargs: Any) -> Any:
        kind = kind_of_request(subject)
        counts[kind] += 1
        if kind == "publish_acked":
            counts[f"acked:{_subject_kind(subject)}"] += 1
        return await request(self, subject, *args, **kwargs)

    async def counted_publish(self: Client, subject: str, payload: bytes = b"",
                              reply: str = "", *args: Any, **kwargs: Any) -> Any:
        kind = kind_of_publish(subject, reply)
        if kind is not None:
            counts[kind] += 1
        return await publish(self, subject, payload, reply, *args, **kwargs)

    Client.request = counted_request  # type: ignore[method-assign]
    Client.publish = counted_publish  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        Client.request = request  # type: ignore[method-assign]
        Client.publish = publish  # type: ignore[method-assign]


def _subject_kind(subject: str) -> str:
    """``<ns>.stages.noop`` -> ``stages``; ``<ns>.events.t.j`` -> ``events``; jobs.* whole."""
    parts = subject.split(".")
    for index, part in enumerate(parts):
        if part in ("stages", "events"):
            return part
        if part == "jobs":
            return ".".join(parts[index:])
    return subject


def per_job(counts: Counter[str], jobs: int) -> dict[str, float]:
    """Counts divided by ``jobs``, with ``round_trips`` (requests awaiting an answer)."""
    out = {kind: round(value / jobs, 2) for kind, value in sorted(counts.items())}
    out["round_trips"] = round(sum(counts[k] for k in ROUND_TRIPS) / jobs, 2)
    return out
