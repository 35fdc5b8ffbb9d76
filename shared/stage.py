"""Turns a pure stage handler into a function with checkpoints, fencing and progress.

The handler gets a ``StageTask`` and a ``StageContext`` (local input files, a private work
dir, the ffmpeg runner, a progress callback) and returns the files it made. The wrapper:

1. drops the task if its job is finished or its attempt is no longer current (the fence);
2. if the step's ``manifest.json`` exists, reports the checkpoint instead of redoing work;
3. marks the step running, downloads inputs, runs the handler with heartbeats;
4. uploads outputs to ``jobs/<job_id>/<step>/``, writes ``manifest.json`` last, and
   publishes ``jobs.stage.complete`` with a deterministic message id;
5. on a permanent failure (or exhausted retries) publishes a failed completion instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mimetypes
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Generic, TypeVar

import msgspec

from shared import announce, msgids
from shared.errors import (
    Cancelled,
    ErrorCode,
    JetcutError,
    LeaseLost,
    ObjectNotFound,
    PermanentError,
    error_info,
)
from shared.events import (
    CheckResult,
    ErrorInfo,
    JobEvent,
    StageComplete,
    StageTask,
    Taken,
    TaskInput,
)
from shared.function import Context, Function, Services
from shared.jobstate import (
    JobRecord,
    JobStatus,
    hand_back,
    holds_lease,
    input_ref_index,
    mark_running,
    note_failure,
    set_progress,
    touch,
)
from shared.jobstore import JobNotFound
from shared.media import MediaInfo, ProbeLimits, web_mp4_args
from shared.media import probe as ffprobe
from shared.media.verify import checks_apply, verify_outputs
from shared.params.base import Params
from shared.recipes import decode_params

P = TypeVar("P", bound=Params)
CANCELLED = ErrorInfo(code=str(ErrorCode.CANCELLED), message="stopped: the job was cancelled")
"""What a task reports when it stopped because its job is being cancelled."""
log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 1.0
HAND_BACK_TIMEOUT_S = 5.0
"""How long a draining worker tries to record a hand-back (its orchestrator is waiting)."""


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    """Written last under ``jobs/<job_id>/<step>/`` (a part's under ``.../p<NNNN>/``): its
    presence means the step (or part) is done."""

    job_id: str
    step: str
    stage: str
    attempt: int
    part: int | None = None
    outputs: dict[str, str]
    skipped: str | None = None
    sizes: dict[str, int] = {}
    etags: dict[str, str] = {}
    meta: dict[str, Any] = {}
    checks: list[CheckResult] = []
    """Output checks run on the outputs before this manifest was written (all passed)."""
    elapsed_s: float = 0.0
    created_at: float = msgspec.field(default_factory=time.time)


class StageResult(msgspec.Struct, kw_only=True):
    files: dict[str, Path] = {}
    """Logical output name -> file in the work dir (uploaded under its file name)."""
    meta: dict[str, Any] = {}
    skipped: str | None = None
    """Set to the reason when the step does not apply (a 1080p rendition of a 480p source):
    the step ends ``skipped`` and so do the steps that need it, unless they fan in."""


@dataclass
class StageContext(Generic[P]):
    task: StageTask
    params: P
    workdir: Path
    services: Services
    inputs: dict[str, dict[str, Path]] = field(default_factory=dict)
    """ref (``:input``, ``probe``, ...) -> logical name -> local file."""
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    """ref -> metadata an upstream step reported (e.g. probe's media info)."""
    progress: Callable[[float], Awaitable[None]] = field(default=lambda f: _noop(f))
    cancel: asyncio.Event = field(default_factory=asyncio.Event)

    async def encode_web_mp4(self, video: Any, source: Any, media: MediaInfo, name: str,
                             *, preset: str, crf: int, audio_bitrate_k: int,
                             cwd: Path | None = None,
                             tags: dict[str, Any] | None = None) -> tuple[Path, str | None]:
        """Encode a filtered picture (and the source's first audio track) to a web MP4 in
        the work dir: the last step of every stage that redraws the picture. The command
        is :func:`shared.media.web_mp4_args`; progress, the task's deadline and
        cancellation come with it.

        Returns:
            The file, and how the audio was handled (``copy``, ``aac`` or None).

        Raises:
            PermanentError: ``invalid_input`` when not one frame of the source decoded.
        """
        out_path = self.workdir / name
        args, audio = web_mp4_args(video, source, media, out_path, preset=preset, crf=crf,
                                   audio_bitrate_k=audio_bitrate_k, tags=tags,
                                   threads=self.services.settings.ffmpeg_threads)
        _, runner = self.services.media()
        result = await runner.run(args, duration_s=self.task.media_duration_s,
                                  timeout_s=self.task.timeout_s,
                                  on_progress=lambda pr: self.progress(pr.fraction or 0.0),
                                  cancel=self.cancel, cwd=str(cwd) if cwd else None)
        result.require_frames()
        return out_path, audio

    def probe(self, ref: str = "probe") -> MediaInfo:
        """The probe step's media info, typed: what ``probe`` decoded from ffprobe once.

        Raises:
            PermanentError: ``invalid_recipe`` when the step uses no probe step (or its
                meta is not a probe's).
        """
        meta = self.upstream_meta(ref)
        try:
            return msgspec.convert(meta, MediaInfo)
        except msgspec.ValidationError as exc:
            raise PermanentError(ErrorCode.INVALID_RECIPE,
                                 f"step {self.task.step!r}: {ref!r} is not a probe step's "
                                 f"media info: {exc}") from None

    async def probe_input(self, path: Path) -> MediaInfo:
        """The probe step's media info when this step uses one, else probe ``path`` here
        (with the operator's ``JETCUT_INPUT_MAX_*`` limits)."""
        for item in self.task.inputs:
            meta = self.meta.get(item.ref) or {}
            if item.stage == "probe" or isinstance(meta.get("streams"), list):
                return self.probe(item.ref)
        binaries, _ = self.services.media()
        return await ffprobe(binaries, str(path),
                             limits=ProbeLimits.from_settings(self.services.settings))

    def input_file(self, ref: str = ":input", name: str = "media") -> Path:
        try:
            return self.inputs[ref][name]
        except KeyError:
            raise PermanentError(
                ErrorCode.INVALID_RECIPE, f"step {self.task.step!r} needs {ref}/{name} as input"
            ) from None

    def second_input(self, what: str) -> str:
        """The job input besides the main one (``:input``) that this step uses, such as a
        watermark image or a subtitle file: ``:input/1`` unless ``uses`` names another."""
        for item in self.task.inputs:
            if input_ref_index(item.ref) not in (None, 0):
                return item.ref
        raise PermanentError(ErrorCode.INVALID_RECIPE,
                             f"step {self.task.step!r} needs the {what} as a second job input: "
                             "add ':input/1' to its 'uses'")

    def upstream_meta(self, ref: str) -> dict[str, Any]:
        """Metadata of a used step, by step name or, failing that, by stage: so
        ``upstream_meta("probe")`` finds the probe step whatever the pipeline named it."""
        if ref in self.meta:
            return self.meta[ref]
        for item in self.task.inputs:
            if item.stage == ref:
                return self.meta[item.ref]
        raise PermanentError(
            ErrorCode.INVALID_RECIPE,
            f"step {self.task.step!r} needs a {ref!r} step in its 'uses'",
        )


async def _noop(_: float) -> None:
    return None


StageHandler = Callable[[StageTask, StageContext[P]], Awaitable[StageResult]]


MEDIA_TYPES = {".ts": "video/mp2t", ".m3u8": "application/vnd.apple.mpegurl",
               ".m4s": "video/iso.segment", ".vtt": "text/vtt"}
"""Where the system's mimetypes table is wrong for media (``.ts`` is a Qt translation)."""


def content_type_of(name: str) -> str | None:
    suffix = name[name.rfind("."):].lower() if "." in name else ""
    return MEDIA_TYPES.get(suffix) or mimetypes.guess_type(name)[0]


def step_prefix(job_id: str, step: str, part: int | None = None) -> str:
    """Where a step's (or one part's) outputs live: ``jobs/<job>/<step>/[p<NNNN>/]``."""
    base = f"jobs/{job_id}/{step}/"
    return base if part is None else f"{base}p{part:04d}/"


def manifest_key(job_id: str, step: str, part: int | None = None) -> str:
    return step_prefix(job_id, step, part) + "manifest.json"


_manifest_decoder = msgspec.json.Decoder(Manifest)


def stage(name: str, handler: StageHandler[P], *, doc: str = "",
          concurrency: int | None = None, files: bool = True) -> Function:
    """Build the function that serves ``stages.<name>`` with ``handler``.

    Args:
        files: False for a stage that reads no input file and writes no output (``noop``):
            its tasks get no work dir and no downloads, and write no manifest, since there
            is nothing to checkpoint or to upload (re-running one is as cheap as reading a
            checkpoint). The fence still holds: the conductor applies a result only from the
            delivery that holds the lease (``jobstate.complete``).
    """
    fn = Function(name=name, doc=doc)

    async def on_task(task: StageTask, ctx: Context) -> None:
        await run_task(name, handler, task, ctx, files=files)

    async def on_failure(task: StageTask, error: ErrorInfo, ctx: Context) -> None:
        await report(ctx.services, task, error=error, delivery=ctx.delivery.number)

    fn.subscribe("stages", lambda n: n.stage(name), StageTask, durable=f"stage-{name}",
                 concurrency=concurrency, on_failure=on_failure)(on_task)
    return fn


async def report(
    services: Services, task: StageTask, *, outputs: dict[str, str] | None = None,
    meta: dict[str, Any] | None = None, error: ErrorInfo | None = None, elapsed_s: float = 0.0,
    from_checkpoint: bool = False, skipped: str | None = None, delivery: int = 0,
    checks: list[CheckResult] | None = None, taken: Taken | None = None,
) -> None:
    """Publish the task's result. The message id carries the delivery, so a superseded
    delivery's (refused) result can never shadow the current one's through deduplication."""
    done = StageComplete(
        job_id=task.job_id, tenant=task.tenant, step=task.step, attempt=task.attempt,
        part=task.part, outputs=outputs or {}, meta=meta or {}, error=error,
        skipped=skipped, elapsed_s=elapsed_s, from_checkpoint=from_checkpoint,
        delivery=delivery, checks=checks or [], taken=taken,
    )
    await services.bus.publish(services.names.stage_complete, done,
                               msg_id=msgids.completion(task.task_id, delivery))


async def run_task(name: str, handler: StageHandler[P], task: StageTask, ctx: Context, *,
                   files: bool = True) -> None:
    services = ctx.services
    log_ = ctx.log
    delivery = ctx.delivery.number
    try:
        record, revision = await services.jobs.get_with_revision(task.job_id)
    except JobNotFound:
        log_.warning("task for unknown job %s dropped", task.job_id)
        return
    if not holds_lease(record, task.step, task.attempt, task.part, delivery):
        log_.info("stale task %s dropped (job %s)", task.task_id, record.status)
        return
    if record.status == JobStatus.CANCELLING:
        # Redelivered while its job is being cancelled (the worker that held it died):
        # the job waits for this task's stop, so report it rather than drop it.
        await report(services, task, error=CANCELLED, delivery=delivery)
        return

    checkpoint = await _read_manifest(services, task) if files else None
    if checkpoint is not None:
        log_.info("%s done before (checkpoint); not re-running", task.task_id)
        await report(services, task, outputs=checkpoint.outputs, meta=checkpoint.meta,
                     elapsed_s=checkpoint.elapsed_s, from_checkpoint=True,
                     skipped=checkpoint.skipped, delivery=delivery,
                     checks=checkpoint.checks)
        return

    was = record.status
    at = time.time()
    record, took, written = await services.jobs.apply_written(
        task.job_id, partial(mark_running, step=task.step, attempt=task.attempt,
                             part=task.part, delivery=delivery, now=at),
        current=(record, revision))
    if not took or written is None:
        log_.info("task %s became stale; dropped", task.task_id)
        return
    if was == JobStatus.QUEUED and record.status == JobStatus.RUNNING:
        await announce.status(services.bus, record)  # the first task to start
    await services.bus.emit(JobEvent(job_id=task.job_id, tenant=task.tenant, kind="step",
                                     step=task.step, step_status="running"))
    try:
        params = decode_params(name, task.params)
    except ValueError as exc:
        raise PermanentError(ErrorCode.INVALID_RECIPE, f"step {task.step!r}: {exc}") from exc

    with services.cancels.watch(task.job_id) as cancelled:
        lease = Lease(services, task, delivery, cancelled,
                      taken=Taken(base=written.base, revision=written.revision, at=at))
        try:
            async with lease.kept():
                if files:
                    await _execute(name, handler, task, services, params, cancelled, lease)
                else:
                    await _execute_fileless(name, handler, task, services, params, cancelled,
                                            lease)
        except LeaseLost as exc:
            # Another delivery of this task took over: it reports; nothing was uploaded.
            log_.info("%s stopped (%s): %s", task.task_id, exc.code, exc.message)
        except Cancelled as exc:
            # The job is being cancelled: nothing was uploaded; report the stop, so the
            # conductor can settle the job as cancelled once its last running task stopped.
            log_.info("%s stopped (%s): %s", task.task_id, exc.code, exc.message)
            await report(services, task, error=CANCELLED, delivery=delivery)
        except asyncio.CancelledError:
            # The process is draining and its grace ran out before this task finished:
            # the consumer loop naks it for another worker now; say how far it got.
            await asyncio.shield(_hand_back(services, task, delivery))
            raise
        except Exception as exc:
            if not getattr(exc, "non_retryable", False):
                await _note_failure(services, task, delivery, exc)
            raise


async def _note_failure(services: Services, task: StageTask, delivery: int,
                        exc: Exception) -> None:
    """Show a transient failure on the job while it is retried (best effort)."""
    try:
        await services.jobs.apply(task.job_id, partial(
            note_failure, step=task.step, attempt=task.attempt, part=task.part,
            delivery=delivery, error=error_info(exc)))
    except Exception as update_exc:
        log.debug("could not record the failure on the job: %r", update_exc)


async def _hand_back(services: Services, task: StageTask, delivery: int) -> None:
    """Record the hand-back on the job (best effort, bounded: the process is stopping)."""
    try:
        await asyncio.wait_for(services.jobs.apply(task.job_id, partial(
            hand_back, step=task.step, attempt=task.attempt, part=task.part,
            delivery=delivery)), HAND_BACK_TIMEOUT_S)
    except Exception as exc:
        log.info("could not record the hand-back of %s: %r", task.task_id, exc)


class Lease:
    """This delivery's hold on its task, kept visible while the step runs.

    Every ``interval`` it touches the job record (so the janitor never mistakes a long step
    for a stuck job) and checks that no later delivery took the task over; if one did, it
    stops the step at once. :meth:`confirm` checks again right before anything is uploaded.
    """

    def __init__(self, services: Services, task: StageTask, delivery: int,
                 cancelled: asyncio.Event, taken: Taken | None = None) -> None:
        self.services = services
        self.task = task
        self.delivery = delivery
        self.taken = taken
        """Where this delivery's lease write put the record (passed on in its result)."""
        self.cancelled = cancelled
        self.lost: str | None = None
        """Why this delivery lost the task (None: it holds it, or the job was cancelled)."""
        self.interval = max(1.0, services.settings.stuck_after_s / 4)

    def _still_mine(self, record: JobRecord) -> bool:
        t = self.task
        return holds_lease(record, t.step, t.attempt, t.part, self.delivery)

    async def confirm(self) -> None:
        """Raise ``LeaseLost`` (or ``Cancelled``) unless this delivery still holds the task."""
        record = await self.services.jobs.get(self.task.job_id)
        if not self._still_mine(record):
            self._lose(record)
        if self.cancelled.is_set():
            raise self.error()

    def error(self) -> Cancelled:
        if self.lost is not None:
            return LeaseLost(f"delivery {self.delivery} of {self.task.task_id} is no longer "
                             f"current ({self.lost}); its result is discarded")
        return Cancelled("the job was cancelled")

    def _lose(self, record: JobRecord) -> None:
        if record.status not in (JobStatus.CANCELLED, JobStatus.CANCELLING):
            unit = record.steps[self.task.step]
            held_by = (unit.parts[self.task.part].lease if self.task.part is not None
                       and self.task.part < len(unit.parts) else unit.lease)
            self.lost = (f"job {record.status}, step {unit.status}, "
                         f"taken over by delivery {held_by}")
        self.cancelled.set()

    @contextlib.asynccontextmanager
    async def kept(self) -> AsyncIterator[None]:
        keeper = asyncio.create_task(self._keep())
        try:
            yield
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper

    async def _keep(self) -> None:
        t = self.task
        alive = partial(touch, step=t.step, attempt=t.attempt, part=t.part,
                        delivery=self.delivery)
        while True:
            await asyncio.sleep(self.interval)
            try:
                record, touched = await self.services.jobs.apply(t.job_id, alive)
            except Exception as exc:  # the store of record is down: keep working
                log.debug("lease touch failed: %r", exc)
                continue
            if not touched and not self._still_mine(record):
                self._lose(record)
                return
            if record.status == JobStatus.CANCELLING:
                # The cancel message did not reach this worker (a plain NATS message):
                # the record says so too.
                self.cancelled.set()
                return


async def _execute(name: str, handler: StageHandler[P], task: StageTask, services: Services,
                   params: Params, cancelled: asyncio.Event, lease: Lease) -> None:
    binaries, runner = services.media()
    started = time.monotonic()
    async with runner.workdir(services.settings.work_dir) as workdir:
        sctx: StageContext[Any] = StageContext(
            task=task, params=params, workdir=workdir, services=services,
            progress=_progress_reporter(services, task), cancel=cancelled,
        )
        await _download_inputs(services, task.inputs, workdir, sctx)
        try:
            result = await handler(task, sctx)
            # Part of the contract: an output is checked before the step may finish (but
            # not by a delivery whose result will be discarded anyway).
            checks: list[CheckResult] = []
            if checks_apply(name, services.settings):
                await lease.confirm()
                checks = await verify_outputs(
                    binaries, services.settings, name, result.files, sctx.inputs, sctx.meta)
        except Cancelled:
            raise lease.error() from None
        except JetcutError as exc:
            _redact(exc, f"{workdir}/")
            raise
        await lease.confirm()
        outputs, sizes, etags = {}, {}, {}
        prefix = step_prefix(task.job_id, task.step, task.part)
        for logical, path in result.files.items():
            key = prefix + path.name
            content_type = content_type_of(path.name)
            info = await services.store.put_file(key, path, content_type=content_type)
            outputs[logical], sizes[logical], etags[logical] = key, info.size, info.etag
    elapsed = time.monotonic() - started
    manifest = Manifest(job_id=task.job_id, step=task.step, stage=name, attempt=task.attempt,
                        part=task.part, outputs=outputs, sizes=sizes, etags=etags,
                        meta=result.meta, skipped=result.skipped, elapsed_s=round(elapsed, 3),
                        checks=checks)
    await services.store.put_bytes(manifest_key(task.job_id, task.step, task.part),
                                   msgspec.json.encode(manifest), "application/json")
    services.telemetry.step_seconds.labels(name).observe(elapsed)
    await report(services, task, outputs=outputs, meta=result.meta, skipped=result.skipped,
                 elapsed_s=round(elapsed, 3), delivery=lease.delivery, checks=checks,
                 taken=lease.taken)


async def _execute_fileless(name: str, handler: StageHandler[P], task: StageTask,
                            services: Services, params: Params, cancelled: asyncio.Event,
                            lease: Lease) -> None:
    """Run a stage declared ``files=False``: no work dir, no downloads, no manifest, and no
    lease read before reporting, since nothing is uploaded that a stale delivery could
    overwrite; the conductor refuses a stale delivery's result by its lease."""
    started = time.monotonic()
    # The work root stands in for the private dir this stage does not get (never written).
    root = Path(services.settings.work_dir or tempfile.gettempdir())
    sctx: StageContext[Any] = StageContext(
        task=task, params=params, workdir=root, services=services,
        progress=_progress_reporter(services, task), cancel=cancelled,
    )
    for item in task.inputs:
        sctx.meta[item.ref] = item.meta
    try:
        result = await handler(task, sctx)
    except Cancelled:
        raise lease.error() from None
    if result.files:
        raise PermanentError(ErrorCode.INTERNAL, f"stage {name!r} is declared without files "
                             f"but returned {sorted(result.files)}")
    if cancelled.is_set():
        raise lease.error()
    elapsed = round(time.monotonic() - started, 3)
    services.telemetry.step_seconds.labels(name).observe(elapsed)
    await report(services, task, meta=result.meta, skipped=result.skipped, elapsed_s=elapsed,
                 delivery=lease.delivery, taken=lease.taken)


def _redact(exc: JetcutError, prefix: str) -> None:
    """Errors reach users: show ``in/0/media.mp4``, not a worker's private temp path."""
    exc.message = exc.message.replace(prefix, "")
    exc.details = {k: v.replace(prefix, "") if isinstance(v, str) else v
                   for k, v in exc.details.items()}


async def _read_manifest(services: Services, task: StageTask) -> Manifest | None:
    try:
        data = await services.store.get_bytes(manifest_key(task.job_id, task.step, task.part))
    except ObjectNotFound:
        return None
    return _manifest_decoder.decode(data)


async def _download_inputs(
    services: Services, inputs: list[TaskInput], workdir: Path, sctx: StageContext[Any]
) -> None:
    for index, item in enumerate(inputs):
        sctx.meta[item.ref] = item.meta
        local: dict[str, Path] = {}
        target_dir = workdir / "in" / str(index)
        target_dir.mkdir(parents=True, exist_ok=True)
        for logical, key in item.files.items():
            path = target_dir / f"{logical}{Path(key).suffix.lower()[:8]}"
            try:
                await services.store.get_file(key, path)
            except ObjectNotFound as exc:
                raise PermanentError(ErrorCode.INPUT_NOT_FOUND,
                                     f"input {item.ref}/{logical} is missing: {key}") from exc
            local[logical] = path
        sctx.inputs[item.ref] = local


def _progress_reporter(services: Services, task: StageTask) -> Callable[[float], Awaitable[None]]:
    last = 0.0

    async def progress(fraction: float) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last < PROGRESS_EVERY_S and fraction < 1.0:
            return
        last = now

        try:
            record, _ = await services.jobs.apply(task.job_id, partial(
                set_progress, step=task.step, attempt=task.attempt, fraction=fraction,
                part=task.part))
            await services.bus.emit(JobEvent(job_id=task.job_id, tenant=task.tenant,
                                             kind="progress", step=task.step,
                                             progress=record.progress))
        except Exception as exc:  # progress is best effort; the work goes on
            log.debug("progress update failed: %r", exc)

    return progress
