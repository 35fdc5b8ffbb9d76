"""The job record and its state machine: pure functions over data, no I/O.

Job:  queued -> running -> succeeded | failed | cancelled  (cancelling while steps stop)
Step: pending -> ready -> running -> done | failed | skipped | cancelled

Every result is fenced on (step, attempt): a late or duplicate completion from an attempt that
is no longer current changes nothing. Callers apply these functions inside a compare-and-set
loop on the KV record, so each application starts from the latest revision.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any

import msgspec

from shared.events import ErrorInfo, InputRef, StageComplete, StepSpec


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class StepStatus(StrEnum):
    PENDING = "pending"
    READY = "ready"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


TERMINAL_JOB = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
FINISHED_STEP = frozenset({StepStatus.DONE, StepStatus.SKIPPED})
LIVE_STEP = frozenset({StepStatus.READY, StepStatus.RUNNING})


class StepState(msgspec.Struct, kw_only=True):
    stage: str
    uses: list[str] = []
    params: dict[str, Any] = {}
    status: StepStatus = StepStatus.PENDING
    attempt: int = 0
    outputs: dict[str, str] = {}
    meta: dict[str, Any] = {}
    error: ErrorInfo | None = None
    progress: float = 0.0
    from_checkpoint: bool = False
    ready_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None


class JobRecord(msgspec.Struct, kw_only=True):
    job_id: str
    tenant: str
    recipe: str | None = None
    inputs: list[InputRef] = []
    params: dict[str, Any] = {}
    status: JobStatus = JobStatus.QUEUED
    steps: dict[str, StepState] = {}
    error: ErrorInfo | None = None
    idempotency_key: str | None = None
    created_at: float = msgspec.field(default_factory=time.time)
    updated_at: float = msgspec.field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    schema_version: int = 1

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_JOB

    @property
    def planned(self) -> bool:
        return bool(self.steps)

    @property
    def progress(self) -> float:
        """0..1: finished steps count fully, running ones by their reported fraction."""
        if self.status == JobStatus.SUCCEEDED:
            return 1.0
        if not self.steps:
            return 0.0
        total = sum(
            1.0 if s.status in FINISHED_STEP else s.progress if s.status == StepStatus.RUNNING
            else 0.0
            for s in self.steps.values()
        )
        return round(total / len(self.steps), 4)


def input_ref_index(ref: str) -> int | None:
    """``:input`` -> 0, ``:input/3`` -> 3; ``None`` for a step name."""
    if ref == ":input":
        return 0
    if ref.startswith(":input/"):
        return int(ref.split("/", 1)[1])
    return None


def plan(record: JobRecord, steps: dict[str, StepSpec]) -> list[str]:
    """Lay out the steps and make ready those whose inputs are all available."""
    record.steps = {
        name: StepState(stage=spec.stage, uses=list(spec.uses), params=dict(spec.params))
        for name, spec in steps.items()
    }
    return advance(record)


def advance(record: JobRecord) -> list[str]:
    """Move pending steps whose dependencies are finished to ready; settle the job.

    Returns the steps that became ready now (each needs a task published).
    """
    now = time.time()
    newly_ready: list[str] = []
    if record.terminal:
        return newly_ready
    failed = [n for n, s in record.steps.items() if s.status == StepStatus.FAILED]
    if failed:
        first = record.steps[failed[0]]
        _finish(record, JobStatus.FAILED, now, first.error)
        return newly_ready
    for name, step in record.steps.items():
        if step.status != StepStatus.PENDING:
            continue
        deps = [u for u in step.uses if input_ref_index(u) is None]
        if all(record.steps[d].status in FINISHED_STEP for d in deps):
            step.status = StepStatus.READY
            step.attempt += 1
            step.ready_at = now
            newly_ready.append(name)
    if all(s.status in FINISHED_STEP for s in record.steps.values()):
        _finish(record, JobStatus.SUCCEEDED, now, None)
    record.updated_at = now
    return newly_ready


def _finish(record: JobRecord, status: JobStatus, now: float, error: ErrorInfo | None) -> None:
    record.status = status
    record.error = error
    record.finished_at = now
    record.updated_at = now
    if status == JobStatus.SUCCEEDED:
        return
    for step in record.steps.values():
        if step.status in (StepStatus.PENDING, StepStatus.READY, StepStatus.RUNNING):
            step.status = StepStatus.CANCELLED


def fail_job(record: JobRecord, error: ErrorInfo) -> None:
    """Fail a job before or outside any step (invalid recipe, missing input)."""
    if not record.terminal:
        _finish(record, JobStatus.FAILED, time.time(), error)


def is_current(record: JobRecord, step: str, attempt: int) -> bool:
    """The fence: is (step, attempt) the live attempt of a step that may still report?"""
    state = record.steps.get(step)
    return (
        not record.terminal
        and state is not None
        and state.attempt == attempt
        and state.status in LIVE_STEP
    )


def mark_running(record: JobRecord, step: str, attempt: int) -> bool:
    """A worker took the task. False (and no change) when the attempt is stale."""
    if not is_current(record, step, attempt):
        return False
    state = record.steps[step]
    now = time.time()
    if state.status == StepStatus.READY or state.started_at is None:
        state.started_at = now
    state.status = StepStatus.RUNNING
    if record.status == JobStatus.QUEUED:
        record.status = JobStatus.RUNNING
        record.started_at = now
    record.updated_at = now
    return True


def set_progress(record: JobRecord, step: str, attempt: int, fraction: float) -> bool:
    if not is_current(record, step, attempt):
        return False
    record.steps[step].progress = max(0.0, min(1.0, fraction))
    record.updated_at = time.time()
    return True


def apply_complete(record: JobRecord, done: StageComplete) -> bool:
    """Apply a step result if it belongs to the current attempt; False if stale/duplicate."""
    if not is_current(record, done.step, done.attempt):
        return False
    state = record.steps[done.step]
    now = time.time()
    state.finished_at = now
    state.started_at = state.started_at or now
    if done.error is not None:
        state.status = StepStatus.FAILED
        state.error = done.error
    else:
        state.status = StepStatus.DONE
        state.outputs = dict(done.outputs)
        state.meta = dict(done.meta)
        state.progress = 1.0
        state.from_checkpoint = done.from_checkpoint
    if record.status == JobStatus.QUEUED:
        record.status = JobStatus.RUNNING
        record.started_at = now
    record.updated_at = now
    return True
