"""The job record and its state machine: pure functions over data, no I/O.

Job:  queued -> running -> succeeded | failed | cancelled
      queued | running -> cancelling -> cancelled   (a cancel while steps run: they stop)
Step: pending -> ready -> running -> done | failed | skipped | cancelled

Every write of a job record is one of the named *transitions* below (``start_job``,
``mark_running``, ``note_failure``, ``hand_back``, ``set_progress``, ``touch``,
``complete``, ``cancel_job``, ``retry_job``, ``redrive``, ``fail_job``): each mutates the
record in place and returns a result, or ``False`` / ``None`` when it leaves the record as
it was. ``JobStore.apply`` runs one inside its compare-and-set loop and skips the write
when nothing changed, so no caller writes a record any other way.

A step with ``each`` expands when it becomes ready into one *part* per output of the step it
expands over; each part has its own status and attempt, and the step is done exactly when
the last part is (the join). A step whose input was skipped is skipped too, unless it is a
``fan_in`` step, which runs with whichever inputs remain.

Every result is fenced on (step, part, attempt): a late or duplicate completion from an
attempt that is no longer current changes nothing. Callers apply these functions inside a
compare-and-set loop on the KV record, so each application starts from the latest revision.
"""

from __future__ import annotations

import re
import time
from enum import StrEnum
from typing import Any

import msgspec

from shared.events import (
    CheckResult,
    ErrorInfo,
    InputRef,
    RetryChanges,
    StageComplete,
    StepSpec,
)


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
ACTIVE_JOB = frozenset({JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING})
FINISHED_STEP = frozenset({StepStatus.DONE, StepStatus.SKIPPED})
LIVE_STEP = frozenset({StepStatus.READY, StepStatus.RUNNING})


class PartState(msgspec.Struct, kw_only=True):
    """One task of an expanded step."""

    status: StepStatus = StepStatus.READY
    attempt: int = 1
    lease: int = 0
    """Delivery number of the worker that holds this attempt (see ``mark_running``)."""
    last_error: ErrorInfo | None = None
    """The latest transient failure of this attempt (it is being retried)."""
    outputs: dict[str, str] = {}
    meta: dict[str, Any] = {}
    checks: list[CheckResult] = []
    """Output checks of this part (see ``StageComplete.checks``)."""
    error: ErrorInfo | None = None
    progress: float = 0.0
    from_checkpoint: bool = False
    started_at: float | None = None
    finished_at: float | None = None


class StepState(msgspec.Struct, kw_only=True):
    stage: str
    uses: list[str] = []
    params: dict[str, Any] = {}
    each: str | None = None
    fan_in: bool = False
    status: StepStatus = StepStatus.PENDING
    attempt: int = 0
    lease: int = 0
    """Delivery number of the worker that holds this attempt (see ``mark_running``)."""
    last_error: ErrorInfo | None = None
    """The latest transient failure of this attempt (it is being retried)."""
    parts: list[PartState] = []
    outputs: dict[str, str] = {}
    meta: dict[str, Any] = {}
    checks: list[CheckResult] = []
    """Output checks of the step's outputs (an expanded step: every part's, each with its
    ``part`` index), all passed; a failed check fails the step instead."""
    error: ErrorInfo | None = None
    skipped: str | None = None
    progress: float = 0.0
    from_checkpoint: bool = False
    ready_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    cleaned_at: float | None = None
    """When the janitor deleted this step's objects as intermediates of a succeeded job
    (its ``outputs`` are then empty: the record never lists a deleted key)."""
    first_part_attempt: int = 1
    """Attempt the parts start from when the step expands: above every attempt of the
    parts of an earlier plan of the step (``replan_job``), so their tasks and results get
    new message ids."""

    @property
    def step_deps(self) -> list[str]:
        return [u for u in self.uses if input_ref_index(u) is None]


