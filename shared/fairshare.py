"""Fair share across tenants by predicted compute-seconds: which lane a stage task takes.

Every stage has two lanes on the ``STAGES`` work queue: **fast**, the contract subject
``stages.<stage>`` (its durable consumer ``stage-<stage>`` is what KEDA, alerts and the
deadletter function already watch), and **bulk**, ``stages.<stage>.bulk`` (consumer
``stage-<stage>-bulk``). Workers take fast first and bulk only when fast is empty
(``shared.lanes``), so bulk work still uses every idle worker (work-conserving).

The conductor picks the lane when it publishes a task: a tenant whose other queued work
(predicted compute-seconds, ``shared.costbook.job_backlog``) plus the tasks it publishes
just before this one exceeds its share (``fair_burst_s`` x its weight) goes to bulk;
otherwise fast. So a tenant that queues 100 long jobs has one share's worth in the fast lane
and the rest behind, and a tenant with one short job goes ahead of that rest.

The queued figure comes from a ``Ledger`` kept by each conductor process: every time it
publishes for a job it notes the job's remaining backlog (no extra round trip: the cost
entries are cached), and forgets the job when it ends or after ``fair_ledger_ttl_s`` without
news. With several conductors each one's ledger holds the jobs whose messages it handled
lately: an approximation, which is all a lane choice needs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

from shared.settings import Settings

Lane = Literal["fast", "bulk"]
BULK_SUFFIX = ".bulk"


def bulk_subject(fast_subject: str) -> str:
    """The bulk lane of a stage's (fast) subject: ``stages.<stage>`` -> ``stages.<stage>.bulk``."""
    return fast_subject + BULK_SUFFIX


def bulk_durable(durable: str) -> str:
    """The bulk lane's consumer beside a stage's consumer: ``stage-x`` -> ``stage-x-bulk``."""
    return f"{durable}-bulk"


def weight_of(settings: Settings, tenant: str) -> float:
    """A tenant's weight (``tenant_weights``; 1 when unlisted)."""
    return settings.tenant_weights.get(tenant, 1.0)


def share_s(settings: Settings, tenant: str) -> float:
    """Predicted compute-seconds a tenant may have queued before its tasks go to bulk."""
    return settings.fair_burst_s * weight_of(settings, tenant)


def choose_lane(ahead_s: float, share: float) -> Lane:
    """Fast while the tenant's compute queued ahead of this task is within its share."""
    return "fast" if ahead_s <= share else "bulk"


class Ledger:
    """Each tenant's jobs and their remaining predicted compute-seconds, as this process
    last saw them (see the module doc for why approximate is enough)."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._tenants: dict[str, dict[str, tuple[float, float]]] = {}

    def note(self, tenant: str, job_id: str, backlog_s: float) -> None:
        """Record ``job_id``'s remaining backlog; 0 (finished) forgets it."""
        jobs = self._tenants.setdefault(tenant, {})
        if backlog_s > 0:
            jobs[job_id] = (backlog_s, self._clock())
        else:
            jobs.pop(job_id, None)
            if not jobs:
                del self._tenants[tenant]

    def queued(self, tenant: str, *, besides: str | None = None) -> float:
        """The tenant's queued compute-seconds, without job ``besides``; drops stale jobs."""
        jobs = self._tenants.get(tenant)
        if not jobs:
            return 0.0
        oldest = self._clock() - self.ttl_s
        for job_id in [j for j, (_, seen) in jobs.items() if seen < oldest]:
            del jobs[job_id]
        return sum(backlog for job_id, (backlog, _) in jobs.items() if job_id != besides)


class FairShare:
    """The conductor's lane chooser: its settings and ledger."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.ledger = Ledger(settings.fair_ledger_ttl_s, clock)

    def lanes(self, tenant: str, job_id: str, backlog_s: float,
              predicted: list[float]) -> list[Lane]:
        """Note the job's backlog and choose a lane for each of its tasks about to be
        published, in order: each counts the tenant's other jobs and the tasks before it."""
        self.ledger.note(tenant, job_id, backlog_s)
        if not self.settings.fair_share:
            return ["fast"] * len(predicted)
        share = share_s(self.settings, tenant)
        ahead = self.ledger.queued(tenant, besides=job_id)
        chosen: list[Lane] = []
        for seconds in predicted:
            chosen.append(choose_lane(ahead, share))
            ahead += seconds
        return chosen
