"""The job state machine and the (step, attempt) fence, as pure functions."""

from __future__ import annotations

from shared.events import ErrorInfo, InputRef, StageComplete, StepSpec
from shared.jobstate import (
    JobRecord,
    JobStatus,
    StepStatus,
    advance,
    apply_complete,
    cancel_job,
    complete,
    hand_back,
    live_tasks,
    mark_running,
    plan,
    redrive,
    retry_job,
    start_job,
    touch,
)


def web_like() -> JobRecord:
    record = JobRecord(job_id="j1", tenant="default", inputs=[InputRef(key="uploads/a")])
    ready = plan(record, {
        "probe": StepSpec(stage="probe", uses=[":input"]),
        "transcode": StepSpec(stage="transcode", uses=[":input", "probe"]),
        "poster": StepSpec(stage="thumbnail", uses=[":input", "probe"]),
    })
    assert ready == [("probe", None)]
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
    assert sorted(advance(record)) == [("poster", None), ("transcode", None)]  # fan-out
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


def expanding() -> JobRecord:
    record = JobRecord(job_id="j1", tenant="default", inputs=[InputRef(key="uploads/a")])
    plan(record, {
        "split": StepSpec(stage="noop", uses=[":input"]),
        "encode": StepSpec(stage="noop", uses=["split"], each="split"),
        "join": StepSpec(stage="noop", uses=["encode"]),
    })
    apply_complete(record, done("split", outputs={"seg-0": "k0", "seg-1": "k1", "seg-2": "k2"}))
    return record


def part_done(index: int, attempt: int = 1, **kw: object) -> StageComplete:
    return done("encode", attempt=attempt, part=index, **kw)


def test_a_step_expands_into_one_task_per_part_and_joins_once() -> None:
    record = expanding()
    assert advance(record) == [("encode", 0), ("encode", 1), ("encode", 2)]
    assert not apply_complete(record, done("encode"))  # a whole-step result is not a part's
    assert apply_complete(record, part_done(2, outputs={"video": "e2"}))
    assert apply_complete(record, part_done(0, outputs={"video": "e0"}))
    assert not apply_complete(record, part_done(0, outputs={"video": "stale"}))  # duplicate
    assert advance(record) == []  # not joined yet: part 1 is outstanding
    assert record.steps["encode"].status == StepStatus.READY
    assert apply_complete(record, part_done(1, outputs={"video": "e1"}))
    assert record.steps["encode"].status == StepStatus.DONE
    assert record.steps["encode"].outputs == {
        "video.0000": "e0", "video.0001": "e1", "video.0002": "e2"}  # in part order
    assert advance(record) == [("join", None)]  # joined exactly once


def test_a_failed_part_fails_the_step_and_job() -> None:
    record = expanding()
    advance(record)
    mark_running(record, "encode", 1, part=1)
    assert apply_complete(record, part_done(1, error=ErrorInfo(code="timeout", message="slow")))
    advance(record)
    assert record.status == JobStatus.FAILED and record.error is not None
    assert record.error.code == "timeout"


def test_skips_cascade_unless_the_step_fans_in() -> None:
    record = JobRecord(job_id="j1", tenant="default", inputs=[InputRef(key="uploads/a")])
    plan(record, {
        "r1080": StepSpec(stage="noop", uses=[":input"]),
        "r360": StepSpec(stage="noop", uses=[":input"]),
        "c1080": StepSpec(stage="noop", uses=["r1080"]),
        "c360": StepSpec(stage="noop", uses=["r360"]),
        "package": StepSpec(stage="noop", uses=["c1080", "c360"], fan_in=True),
    })
    assert apply_complete(record, done("r1080", skipped="source is only 360p"))
    assert apply_complete(record, done("r360", outputs={"video": "v"}))
    assert advance(record) == [("c360", None)]
    assert record.steps["c1080"].status == StepStatus.SKIPPED  # cascaded
    assert apply_complete(record, done("c360"))
    assert advance(record) == [("package", None)]  # fans in over what is left
    assert apply_complete(record, done("package"))
    advance(record)
    assert record.status == JobStatus.SUCCEEDED


