"""A segment-parallel job survives its encoder being killed or drained, and keeps its work.

``encode-part`` runs as its own OS process (``jetcut run encode-part``), like a deployment;
the conductor and the other stages run in the test process; they share only NATS and a
local-directory store. The worker is SIGKILLed once some parts are checkpointed and before
all are; a new worker takes over. The job succeeds, the parts finished before the kill keep
their stored objects byte for byte (same etags and mtimes: never re-encoded), and the part
that was in flight is redelivered after one AckWait (2 s here) and finished by the new
worker.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from functions.registry import FUNCTIONS
from loadtests.procs import Workers
from shared.jobstate import JobRecord
from tests.support.media import MakeClip, ffprobe_json
from tests.support.nats import fetch_output, running, submit_job, wait_for_job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

JETCUT = str(Path(sys.executable).parent / "jetcut")
IN_PROCESS = ("conductor", "probe", "segment", "rendition", "audio-extract", "concat",
              "package-hls")
STEP = "encode_360p"
PARTS = 6


WORKER = {"ack_wait_s": "2",  # a killed worker's task comes back within 2 s
          "ffmpeg_threads": "1",  # slow enough that the kill lands mid-job
          "concurrency": "1"}  # one part in flight, not the in-process stack's 2


@pytest.fixture
async def stack(make_settings) -> AsyncIterator[Any]:  # type: ignore[no-untyped-def]
    settings = make_settings(concurrency=2)
    async with running(settings, [FUNCTIONS[n] for n in IN_PROCESS]) as rt:
        yield settings, rt


def parts_in(record: JobRecord, status: str, name: str = STEP) -> list[int]:
    step = record.steps.get(name)
    return [i for i, p in enumerate(step.parts) if p.status == status] if step else []


def mid_job(record: JobRecord) -> bool:
    """Two parts done and the worker busy with another: the moment to kill it."""
    return len(parts_in(record, "done")) >= 2 and bool(parts_in(record, "running"))


async def snapshot(rt: Any, job_id: str, name: str = STEP) -> dict[str, tuple[str, float]]:
    objects = await rt.services.store.list(f"jobs/{job_id}/{name}/")
    return {o.key: (o.etag, o.last_modified) for o in objects}


async def test_killed_encoder_resumes_from_checkpoints(stack, workers: Workers,  # type: ignore[no-untyped-def]
                                                       make_clip: MakeClip, binaries,
                                                       tmp_path: Path) -> None:
    settings, rt = stack
    clip = make_clip("resume_12s", duration=12.0, width=640, height=360)
    first = await workers.start("encode-part", settings, name="worker1", **WORKER)
    job_id = await submit_job(rt, [clip], recipe="hls", params={
        "segment_seconds": 2, "part_seconds": 2, "ladder": [360], "preset": "medium"})

    # A real condition, not a sleep: the record says two parts are done and one is running.
    at_kill = await wait_for_job(rt.services, job_id, timeout=90,
                                 until=lambda r: r.terminal or mid_job(r))
    first.send_signal(signal.SIGKILL)
    await first.wait()
    assert not at_kill.terminal, at_kill.error
    done_before = parts_in(at_kill, "done")
    (interrupted,) = parts_in(at_kill, "running")
    before = await snapshot(rt, job_id)  # the dead worker can write nothing more
    checkpointed = sorted(int(key.split("/")[-2][1:]) for key in before
                          if key.endswith("/manifest.json"))
    assert set(done_before) <= set(checkpointed)
    assert len(checkpointed) < PARTS, "the kill came too late to interrupt anything"

    await workers.start("encode-part", settings, name="worker2", **WORKER)
    record = await wait_for_job(rt.services, job_id, timeout=90)
    assert record.status == "succeeded", record.error

    after = await snapshot(rt, job_id)
    for key, (etag, mtime) in before.items():  # untouched: not re-encoded, not re-uploaded
        assert after.get(key) == (etag, mtime), key
    assert sum(k.endswith("/manifest.json") for k in after) == PARTS
    assert interrupted not in done_before
    step = record.steps[STEP]
    assert step.status == "done" and len(step.parts) == PARTS
    for index, part in enumerate(step.parts):
        assert part.status == "done" and part.attempt == 1
        if index in done_before:
            assert not part.from_checkpoint  # its first completion was applied before the kill
        elif index not in checkpointed:
            # redelivered (same attempt, delivery 2) and encoded by the new worker
            assert not part.from_checkpoint
            assert f"jobs/{job_id}/{STEP}/p{index:04d}/manifest.json" in after
        else:
            # checkpointed but its completion was lost with the worker: reported from the
            # manifest, not re-run
            assert part.from_checkpoint

    video = await fetch_output(rt, record, "concat_360p", "video", tmp_path / "joined.mp4")
    info = ffprobe_json(binaries, video)
    assert abs(float(info["format"]["duration"]) - 12.0) <= 0.1
    assert record.steps["concat_360p"].meta["frames"] == 12 * 25


DRAIN_STEP = "encode_720p"


def running_part_at(record: JobRecord, low: float, high: float) -> bool:
    """Some parts done and one running, between ``low`` and ``high`` of the way through."""
    step = record.steps.get(DRAIN_STEP)
    return step is not None and len(parts_in(record, "done", DRAIN_STEP)) >= 1 and any(
        p.status == "running" and low < p.progress < high for p in step.parts)


@pytest.mark.parametrize(("grace_s", "redone"), [("30", 0), ("0.2", 1)],
                         ids=["finishes-its-part", "hands-its-part-back"])
async def test_sigterm_drains_the_encoder_keeping_its_work(  # type: ignore[no-untyped-def]
    stack, workers: Workers, make_clip: MakeClip, grace_s: str, redone: int
) -> None:
    """SIGTERM (a scale-down) to a busy ``jetcut run encode-part``: it stops fetching and
    finishes the part in hand when its drain grace allows (a checkpoint), or hands the part
    back at once with its progress on the job record. Either way the job finishes, every
    part finished before the signal is reused as it is, and at most one part is redone.
    AckWait is 60 s: a handed-back part that came back only after it would time the test
    out, so it must have been nak'ed."""
    settings, rt = stack
    # Parts of a few seconds' work each at one thread: long enough to be caught mid-part.
    clip = make_clip("drain_12s_720p50", duration=12.0, width=1280, height=720, fps=50)
    drained = {**WORKER, "ack_wait_s": "60", "drain_grace_s": grace_s}
    first = await workers.start("encode-part", settings, name="worker1", **drained)
    job_id = await submit_job(rt, [clip], recipe="hls", params={
        "segment_seconds": 4, "part_seconds": 4, "ladder": [720], "preset": "slow",
        "fast_preset": "slow"})  # the lowest rung is not sped up: parts stay long enough

    at_signal = await wait_for_job(rt.services, job_id, timeout=90,
                                   until=lambda r: r.terminal
                                   or running_part_at(r, 0.0, 0.5))
    first.send_signal(signal.SIGTERM)
    assert await first.wait() == 0, workers.log("worker1")
    assert not at_signal.terminal, at_signal.error
    done_before = parts_in(at_signal, "done", DRAIN_STEP)
    (interrupted,) = parts_in(at_signal, "running", DRAIN_STEP)
    before = await snapshot(rt, job_id, DRAIN_STEP)
    manifest = f"jobs/{job_id}/{DRAIN_STEP}/p{interrupted:04d}/manifest.json"
    # Finished within its grace: checkpointed before the process exited. Handed back:
    # nothing of it was stored, and the record says how far it had got.
    assert (manifest in before) == (redone == 0)
    if redone:
        record = await rt.services.jobs.get(job_id)
        note = record.steps[DRAIN_STEP].parts[interrupted].last_error
        assert note is not None and note.code == "handed_back", note
        assert note.details["delivery"] == 1 and 0 < note.details["progress"] < 1

    await workers.start("encode-part", settings, name="worker2", **drained)
    record = await wait_for_job(rt.services, job_id, timeout=90)
    assert record.status == "succeeded", record.error

    after = await snapshot(rt, job_id, DRAIN_STEP)
    for key, (etag, mtime) in before.items():  # reused as they were, not re-encoded
        assert after.get(key) == (etag, mtime), key
    parts = record.steps[DRAIN_STEP].parts
    assert all(p.status == "done" and p.attempt == 1 for p in parts)
    assert all(not p.from_checkpoint for p in parts)  # every completion was applied once
    encoded_twice = [i for i, p in enumerate(parts) if p.lease > 1]
    assert encoded_twice == ([interrupted] if redone else [])
    assert set(done_before).isdisjoint(encoded_twice)
