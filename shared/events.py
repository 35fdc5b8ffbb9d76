"""Every message on the bus, as frozen, tagged, versioned msgspec Structs.

Bus events never forbid unknown fields, so a newer publisher can add a field without breaking
an older consumer; new fields always get defaults. Decoding is strict about types, and a
message that fails it is never retried: the consumer loop dead-letters it with the error.
Encoders and decoders are built once, at import.
"""

from __future__ import annotations

import time
from typing import Any, Literal, TypeVar

import msgspec

SCHEMA_VERSION = 1


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of all bus events: a ``type`` tag and a ``schema_version``."""

    schema_version: int = SCHEMA_VERSION


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A failure as users see it: a stable code, a message, optional details."""

    code: str
    message: str
    details: dict[str, Any] = {}


class InputRef(msgspec.Struct, frozen=True, kw_only=True):
    """A job input already in the object store (an upload, or a MinIO drop)."""

    key: str
    filename: str = ""
    size: int | None = None


class StepSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One step of a pipeline: which stage runs it, what it uses, with which params.

    ``uses`` names earlier steps or job inputs (``:input`` is the first, ``:input/<n>`` the
    n-th). This is user input, so unknown fields are refused rather than ignored.
    """

    stage: str
    uses: list[str] = []
    params: dict[str, Any] = {}
    each: str | None = None
    """Expand at run time: one task per part that this earlier step produced (segments,
    frames); the step is done when every part is. Must also appear in ``uses``."""
    fan_in: bool = False
    """Run with whichever of the used steps were not skipped (e.g. package the renditions
    that apply to this source); without it, a skipped input skips this step too."""


class JobSubmit(Event, tag="job.submit", kw_only=True, frozen=True):
    """Ask for a job. Published by the gateway, ingest, or any other service.

    ``job_id`` may be left out: the conductor then derives one from the idempotency key
    (or the stream sequence), so a redelivered submit never makes two jobs.
    """

    job_id: str | None = None
    tenant: str = "default"
    recipe: str | None = None
    steps: dict[str, StepSpec] | None = None
    inputs: list[InputRef] = []
    params: dict[str, Any] = {}
    idempotency_key: str | None = None
    submitted_at: float = msgspec.field(default_factory=time.time)
    callback_url: str | None = None
    """http(s) URL that gets the job's status changes, signed (the ``notify`` function)."""
    callback_secret: str | None = None
    """HMAC key for those callbacks (unset: the deployment's ``JETCUT_CALLBACK_SECRET``)."""


def part_name(step: str, part: int | None) -> str:
    """``encode`` or ``encode.p0007``: how a part is named in ids, keys and logs."""
    return step if part is None else f"{step}.p{part:04d}"


class TaskInput(msgspec.Struct, frozen=True, kw_only=True):
    """What a step receives from one thing it uses: object keys and upstream metadata."""

    ref: str
    stage: str | None = None
    """The stage of the used step (None for a job input)."""
    files: dict[str, str] = {}
    """Logical name -> object key."""
    meta: dict[str, Any] = {}


class StageTask(Event, tag="stage.task", kw_only=True, frozen=True):
    """One attempt of one step, on ``stages.<stage>``; its Nats-Msg-Id is job:step:attempt."""

    job_id: str
    tenant: str
    step: str
    stage: str
    attempt: int
    part: int | None = None
    """Which part of an expanded (``each``) step this task is."""
    params: dict[str, Any] = {}
    inputs: list[TaskInput] = []
    timeout_s: float = 600.0
    media_duration_s: float | None = None
    predicted_s: float | None = None
    """The cost model's prediction of this task's compute-seconds when it was published
    (``shared/costmodel.py``); its deadline ``timeout_s`` is a multiple of it."""

    @property
    def task_id(self) -> str:
        """``<job>:<step>[.p<part>]:<attempt>``: the Nats-Msg-Id that makes re-drives no-ops."""
        from shared import msgids  # msgids names parts with this module's part_name

        return msgids.task(self.job_id, self.step, self.part, self.attempt)


