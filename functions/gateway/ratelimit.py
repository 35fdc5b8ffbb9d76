"""Token buckets for rate limits, and the ``RateLimit-*`` headers that describe them.

Each key (an API key id, a client address) has a bucket of ``burst`` tokens refilled at
``rate`` per second; a request takes one. The buckets live in this process: N gateways behind
a load balancer allow up to N times the limit (see docs/api.md, "Rate limits"). A bucket that
has refilled completely is the same as a fresh one, so those are forgotten when the table
grows, which keeps memory bounded however many addresses call.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

FORGET_ABOVE = 10_000
"""Buckets kept before full ones are swept out."""


@dataclass(frozen=True)
class Decision:
    """One request's outcome against one bucket."""

    allowed: bool
    limit: int
    remaining: int
    reset_s: int
    """Seconds until the bucket is full again."""
    retry_after_s: int
    """Seconds until one token is available (0 when allowed)."""
    policy: str

    def headers(self) -> dict[str, str]:
        """IETF draft-ietf-httpapi-ratelimit-headers names (and ``Retry-After`` on a 429)."""
        headers = {"RateLimit-Limit": str(self.limit),
                   "RateLimit-Remaining": str(self.remaining),
                   "RateLimit-Reset": str(self.reset_s),
                   "RateLimit-Policy": self.policy}
        if not self.allowed:
            headers["Retry-After"] = str(self.retry_after_s)
        return headers


@dataclass
class _Bucket:
    tokens: float
    at: float


class TokenBuckets:
    """Per-key token buckets sharing one rate and burst."""

    def __init__(self, rate: float, burst: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.policy = f"{burst};w={max(1, math.ceil(burst / rate))}"
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str) -> Decision:
        """Take one token for ``key`` if there is one."""
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= FORGET_ABOVE:
                self._forget_full(now)
            bucket = self._buckets[key] = _Bucket(tokens=float(self.burst), at=now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        allowed = bucket.tokens >= 1.0
        if allowed:
            bucket.tokens -= 1.0
        return Decision(
            allowed=allowed, limit=self.burst, remaining=int(bucket.tokens),
            reset_s=math.ceil((self.burst - bucket.tokens) / self.rate),
            retry_after_s=0 if allowed else max(1, math.ceil((1.0 - bucket.tokens) / self.rate)),
            policy=self.policy,
        )

    def _forget_full(self, now: float) -> None:
        full = [k for k, b in self._buckets.items()
                if b.tokens + (now - b.at) * self.rate >= self.burst]
        for key in full:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


def tighter(a: Decision | None, b: Decision | None) -> Decision | None:
    """The decision a client should heed: a refusal, else the one with less left."""
    if a is None or b is None:
        return a or b
    if a.allowed != b.allowed:
        return b if a.allowed else a
    return a if a.remaining <= b.remaining else b