class JobRecord(msgspec.Struct, kw_only=True):
    job_id: str
    tenant: str
    recipe: str | None = None
    inputs: list[InputRef] = []
    params: dict[str, Any] = {}
    status: JobStatus = JobStatus.QUEUED
    steps: dict[str, StepState] = {}
    error: ErrorInfo | None = None
    pipeline: dict[str, StepSpec] | None = None
    """Inline steps of the request (None for a recipe): enough to plan the job again if
    its submit message was lost before it was planned."""
    idempotency_key: str | None = None
    request_hash: str | None = None
    """Fingerprint of the request that made the job: a repeat with the same idempotency key
    but a different request is a conflict, not a silent match."""
    callback_url: str | None = None
    """Where the ``notify`` function POSTs this job's status changes (webhook)."""
    callback_secret: str | None = None
    """HMAC key signing those POSTs (unset: ``JETCUT_CALLBACK_SECRET``). Never shown by
    the API."""
    created_at: float = msgspec.field(default_factory=time.time)
    updated_at: float = msgspec.field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    cancel_requested_at: float | None = None
    """When a cancel made the job ``cancelling`` (None: it never was, or it was retried)."""
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


_PART_OUTPUT = re.compile(r"^([a-z][a-z0-9_-]*)\.(\d{4,})$")


def part_inputs(outputs: dict[str, str]) -> list[dict[str, str]]:
    """The files of each part of a step that expands over ``outputs``, in part order.

    Outputs named ``<kind>.<NNNN>`` (``part.0000``, ``audio.0000``, ...) group by their
    number: part ``i`` gets every kind numbered ``i``, under the logical names ``part``
    (the ``part.NNNN`` file) and ``<kind>`` (the others), so a split can hand each task
    side files (its stretch of audio) without adding tasks. Otherwise each output is one
    part, in name order, under the name ``part``.
    """
    matches = {name: _PART_OUTPUT.match(name) for name in outputs}
    if not outputs or not all(matches.values()) or not any(
            m and m.group(1) == "part" for m in matches.values()):
        return [{"part": key} for _, key in sorted(outputs.items())]
    groups: dict[int, dict[str, str]] = {}
    for name, key in outputs.items():
        match = matches[name]
        assert match is not None
        groups.setdefault(int(match.group(2)), {})[match.group(1)] = key
    return [groups[i] for i in sorted(groups) if "part" in groups[i]]


def start_job(record: JobRecord, steps: dict[str, StepSpec] | None,
              error: ErrorInfo | None) -> bool:
    """Transition: plan a submitted job into ``steps``, or fail it with ``error`` (a bad
    recipe, a missing input). False when it was planned or finished before (a redelivered
    submit)."""
    if record.planned or record.terminal:
        return False
    if error is not None or steps is None:
        fail_job(record, error or ErrorInfo(code="invalid_recipe", message="no steps"))
        return True
    plan(record, steps)
    return True


def plan(record: JobRecord, steps: dict[str, StepSpec]) -> list[tuple[str, int | None]]:
    """Lay out the steps and make ready those whose inputs are all available."""
    record.steps = {
        name: StepState(stage=spec.stage, uses=list(spec.uses), params=dict(spec.params),
                        each=spec.each, fan_in=spec.fan_in)
        for name, spec in steps.items()
    }
    return advance(record)


def advance(record: JobRecord) -> list[tuple[str, int | None]]:
    """Make ready what can run, skip what cannot apply, and settle the job.

    Returns the tasks that became ready now, as (step, part) pairs: each needs publishing.
    """
    now = time.time()
    ready: list[tuple[str, int | None]] = []
    if record.terminal:
        return ready
    if record.status == JobStatus.CANCELLING:
        # Nothing new starts; the job is cancelled once its last running task stopped.
        if not _running_units(record):
            _finish(record, JobStatus.CANCELLED, now, record.error)
        return ready
    changed = True
    while changed:  # skips and empty expansions can unlock further steps
        changed = False
        failed = [s for s in record.steps.values() if s.status == StepStatus.FAILED]
        if failed:
            _finish(record, JobStatus.FAILED, now, failed[0].error)
            return ready
        for name, step in record.steps.items():
            if step.status != StepStatus.PENDING:
                continue
            deps = [record.steps[d] for d in step.step_deps]
            if not all(d.status in FINISHED_STEP for d in deps):
                continue
            changed = True
            skipped = [d for d in deps if d.status == StepStatus.SKIPPED]
            if skipped and (not step.fan_in or len(skipped) == len(deps)):
                step.status = StepStatus.SKIPPED
                step.skipped = "an input step was skipped"
                step.finished_at = now
                continue
            step.status = StepStatus.READY
            step.attempt += 1
            step.ready_at = now
            if step.each is None:
                ready.append((name, None))
                continue
            count = len(part_inputs(record.steps[step.each].outputs))
            step.parts = [PartState(attempt=step.first_part_attempt) for _ in range(count)]
            if count == 0:
                _join(step, now)
            ready.extend((name, i) for i in range(count))
    if all(s.status in FINISHED_STEP for s in record.steps.values()):
        _finish(record, JobStatus.SUCCEEDED, now, None)
    record.updated_at = now
    return play_order(ready)