def test_a_later_delivery_takes_the_lease_and_the_earlier_result_is_refused() -> None:
    record = web_like()
    assert mark_running(record, "probe", 1, delivery=1)
    assert mark_running(record, "probe", 1, delivery=2)  # redelivered after AckWait
    assert not mark_running(record, "probe", 1, delivery=1)  # the paused worker wakes up
    assert not apply_complete(record, done("probe", delivery=1, meta={"by": "paused"}))
    assert apply_complete(record, done("probe", delivery=2, meta={"by": "second"}))
    assert record.steps["probe"].meta == {"by": "second"}


def test_retry_reruns_failed_and_cancelled_steps_from_checkpoints() -> None:
    record = web_like()
    apply_complete(record, done("probe", meta={"duration_s": 3.0}))
    advance(record)
    apply_complete(record, done("transcode", error=ErrorInfo(code="timeout", message="slow")))
    advance(record)
    assert record.status == JobStatus.FAILED
    assert record.steps["poster"].status == StepStatus.CANCELLED
    assert retry_job(record)
    assert record.status == JobStatus.RUNNING and record.error is None
    assert record.steps["probe"].status == StepStatus.DONE  # kept: not re-run
    assert record.steps["probe"].attempt == 1
    # New attempts, so new task ids: a retry is never swallowed by deduplication.
    assert sorted(live_tasks(record)) == [("poster", None), ("transcode", None)]
    assert (record.steps["transcode"].attempt, record.steps["poster"].attempt) == (2, 2)
    assert not apply_complete(record, done("transcode", attempt=1))  # the old attempt
    assert apply_complete(record, done("transcode", attempt=2))
    assert apply_complete(record, done("poster", attempt=2))
    advance(record)
    assert record.status == JobStatus.SUCCEEDED
    assert not retry_job(record)  # nothing to retry in a succeeded job


def test_retry_of_a_cancelled_expansion_keeps_its_finished_parts() -> None:
    record = expanding()
    advance(record)
    apply_complete(record, part_done(0, outputs={"video": "e0"}))
    assert cancel_job(record, "stop")
    assert retry_job(record)
    encode = record.steps["encode"]
    assert [p.status for p in encode.parts] == [StepStatus.DONE, StepStatus.READY,
                                                StepStatus.READY]
    assert [p.attempt for p in encode.parts] == [1, 2, 2]
    assert live_tasks(record) == [("encode", 1), ("encode", 2)]


def test_redrive_gives_live_tasks_new_attempts_and_fences_the_old_ones() -> None:
    record = expanding()
    advance(record)
    mark_running(record, "encode", 1, part=1, delivery=1)
    apply_complete(record, part_done(0, outputs={"video": "e0"}))
    assert redrive(record)
    assert live_tasks(record) == [("encode", 1), ("encode", 2)]
    assert not apply_complete(record, part_done(1, attempt=1))  # the lost attempt reports late
    assert apply_complete(record, part_done(1, attempt=2, outputs={"video": "e1"}))
    assert apply_complete(record, part_done(2, attempt=2, outputs={"video": "e2"}))
    assert record.steps["encode"].status == StepStatus.DONE
    assert cancel_job(record, "stop") and not redrive(record)


CANCELLED_STOP = ErrorInfo(code="cancelled", message="stopped")


def test_cancelling_a_job_with_nothing_running_cancels_it_at_once() -> None:
    record = web_like()
    assert cancel_job(record, "stop")
    assert record.status == JobStatus.CANCELLED
    assert record.steps["probe"].status == StepStatus.CANCELLED
    assert not cancel_job(record, "again")


