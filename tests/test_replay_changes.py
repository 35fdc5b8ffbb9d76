"""Retrying a dead job with changed params or a changed recipe, from its checkpoints.

The real stack (gateway, conductor, probe, thumbnail with real ffmpeg) runs a
``thumbnails`` job whose sprite cannot be made with the params it was given (a sprite of a
tall clip in one column would be taller than the 16 000 px a JPEG allows): the job fails
at run time. Retried with a good ``columns``, it is re-planned: the steps the change does
not touch keep their results (probe is not run again: attempt 1, same finish time), the
sprite runs again, and the job succeeds.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from functions.registry import FUNCTIONS
from shared.events import RetryChanges, StepSpec
from shared.jobstate import (
    JobRecord,
    JobStatus,
    StepStatus,
    advance,
    diff_plan,
    plan,
    replan_job,
)
from tests.support.nats import running, until_http_up, wait_for_job

pytestmark = pytest.mark.timeout(120)

# 96 px wide, 2048 px tall: a tile is the frame itself (never upscaled), 8 tiles in one
# column are 16 384 px tall, over the sprite limit; in 8 columns, one row.
BAD = {"count": 8, "columns": 1}
GOOD = {"count": 8, "columns": 8}


# --- the transition (no I/O) ----------------------------------------------------------------


def chain(params_b: dict[str, Any]) -> dict[str, StepSpec]:
    return {
        "a": StepSpec(stage="probe", uses=[":input"]),
        "b": StepSpec(stage="thumbnail", uses=[":input", "a"], params=params_b),
        "c": StepSpec(stage="noop", uses=["b"]),
        "d": StepSpec(stage="noop", uses=["a"]),
    }


def failed_at_b() -> JobRecord:
    record = JobRecord(job_id="j1", tenant="default", pipeline=chain({"columns": 1}))
    plan(record, chain({"columns": 1}))
    record.steps["a"].status = record.steps["d"].status = StepStatus.DONE
    record.steps["a"].outputs = {"probe": "jobs/j1/a/probe.json"}
    record.steps["b"].status, record.steps["b"].attempt = StepStatus.FAILED, 3
    record.steps["c"].status = StepStatus.CANCELLED
    record.status = JobStatus.FAILED
    return record


def test_a_changed_step_and_what_uses_it_run_again_the_rest_is_kept() -> None:
    record = failed_at_b()
    steps = chain({"columns": 8})
    diff = diff_plan(record, steps)
    assert (diff.kept, diff.rerun, diff.stale) == (["a", "d"], ["b", "c"], ["b", "c"])

    changes = RetryChanges(steps=steps)
    result = replan_job(record, steps, changes)
    assert result == diff
    assert record.status == JobStatus.QUEUED and record.error is None
    assert record.pipeline == steps
    assert record.steps["a"].outputs == {"probe": "jobs/j1/a/probe.json"}  # kept as it was
    assert record.steps["b"].params == {"columns": 8}
    # A new attempt above the old one: its task is a new message, never deduplicated.
    assert (record.steps["b"].status, record.steps["b"].attempt) == (StepStatus.READY, 4)
    assert record.steps["c"].status == StepStatus.PENDING
    # Only a failed or cancelled job is re-planned.
    assert replan_job(record, steps, changes) is None


def test_an_unchanged_plan_keeps_every_finished_step() -> None:
    record = failed_at_b()
    diff = diff_plan(record, chain({"columns": 1}))
    assert (diff.kept, diff.stale) == (["a", "d"], [])


def test_a_replanned_expanded_steps_parts_get_attempts_above_the_old_ones() -> None:
    """A part's task id and result id name its attempt: parts of the new plan must never
    reuse an attempt number an old part used (the stream would drop them as duplicates)."""
    def pipeline(crf: int) -> dict[str, StepSpec]:
        return {
            "seg": StepSpec(stage="segment", uses=[":input"]),
            "enc": StepSpec(stage="encode-part", uses=["seg"], each="seg",
                            params={"height": 360, "crf": crf}),
        }

    record = JobRecord(job_id="j2", tenant="default", pipeline=pipeline(60))
    plan(record, pipeline(60))
    seg = record.steps["seg"]
    seg.status, seg.outputs = StepStatus.DONE, {"p0": "k0", "p1": "k1"}
    advance(record)
    enc = record.steps["enc"]
    assert [p.attempt for p in enc.parts] == [1, 1]
    enc.parts[0].status = StepStatus.DONE
    enc.parts[1].status, enc.parts[1].attempt = StepStatus.FAILED, 3
    enc.status = StepStatus.FAILED
    record.status = JobStatus.FAILED

    diff = replan_job(record, pipeline(23), RetryChanges(steps=pipeline(23)))
    assert diff is not None and (diff.kept, diff.rerun) == (["seg"], ["enc"])
    assert [p.attempt for p in record.steps["enc"].parts] == [4, 4]
    assert record.steps["enc"].status == StepStatus.READY


# --- against the real stack -----------------------------------------------------------------


@pytest.fixture
async def stack(make_settings, http_port):  # type: ignore[no-untyped-def]
    settings = make_settings(http_port=http_port)
    functions = [FUNCTIONS[n] for n in ("gateway", "conductor", "probe", "thumbnail")]
    async with running(settings, functions) as rt:
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=10) as client:
            await until_http_up(client)
            yield rt, client


async def submit(client: httpx.AsyncClient, clip: Any, params: dict[str, Any]) -> str:
    r = await client.post("/v1/uploads", params={"filename": clip.name},
                          content=clip.read_bytes())
    assert r.status_code == 201, r.text
    upload_id = r.json()["upload_id"]
    r = await client.post("/v1/jobs", json={"recipe": "thumbnails", "input": upload_id,
                                            "params": params})
    assert r.status_code == 202, r.text
    job_id: str = r.json()["job_id"]
    return job_id


async def test_a_job_failed_on_a_bad_param_succeeds_when_retried_with_a_good_one(  # type: ignore[no-untyped-def]
    stack, make_clip
) -> None:
    rt, client = stack
    services = rt.services
    clip = make_clip("tall_96x2048", duration=2.0, width=96, height=2048, audio=False)
    job_id = await submit(client, clip, BAD)
    failed = await wait_for_job(services, job_id, timeout=60)
    assert failed.status == "failed"
    assert failed.error is not None and failed.error.code == "invalid_recipe"
    assert failed.steps["sprite"].status == "failed"
    probe = failed.steps["probe"]
    assert (probe.status, probe.attempt) == ("done", 1)
    done_before = {name: (s.attempt, s.finished_at) for name, s in failed.steps.items()
                   if s.status == "done"}
    assert "probe" in done_before

    r = await client.post(f"/v1/jobs/{job_id}:retry", json={"params": GOOD})
    assert r.status_code == 202, r.text
    record = await wait_for_job(services, job_id, timeout=60,
                                until=lambda r: r.status == "succeeded")
    assert record.params == GOOD
    for name, (attempt, finished_at) in done_before.items():
        # Not run again: the same attempt, finished when it first did.
        assert (record.steps[name].attempt, record.steps[name].finished_at) == (
            attempt, finished_at), name
    assert record.steps["sprite"].attempt == failed.steps["sprite"].attempt + 1
    assert record.steps["sprite"].params["columns"] == 8
    assert not record.steps["sprite"].from_checkpoint
    assert record.steps["sprite"].meta  # the sprite was really made this time
    r = await client.get(f"/v1/jobs/{job_id}/outputs")
    assert r.status_code == 200
    assert any(o["step"] == "sprite" for o in r.json()["outputs"]), r.json()

    # The CLI's flags make the same body; the job is done now, so the answer is 409.
    from functions.cli import main

    code = await asyncio.to_thread(main, ["retry", job_id, "--params", '{"columns": 5}',
                                          "--url", str(client.base_url)])
    assert code == 1
    code = await asyncio.to_thread(main, ["retry", job_id, "--params", "[1]",
                                          "--url", str(client.base_url)])
    assert code == 2


async def test_retry_changes_that_cannot_plan_are_refused(stack, make_clip) -> None:  # type: ignore[no-untyped-def]
    rt, client = stack
    clip = make_clip("tall_96x2048", duration=2.0, width=96, height=2048, audio=False)
    job_id = await submit(client, clip, BAD)
    await wait_for_job(rt.services, job_id, timeout=60)
    cases: list[tuple[Any, int, str]] = [
        ({"params": {"columns": 0}}, 422, "invalid_recipe"),
        ({"recipe": "no-such-recipe"}, 422, "invalid_recipe"),
        ({"recipe": "thumbnails", "steps": {"p": {"stage": "probe"}}}, 400, "invalid_request"),
        ({"colums": 8}, 400, "invalid_request"),
        (b"{not json", 400, "invalid_request"),
    ]
    for body, status, code in cases:
        kwargs: dict[str, Any] = ({"content": body} if isinstance(body, bytes)
                                  else {"json": body})
        r = await client.post(f"/v1/jobs/{job_id}:retry", **kwargs)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (body, r.text)
    assert (await rt.services.jobs.get(job_id)).status == "failed"  # nothing was queued