def play_order(tasks: list[tuple[str, int | None]]) -> list[tuple[str, int | None]]:
    """Tasks sorted by part, stably: part 0 of every expanded step (in plan order) before
    part 1 of any, so a segmented ladder becomes playable from its start as soon as
    possible instead of finishing one rung before starting the next."""
    return sorted(tasks, key=lambda t: -1 if t[1] is None else t[1])


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


def fail_job(record: JobRecord, error: ErrorInfo) -> bool:
    """Transition: fail a job before or outside any step (invalid recipe, missing input)."""
    if record.terminal:
        return False
    _finish(record, JobStatus.FAILED, time.time(), error)
    return True


def _running_units(record: JobRecord) -> list[StepState | PartState]:
    """Steps (or parts of expanded steps) a worker holds now."""
    units: list[StepState | PartState] = []
    for step in record.steps.values():
        if step.each is not None and step.parts:
            units.extend(p for p in step.parts if p.status == StepStatus.RUNNING)
        elif step.status == StepStatus.RUNNING:
            units.append(step)
    return units


def cancel_job(record: JobRecord, reason: str) -> bool:
    """Transition: cancel a job that has not finished; False if it has (or is cancelling).

    What has not started is cancelled at once. A job with running tasks is ``cancelling``
    until each has stopped (its worker hears the cancel, kills ffmpeg and reports the stop,
    or finishes first: a result that made it is kept for a retry); a job with none is
    ``cancelled`` now.
    """
    if record.terminal or record.status == JobStatus.CANCELLING:
        return False
    now = time.time()
    error = ErrorInfo(code="cancelled", message=reason or "cancelled on request")
    if not _running_units(record):
        _finish(record, JobStatus.CANCELLED, now, error)
        return True
    record.status = JobStatus.CANCELLING
    record.error = error
    record.cancel_requested_at = now
    record.updated_at = now
    for step in record.steps.values():
        for part in step.parts:
            if part.status in (StepStatus.PENDING, StepStatus.READY):
                part.status = StepStatus.CANCELLED
        if step.status in (StepStatus.PENDING, StepStatus.READY):
            step.status = StepStatus.CANCELLED
    return True


def finish_cancel(record: JobRecord) -> bool:
    """Transition: a ``cancelling`` job whose running tasks never reported their stop (their
    workers died) is cancelled for good; the janitor asks for it once the job is stuck."""
    if record.status != JobStatus.CANCELLING:
        return False
    _finish(record, JobStatus.CANCELLED, time.time(), record.error)
    return True


def live_tasks(record: JobRecord) -> list[tuple[str, int | None]]:
    """Every task that should exist now: ready steps and ready parts (for re-drives)."""
    tasks: list[tuple[str, int | None]] = []
    if record.terminal:
        return tasks
    for name, step in record.steps.items():
        if step.status not in LIVE_STEP:
            continue
        if step.each is None:
            if step.status == StepStatus.READY:
                tasks.append((name, None))
        else:
            tasks.extend((name, i) for i, p in enumerate(step.parts)
                         if p.status == StepStatus.READY)
    return play_order(tasks)


def attempt_of(record: JobRecord, step: str, part: int | None) -> int:
    state = record.steps[step]
    return state.attempt if part is None else state.parts[part].attempt


def _unit(record: JobRecord, step: str, part: int | None) -> StepState | PartState | None:
    state = record.steps.get(step)
    if state is None or (part is None) != (state.each is None):
        return None
    if part is None:
        return state
    return state.parts[part] if 0 <= part < len(state.parts) else None


def is_current(record: JobRecord, step: str, attempt: int, part: int | None = None) -> bool:
    """The fence: is (step, part, attempt) the live attempt of a task that may still report?"""
    state = record.steps.get(step)
    unit = _unit(record, step, part)
    return (
        not record.terminal
        and state is not None
        and state.status in LIVE_STEP
        and unit is not None
        and unit.attempt == attempt
        and unit.status in LIVE_STEP
    )


