"""Conductors and stage workers scale out as OS processes without losing or doubling work.

Two ``jetcut run conductor`` and two ``jetcut run noop`` processes share one nats-server and
race on 300 jobs of a 3-step no-op pipeline: each conductor process binds the same durable
consumers, so both take completions of the same jobs and race on the same job records (the
compare-and-set fence decides), and both workers take tasks from one work queue. Afterwards
the audit (``loadtests/fleet.py``) reads the job records, every stored
``jobs.stage.complete`` and every step event: no job lost, every job succeeded, no step
committed twice, no completion stored twice, no step run twice, and every finished step
matches exactly one stored completion of its (attempt, delivery).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from loadtests.fleet import PIPELINE, Fleet
from shared.partitions import partition_of
from tests.support.waiting import eventually

JOBS = 300
CONDUCTORS = 2
WORKERS = 2


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_two_conductors_and_two_workers_race_on_300_jobs_without_loss_or_doubles(
    make_settings: Any, tmp_path: Path,
) -> None:
    settings = make_settings()
    async with Fleet(settings, tmp_path) as fleet:
        await fleet.start(CONDUCTORS, WORKERS)
        # Generous bound: the point is correctness, not speed (a loaded 2-core box
        # does this in well under a minute).
        batch = await fleet.run_batch(JOBS, timeout_s=120)
        assert not fleet.dead(), fleet.logs()
        audit = await fleet.audit(batch.job_ids)

        # Both conductors and both workers really took part (otherwise this would prove
        # nothing about scaling out): each process's own /metrics counts what it settled.
        # A job turns terminal just before its last message is acked and counted.
        handled: dict[str, dict[tuple[str, str], float]] = {}

        def acked(name: str, kind: str | None) -> float:
            """Messages of ``kind`` (any: None) that process ``name`` settled with an ack
            (a message nak'd once and acked later counts once)."""
            return sum(v for (k, outcome), v in handled.get(name, {}).items()
                       if outcome == "ack" and kind in (None, k))

        async def all_counted() -> bool:
            for name in ("conductor1", "conductor2", "noop1", "noop2"):
                handled[name] = await fleet.messages_handled(name)
            # 1 submit + 3 completions (conductors) + 3 tasks (workers) per job.
            return sum(acked(name, None) for name in handled) >= JOBS * 7

        await eventually(all_counted, timeout=30, what="every settled message counted")

    assert audit.problems() == {}, audit.problems()
    assert (audit.jobs, audit.terminal, audit.succeeded) == (JOBS, JOBS, JOBS)
    assert audit.completions == JOBS * len(PIPELINE)
    assert batch.terminal == JOBS

    completions = {n: acked(n, "jobs.stage.complete") for n in ("conductor1", "conductor2")}
    submits = {n: acked(n, "jobs.submit") for n in ("conductor1", "conductor2")}
    tasks = {n: acked(n, "stages.noop") for n in ("noop1", "noop2")}
    assert all(completions.values()), handled
    assert all(submits.values()), handled
    assert all(tasks.values()), handled
    # Each completion was handled by exactly one conductor, each task by exactly one worker.
    assert sum(submits.values()) == JOBS, handled
    assert sum(completions.values()) == JOBS * len(PIPELINE), handled
    assert sum(tasks.values()) == JOBS * len(PIPELINE), handled


def test_partition_of_is_the_documented_hash_and_spreads_jobs_over_every_partition() -> None:
    parts = ["p0", "p1", "p2"]
    ids = [f"j{i:05d}" for i in range(3000)]
    # The contract other services (any language) implement: the first 8 bytes of the
    # SHA-256 of the job id, big-endian, modulo the number of partitions.
    for job_id in ids[:200]:
        expected = int(hashlib.sha256(job_id.encode()).hexdigest()[:16], 16) % len(parts)
        assert partition_of(job_id, parts) == parts[expected]
    spread = Counter(partition_of(job_id, parts) for job_id in ids)
    assert set(spread) == set(parts)
    assert min(spread.values()) > 800  # 1,000 each on average
    assert partition_of("abc", ["only"]) == "only"
    with pytest.raises(ValueError):
        partition_of("abc", [])
