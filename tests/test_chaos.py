"""The chaos run at test scale: 50 jobs while workers are SIGKILLed and nats-server restarts.

Everything is real (see ``loadtests/chaos.py``): every function is its own process, the
client goes through the HTTP gateway with idempotency keys, and the checker reads the job
records, the store and the streams afterwards. ``make chaos`` runs the same at a larger
scale and writes its report to ``loadtests/reports/``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.chaos import ChaosConfig, run_chaos

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


async def test_no_job_output_or_commit_is_lost_or_doubled_under_chaos(tmp_path: Path) -> None:
    report = await run_chaos(ChaosConfig(jobs=50, kills=4, restarts=2), tmp_path)
    print(report.markdown())  # shown with -s, and in the failure output
    assert len(report.actions) == 6  # every planned fault was really injected
    assert report.acknowledged == report.attempted == 50
    assert report.lost == []
    assert report.unexpected == []
    assert report.duplicate_jobs == {}
    assert report.duplicate_step_commits == []
    assert report.lost_outputs == []
    assert report.orphaned_temp_dirs == []
    assert report.succeeded == 50 and report.failed == 0
    assert report.dlq_entries == report.failed_steps == 0