def already_applied(record: JobRecord, done: StageComplete) -> bool:
    """Was this exact result applied before (a redelivered completion)?"""
    unit = _unit(record, done.step, done.part)
    return (
        unit is not None
        and unit.attempt == done.attempt
        and unit.status in (StepStatus.DONE, StepStatus.FAILED, StepStatus.SKIPPED)
    )


def holds_lease(record: JobRecord, step: str, attempt: int, part: int | None,
                delivery: int) -> bool:
    """Is the worker with this delivery of the task still the one the record trusts?

    A worker paused past its AckWait (SIGSTOP, a long GC, a network partition) loses the
    task to a redelivery; the redelivery's ``mark_running`` raises the lease, so when the
    first worker wakes up, its upload and its result are refused.
    """
    unit = _unit(record, step, part)
    return (is_current(record, step, attempt, part) and unit is not None
            and (delivery == 0 or unit.lease <= delivery))


def mark_running(record: JobRecord, step: str, attempt: int, part: int | None = None,
                 delivery: int = 0, now: float | None = None) -> bool:
    """Transition: a worker took the task (delivery ``delivery`` of its message); the first
    task to start makes a queued job running. False (and no change) when the attempt is
    stale, a later delivery already took it, or the job is being cancelled.

    ``now`` is the clock to record (default: now): the worker passes it on in its result
    (``StageComplete.taken``), so the conductor can replay this write exactly."""
    if record.status == JobStatus.CANCELLING:
        return False
    if not holds_lease(record, step, attempt, part, delivery):
        return False
    now = time.time() if now is None else now
    state = record.steps[step]
    unit = _unit(record, step, part)
    assert unit is not None
    unit.lease = max(unit.lease, delivery)
    unit.started_at = unit.started_at or now
    unit.status = StepStatus.RUNNING
    state.started_at = state.started_at or now
    state.status = StepStatus.RUNNING
    if record.status == JobStatus.QUEUED:
        record.status = JobStatus.RUNNING
        record.started_at = now
    record.updated_at = now
    return True


def note_failure(record: JobRecord, step: str, attempt: int, part: int | None,
                 delivery: int, error: ErrorInfo) -> bool:
    """Transition: record a transient failure that is about to be retried, so the job
    shows why."""
    if not holds_lease(record, step, attempt, part, delivery):
        return False
    unit = _unit(record, step, part)
    assert unit is not None
    unit.last_error = error
    record.steps[step].last_error = error
    record.updated_at = time.time()
    return True


def hand_back(record: JobRecord, step: str, attempt: int, part: int | None,
              delivery: int) -> bool:
    """Transition: the worker holding the task is shutting down and could not finish it
    within its drain grace; it hands the task back (the message is nak'ed for another
    worker at once) and the record says how far it got (``last_error``: ``handed_back``,
    with the progress). The attempt stays: the next delivery takes the lease over."""
    if not holds_lease(record, step, attempt, part, delivery):
        return False
    unit = _unit(record, step, part)
    assert unit is not None
    error = ErrorInfo(
        code="handed_back",
        message=f"the worker stopped at {unit.progress:.0%} (shutdown) and handed the task "
                "back; another worker runs it",
        details={"progress": unit.progress, "delivery": delivery},
    )
    unit.last_error = error
    record.steps[step].last_error = error
    record.updated_at = time.time()
    return True


def set_progress(
    record: JobRecord, step: str, attempt: int, fraction: float, part: int | None = None
) -> bool:
    """Transition: the running task's progress (0..1), for the job's overall progress."""
    if not is_current(record, step, attempt, part):
        return False
    unit = _unit(record, step, part)
    assert unit is not None
    unit.progress = max(0.0, min(1.0, fraction))
    state = record.steps[step]
    if part is not None:
        state.progress = round(sum(p.progress for p in state.parts) / len(state.parts), 4)
    record.updated_at = time.time()
    return True


def touch(record: JobRecord, step: str, attempt: int, part: int | None,
          delivery: int) -> bool:
    """Transition: the worker holding the task is alive (its lease), so the janitor never
    takes a long step for a stuck job. False when it no longer holds the task."""
    if not holds_lease(record, step, attempt, part, delivery):
        return False
    record.updated_at = time.time()
    return True