def test_a_running_job_is_cancelling_until_its_running_tasks_stop() -> None:
    record = expanding()
    advance(record)
    assert mark_running(record, "encode", 1, part=0, delivery=1)
    assert mark_running(record, "encode", 1, part=1, delivery=1)
    assert cancel_job(record, "stop")
    assert record.status == JobStatus.CANCELLING and not record.terminal
    assert record.error is not None and record.error.code == "cancelled"
    parts = record.steps["encode"].parts
    assert [p.status for p in parts] == [StepStatus.RUNNING, StepStatus.RUNNING,
                                         StepStatus.CANCELLED]
    assert not cancel_job(record, "again")  # one cancel
    assert not mark_running(record, "encode", 1, part=0, delivery=2)  # nothing new starts
    assert live_tasks(record) == []

    # Part 0 finished before it heard the cancel: its result is kept, nothing new is ready.
    done0 = complete(record, part_done(0, outputs={"video": "e0"}, delivery=1))
    assert done0 is not None and done0.ready == [] and not done0.status_changed
    assert parts[0].status == StepStatus.DONE and parts[0].outputs == {"video": "e0"}
    assert record.status == JobStatus.CANCELLING
    # Part 1 stopped: the last running task, so the job is cancelled now.
    done1 = complete(record, part_done(1, error=CANCELLED_STOP, delivery=1))
    assert done1 is not None and done1.status_changed
    assert parts[1].status == StepStatus.CANCELLED
    assert record.status == JobStatus.CANCELLED and record.error.code == "cancelled"
    assert record.steps["join"].status == StepStatus.CANCELLED
    # A retry resumes from what finished, part 0 included.
    assert retry_job(record)
    assert [p.status for p in parts] == [StepStatus.DONE, StepStatus.READY, StepStatus.READY]


def test_a_stuck_cancelling_job_is_cancelled_by_a_redrive() -> None:
    record = web_like()
    mark_running(record, "probe", 1, delivery=1)
    assert cancel_job(record, "stop") and record.status == JobStatus.CANCELLING
    # The worker died and never reported: the janitor's re-drive finishes the cancel.
    assert redrive(record)
    assert record.status == JobStatus.CANCELLED
    assert record.steps["probe"].status == StepStatus.CANCELLED
    assert not apply_complete(record, done("probe", delivery=1))  # too late to count


def test_start_job_plans_once_or_fails_with_the_error() -> None:
    record = JobRecord(job_id="j1", tenant="default", inputs=[InputRef(key="uploads/a")])
    steps = {"probe": StepSpec(stage="probe", uses=[":input"])}
    assert start_job(record, steps, None)
    assert not start_job(record, steps, None)  # a redelivered submit
    failed = JobRecord(job_id="j2", tenant="default")
    assert start_job(failed, None, ErrorInfo(code="input_not_found", message="gone"))
    assert failed.status == JobStatus.FAILED and failed.error is not None
    assert failed.error.code == "input_not_found"


def test_touch_keeps_the_lease_visible_only_for_its_holder() -> None:
    record = web_like()
    mark_running(record, "probe", 1, delivery=2)
    record.updated_at = 0.0
    assert touch(record, "probe", 1, None, 2) and record.updated_at > 0
    assert not touch(record, "probe", 1, None, 1)  # a superseded delivery


def test_a_hand_back_records_how_far_the_task_got_and_keeps_its_attempt() -> None:
    record = web_like()
    mark_running(record, "probe", 1, delivery=1)
    record.steps["probe"].progress = 0.4
    assert hand_back(record, "probe", 1, None, 1)
    probe = record.steps["probe"]
    assert probe.last_error is not None and probe.last_error.code == "handed_back"
    assert probe.last_error.details == {"progress": 0.4, "delivery": 1}
    assert probe.status == StepStatus.RUNNING and probe.attempt == 1
    assert mark_running(record, "probe", 1, delivery=2)  # the next delivery takes over
    assert not hand_back(record, "probe", 1, None, 1)  # the old one holds nothing now


def test_a_cancelling_announcement_keeps_its_message_id() -> None:
    from shared import msgids

    record = web_like()
    mark_running(record, "probe", 1, delivery=1)
    cancel_job(record, "stop")
    first = msgids.status(record)
    record.updated_at += 5  # a lease touch while the task stops
    assert msgids.status(record) == first
