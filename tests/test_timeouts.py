"""Smart timeouts end to end: a step that overruns its deadline is killed, retried as a
transient failure, and once its attempts are used up the job fails with ``timeout``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from functions.registry import FUNCTIONS
from shared.jobstate import JobStatus
from tests.support.nats import running, submit_job, wait_for_job

pytestmark = pytest.mark.timeout(120)


def ffmpeg_children() -> list[int]:
    """Our own ffmpeg children still alive (there must be none once a step is settled)."""
    me = os.getpid()
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, rest = text.split("(", 1)[1].rsplit(")", 1)
        if name == "ffmpeg" and int(rest.split()[1]) == me:
            found.append(int(stat.parent.name))
    return found


async def test_a_step_past_its_deadline_is_killed_retried_then_fails_with_timeout(
    make_settings: Any, clip_3s: Path
) -> None:
    # The probe step (no duration known yet) gets TIMEOUT_MAX_S; the encode of a 3 s clip
    # gets 3 s x 0.01 x cost 1.0, clamped up to TIMEOUT_MIN_S = 0.1 s: far too little.
    # The deadline is a multiple of the cost model's prediction once the media is probed:
    # 0.01 x the prediction is far too little, too.
    settings = make_settings(timeout_per_media_s=0.01, timeout_min_s=0.1, timeout_max_s=60,
                             timeout_predicted_factor=0.01, max_deliver=2, ffmpeg_threads=1)
    async with running(settings, [FUNCTIONS[f] for f in ("conductor", "probe", "transcode")]) \
            as runtime:
        services = runtime.services
        assert services is not None
        job_id = await submit_job(runtime, [clip_3s], steps={
            "probe": {"stage": "probe", "uses": [":input"]},
            "encode": {"stage": "transcode", "uses": [":input", "probe"]}})
        record = await wait_for_job(services, job_id)
        assert record.status == JobStatus.FAILED
        assert record.steps["probe"].status == "done"
        encode = record.steps["encode"]
        assert encode.status == "failed" and encode.lease == 2  # retried once, then failed
        assert record.error is not None and record.error.code == "timeout"
        assert record.error.details["attempts"] == 2
        assert ffmpeg_children() == []
        assert await services.store.list(f"jobs/{job_id}/encode/") == []