class Completed(msgspec.Struct, kw_only=True):
    """What applying a result did: tasks it made ready, and whether the job's status moved."""

    ready: list[tuple[str, int | None]]
    status_changed: bool


def complete(record: JobRecord, done: StageComplete) -> Completed | None:
    """Transition: apply a task result (``apply_complete``) and everything it unlocks
    (``advance``). None when the result is stale, superseded or a duplicate."""
    before = record.status
    if not apply_complete(record, done):
        return None
    ready = advance(record)
    return Completed(ready=ready, status_changed=record.status != before)


def apply_complete(record: JobRecord, done: StageComplete) -> bool:
    """Apply a task result if it belongs to the current attempt and the worker still holds
    its lease; False if stale, superseded or a duplicate.

    While the job is cancelling, a result only settles its task: a success keeps its
    outputs (a retry reuses them), anything else leaves the task cancelled.
    """
    if not holds_lease(record, done.step, done.attempt, done.part, done.delivery):
        return False
    now = time.time()
    state = record.steps[done.step]
    unit = _unit(record, done.step, done.part)
    assert unit is not None
    unit.finished_at = now
    unit.started_at = unit.started_at or now
    if record.status == JobStatus.CANCELLING and (done.error is not None
                                                  or done.skipped is not None):
        unit.status = StepStatus.CANCELLED
        if done.part is None:
            state.finished_at = now
    elif done.error is not None:
        unit.status = StepStatus.FAILED
        unit.error = done.error
        if done.part is not None:
            state.status, state.error, state.finished_at = StepStatus.FAILED, done.error, now
    elif done.skipped is not None and done.part is None:
        state.status, state.skipped, state.finished_at = StepStatus.SKIPPED, done.skipped, now
    else:
        unit.status = StepStatus.DONE
        unit.outputs = dict(done.outputs)
        unit.meta = dict(done.meta)
        unit.checks = list(done.checks)
        unit.progress = 1.0
        unit.from_checkpoint = done.from_checkpoint
        if done.part is not None and all(p.status == StepStatus.DONE for p in state.parts):
            _join(state, now)
    if record.status == JobStatus.QUEUED:
        record.status = JobStatus.RUNNING
        record.started_at = now
    record.updated_at = now
    return True


def _join(state: StepState, now: float) -> None:
    """The last part is done: the step's outputs are the parts', numbered in order."""
    state.status = StepStatus.DONE
    state.progress = 1.0
    state.finished_at = now
    state.outputs = {
        f"{name}.{i:04d}": key
        for i, part in enumerate(state.parts) for name, key in sorted(part.outputs.items())
    }
    state.meta = {"parts": [part.meta for part in state.parts]}
    state.checks = [msgspec.structs.replace(check, part=i) for i, part in enumerate(state.parts)
                    for check in part.checks]
    state.from_checkpoint = all(p.from_checkpoint for p in state.parts)


def _reset_unit(unit: StepState | PartState) -> None:
    unit.status = StepStatus.READY
    unit.attempt += 1
    unit.lease = 0
    unit.last_error = None
    unit.error = None
    unit.progress = 0.0
    unit.started_at = None
    unit.finished_at = None


def retry_job(record: JobRecord) -> bool:
    """Transition: run a failed or cancelled job again from its checkpoints
    (``JobRetry(mode="failed")``).

    Finished steps and parts keep their results. Every other step starts over with a new
    attempt (so its task id, and the message id, is new); expanded steps keep their done
    parts and re-run only the rest. False (no change) unless the job is failed or cancelled
    and was planned.
    """
    if record.status not in (JobStatus.FAILED, JobStatus.CANCELLED) or not record.planned:
        return False
    for step in record.steps.values():
        if step.status not in (StepStatus.FAILED, StepStatus.CANCELLED):
            continue
        step.error = None
        if step.each is not None and step.parts:
            _reset_unit(step)
            for part in step.parts:
                if part.status != StepStatus.DONE:
                    _reset_unit(part)
        else:
            # Back to pending: ``advance`` makes it ready with a new attempt once its inputs
            # are done (they may be failed or cancelled steps being retried too).
            step.status = StepStatus.PENDING
            step.progress = 0.0
            step.lease = 0
            step.started_at = step.finished_at = None
    record.status = JobStatus.RUNNING if record.started_at else JobStatus.QUEUED
    record.error = None
    record.finished_at = None
    record.cancel_requested_at = None
    advance(record)
    return True


