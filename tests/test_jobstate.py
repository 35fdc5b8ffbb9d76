"""The job state machine and the (step, attempt) fence, as pure functions."""

from __future__ import annotations

from shared.events import ErrorInfo, InputRef, StageComplete, StepSpec
from shared.jobstate import (
    JobRecord,
    JobStatus,
    StepStatus,
    advance,
    apply_complete,
    mark_running,
    plan,
)


def web_like() -> JobRecord:
    record = JobRecord(job_id="j1", tenant="default", inputs=[InputRef(key="uploads/a")])
    ready = plan(record, {
        "probe": StepSpec(stage="probe", uses=[":input"]),
        "transcode": StepSpec(stage="transcode", uses=[":input", "probe"]),
        "poster": StepSpec(stage="thumbnail", uses=[":input", "probe"]),
    })
    assert ready == ["probe"]
    return record


def done(step: str, attempt: int = 1, **kw: object) -> StageComplete:
    return StageComplete(job_id="j1", tenant="default", step=step, attempt=attempt, **kw)  # type: ignore[arg-type]


def test_plan_readies_only_steps_whose_inputs_exist() -> None:
    record = web_like()
    assert record.steps["probe"].status == StepStatus.READY
    assert record.steps["probe"].attempt == 1
    assert record.steps["transcode"].status == StepStatus.PENDING
    assert record.status == JobStatus.QUEUED


def test_fan_out_then_fan_in_to_success() -> None:
    record = web_like()
    assert mark_running(record, "probe", 1)
    assert record.status == JobStatus.RUNNING
    assert apply_complete(record, done("probe", meta={"duration_s": 3.0}))
    assert sorted(advance(record)) == ["poster", "transcode"]  # fan-out
    assert apply_complete(record, done("transcode", outputs={"video": "k"}))
    assert advance(record) == []
    assert record.status == JobStatus.RUNNING
    assert apply_complete(record, done("poster"))
    advance(record)
    assert record.status == JobStatus.SUCCEEDED
    assert record.progress == 1.0


def test_stale_and_duplicate_results_change_nothing() -> None:
    record = web_like()
    assert not apply_complete(record, done("probe", attempt=2))  # from the future: not current
    assert apply_complete(record, done("probe"))
    assert not apply_complete(record, done("probe"))  # duplicate delivery
    assert not apply_complete(record, done("nope"))
    record.steps["transcode"].attempt = 3  # pretend attempts 1 and 2 were superseded
    record.steps["transcode"].status = StepStatus.RUNNING
    assert not apply_complete(record, done("transcode", attempt=2, outputs={"video": "old"}))
    assert record.steps["transcode"].outputs == {}
    assert not mark_running(record, "transcode", 2)


def test_a_failed_step_fails_the_job_and_cancels_the_rest() -> None:
    record = web_like()
    error = ErrorInfo(code="invalid_input", message="not media")
    assert apply_complete(record, done("probe", error=error))
    assert advance(record) == []
    assert record.status == JobStatus.FAILED
    assert record.error == error
    assert record.steps["transcode"].status == StepStatus.CANCELLED
    assert not apply_complete(record, done("probe"))  # terminal jobs take no more results


def test_progress_counts_running_steps_by_fraction() -> None:
    record = web_like()
    mark_running(record, "probe", 1)
    record.steps["probe"].progress = 0.5
    assert record.progress == round(0.5 / 3, 4)