class CheckResult(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One check of one output: what was measured, against what, and whether it passed."""

    output: str
    """Logical output name (``video``, ``poster``, ...)."""
    check: str
    """``decode``, ``streams``, ``duration``, ``black``, ``freeze`` or ``quality``."""
    passed: bool
    measured: dict[str, Any] = {}
    expected: dict[str, Any] = {}
    note: str = ""
    part: int | None = None
    """Which part of an expanded step it checked (only in the step's joined list)."""


class Taken(msgspec.Struct, kw_only=True, frozen=True):
    """Where the worker's lease write (``jobstate.mark_running`` at clock ``at``) put the
    job record: applied to revision ``base``, stored as ``revision``. The conductor, if it
    knows revision ``base``, replays that write and applies the result without a read."""

    base: int
    revision: int
    at: float


class StageComplete(Event, tag="stage.complete", kw_only=True, frozen=True):
    """A step attempt finished (``error`` set when it failed for good)."""

    job_id: str
    tenant: str
    step: str
    attempt: int
    part: int | None = None
    outputs: dict[str, str] = {}
    meta: dict[str, Any] = {}
    error: ErrorInfo | None = None
    skipped: str | None = None
    """Set (to the reason) when the stage decided the step does not apply to this job."""
    elapsed_s: float = 0.0
    from_checkpoint: bool = False
    checks: list[CheckResult] = []
    """Output checks the stage ran on its outputs, all passed (``shared/media/verify.py``)."""
    delivery: int = 0
    """Delivery number of the task message this result came from (0: unknown). A result
    from a delivery older than the one holding the step's lease is discarded."""
    taken: Taken | None = None
    """The worker's lease write, when it made one (a hint: the result is fenced anyway)."""


class JobCancel(Event, tag="job.cancel", kw_only=True, frozen=True):
    job_id: str
    tenant: str = "default"
    reason: str = ""


RetryMode = Literal["failed", "stuck"]


class RetryChanges(msgspec.Struct, frozen=True, kw_only=True):
    """What a retry changes before the job runs again (on the bus, unknown fields are
    ignored; the gateway reads the user's body with ``RetryRequest``, which refuses them).

    ``recipe`` or ``steps`` replaces how the job is planned (one of them, or neither);
    ``params``, when given, replaces the job's params as a whole. The job is planned again
    from the result: finished steps whose spec (stage, params, uses) and upstream steps the
    change does not touch keep their outputs; the others run again.
    """

    recipe: str | None = None
    steps: dict[str, StepSpec] | None = None
    params: dict[str, Any] | None = None


class RetryRequest(RetryChanges, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``RetryChanges`` as a user writes them (``POST /v1/jobs/{id}:retry``): a misspelt
    field is an error, not a silent no-op."""


class JobRetry(Event, tag="job.retry", kw_only=True, frozen=True):
    """Run a job's unfinished work again, from its checkpoints.

    ``failed`` (``jetcut retry``, ``POST /v1/jobs/{id}:retry``, a DLQ replay): a failed or
    cancelled job goes back to running; its failed and cancelled steps get a new attempt,
    finished steps keep their outputs. ``stuck`` (the janitor's sweep): a running job whose
    record has not changed for ``stuck_after_s`` gets a new attempt for every ready or
    running task, so a lost message can never strand it; the fence discards whatever the
    old attempts still report.
    """

    job_id: str
    tenant: str = "default"
    mode: RetryMode = "failed"
    reason: str = ""
    changes: RetryChanges | None = None
    """``failed`` only: re-plan the job with these changes first (``jetcut retry --param``,
    ``POST /v1/jobs/{id}:retry`` with a body)."""


class JobCleanup(Event, tag="job.cleanup", kw_only=True, frozen=True):
    """Delete what a job left in the store (the janitor consumes it).

    The conductor publishes one when a job succeeds (intermediates only, unless
    ``keep_intermediates``); retention publishes one with ``keep_outputs=False`` when a
    finished job expires, which also deletes its record.
    """

    job_id: str
    tenant: str = "default"
    keep_outputs: bool = True


JobEventKind = Literal["status", "step", "progress", "playable"]
"""``playable``: a progressive ``hls`` job's stream can be played from now on (``at``)."""


class JobEvent(Event, tag="job.event", kw_only=True, frozen=True):
    """Lifecycle and progress of a job on ``events.<tenant>.<job_id>`` (SSE, CLI, audit)."""

    job_id: str
    tenant: str
    kind: JobEventKind
    status: str | None = None
    step: str | None = None
    step_status: str | None = None
    progress: float | None = None
    error: ErrorInfo | None = None
    at: float = msgspec.field(default_factory=time.time)
    eta_s: float | None = None
    """On ``step`` events: predicted seconds until the job finishes (the cost model), as
    the job view's ``eta_s``."""


class DeadLetter(Event, tag="dead.letter", kw_only=True, frozen=True):
    """A message that could not be processed, kept with everything needed to replay it."""

    function: str
    subject: str
    data: bytes
    headers: dict[str, str] = {}
    error: ErrorInfo
    num_delivered: int = 1
    stream_seq: int | None = None
    at: float = msgspec.field(default_factory=time.time)


BUS_EVENTS: tuple[type[Event], ...] = (
    JobSubmit,
    StageTask,
    StageComplete,
    JobCancel,
    JobRetry,
    JobCleanup,
    JobEvent,
    DeadLetter,
)

E = TypeVar("E", bound=Event)

_encoder = msgspec.json.Encoder()
_decoders: dict[type[Event], msgspec.json.Decoder[Any]] = {
    cls: msgspec.json.Decoder(cls) for cls in BUS_EVENTS
}


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


def decode(cls: type[E], data: bytes) -> E:
    """Decode ``data`` as ``cls``; raises ``msgspec.ValidationError``/``DecodeError``.

    ``cls`` may also be a message that is not ours (a NATS advisory a function consumes):
    its decoder is built on first use and kept, like ours.
    """
    decoder = _decoders.get(cls)
    if decoder is None:
        decoder = _decoders.setdefault(cls, msgspec.json.Decoder(cls))
    result: E = decoder.decode(data)
    return result


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema of every bus event, keyed by type tag, for non-Python publishers."""
    out: dict[str, dict[str, Any]] = {}
    for cls in BUS_EVENTS:
        schema = msgspec.json.schema(cls)
        out[str(cls.__struct_config__.tag)] = schema
    return out