class Replanned(msgspec.Struct, kw_only=True):
    """How a new plan meets the old one (``diff_plan``)."""

    kept: list[str]
    """Finished steps that keep their outputs: same spec, and every step they use kept."""
    rerun: list[str]
    """Steps of the new plan that run (again)."""
    stale: list[str]
    """Steps of the old plan whose stored outputs no longer belong to the job (their spec
    or an upstream step changed, or the new plan has no such step): deleted before any
    task of the new plan runs, or a checkpoint of the old spec would pass for the new."""


def diff_plan(record: JobRecord, steps: dict[str, StepSpec]) -> Replanned:
    """Compare the job's current plan with ``steps`` (no change to the record)."""
    same: dict[str, bool] = {}

    def unchanged(name: str) -> bool:
        if name not in same:
            same[name] = False  # a cycle cannot plan; never true on the way round
            old, spec = record.steps.get(name), steps[name]
            same[name] = (
                old is not None and old.stage == spec.stage and old.uses == list(spec.uses)
                and old.params == dict(spec.params) and old.each == spec.each
                and old.fan_in == spec.fan_in
                and all(unchanged(d) for d in spec.uses if input_ref_index(d) is None)
            )
        return same[name]

    kept = [n for n in steps if unchanged(n) and record.steps[n].status == StepStatus.DONE]
    return Replanned(
        kept=kept, rerun=[n for n in steps if n not in kept],
        stale=[n for n in record.steps if n not in steps or not unchanged(n)],
    )


def replan_job(record: JobRecord, steps: dict[str, StepSpec],
               changes: RetryChanges) -> Replanned | None:
    """Transition: plan a failed or cancelled job again with ``changes`` (its recipe,
    inline steps or params) into ``steps``, and run it from its checkpoints
    (``JobRetry(changes=...)``).

    Finished steps the change does not touch keep their state, attempt and outputs
    (``diff_plan``); every other step starts over, with an attempt above its old one so
    its tasks are new messages. None (no change) unless the job is failed or cancelled
    and was planned.
    """
    if record.status not in (JobStatus.FAILED, JobStatus.CANCELLED) or not record.planned:
        return None
    diff = diff_plan(record, steps)
    old_steps = record.steps
    record.steps = {}
    for name, spec in steps.items():
        old = old_steps.get(name)
        if name in diff.kept and old is not None:
            record.steps[name] = old
            continue
        state = StepState(stage=spec.stage, uses=list(spec.uses), params=dict(spec.params),
                          each=spec.each, fan_in=spec.fan_in)
        if old is not None:
            state.attempt = max([old.attempt, *(p.attempt for p in old.parts)])
            state.first_part_attempt = state.attempt + 1
        record.steps[name] = state
    if changes.recipe is not None or changes.steps is not None:
        record.recipe, record.pipeline = changes.recipe, changes.steps
    if changes.params is not None:
        record.params = dict(changes.params)
    record.status = JobStatus.RUNNING if record.started_at else JobStatus.QUEUED
    record.error = None
    record.finished_at = None
    record.cancel_requested_at = None
    advance(record)
    return diff


def redrive(record: JobRecord, steps: dict[str, StepSpec] | None = None,
            error: ErrorInfo | None = None) -> bool:
    """Transition: give every ready or running task of a stuck job a new attempt
    (``mode="stuck"``).

    A task whose message was lost (a purged stream, a replica lost with its data) would
    otherwise wait forever; with a new attempt it is published again under a new id, and
    whatever the old attempt still reports is discarded by the fence. Checkpoints mean a
    part or step that had finished is not redone. A job whose submit was lost before it
    was planned is planned now (``steps``, or failed with ``error``); a cancelling job whose
    workers never reported is cancelled. False when the job is finished.
    """
    if record.terminal:
        return False
    if record.status == JobStatus.CANCELLING:
        return finish_cancel(record)
    if not record.planned:
        return start_job(record, steps, error)
    for step in record.steps.values():
        if step.status not in LIVE_STEP:
            continue
        if step.each is None:
            _reset_unit(step)
            continue
        step.status = StepStatus.READY
        for part in step.parts:
            if part.status in LIVE_STEP:
                _reset_unit(part)
    record.updated_at = time.time()
    return True
