"""Retry timing: exponential backoff with jitter for transient failures."""

from __future__ import annotations

import random


def backoff_delay(delivery: int, *, base_s: float, max_s: float) -> float:
    """Delay before redelivery number ``delivery + 1``.

    Doubling from ``base_s`` up to ``max_s``, then jittered to 50-100% so that many tasks
    failing together (a store outage) do not come back together.
    """
    ceiling = min(max_s, base_s * 2 ** max(0, delivery - 1))
    return ceiling * (0.5 + random.random() / 2)
