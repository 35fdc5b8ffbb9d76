"""Run ffmpeg as an async subprocess, and never lose track of it.

What every stage gets from :class:`FFmpegRunner` without thinking about it:

* progress parsed from ``-progress pipe:1`` (machine-readable ``key=value`` blocks on stdout,
  unlike the human ``-stats`` line on stderr), throttled before it reaches the callback;
* ``-protocol_whitelist file,pipe`` in front of every input, so a crafted input name or a
  playlist inside an input cannot make ffmpeg open a URL, and ``-format_whitelist`` (the
  demuxer allowlist of :mod:`shared.media.allowlist`) in front of every input whose demuxer
  the caller did not force with ``-f``: a playlist, file list or SDP file is refused with
  ``unsupported_format`` even when no probe step looked at that file first;
* a hard deadline, cancellation by event or by task cancellation, each ending in SIGTERM to
  the child's process group, then SIGKILL after a grace period, then ``wait()`` so no zombie
  or orphan outlives the call;
* ``nice``, an optional address-space cap and no core dumps on the child, which is killed by
  the kernel if the worker dies outright (:mod:`shared.children`);
* a failure classified into a stable code and a retry decision (:func:`classify_failure`).

Callers build arguments with ffmpeg-python (``ffmpeg.input(...).output(...).get_args()``) and
pass them without the binary. Outputs must be files (or the ``null`` muxer): stdout is the
progress channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import resource
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from shared.children import die_with_parent_hook
from shared.errors import Cancelled, ErrorCode, FFmpegError, PermanentError
from shared.media.allowlist import FORMAT_WHITELIST, refused_format
from shared.media.binaries import Binaries, child_env, find_binaries

if TYPE_CHECKING:
    from shared.settings import Settings

__all__ = [
    "PROTOCOL_WHITELIST",
    "FFmpegRunner",
    "Progress",
    "ProgressCallback",
    "RunResult",
    "classify_failure",
    "step_timeout",
]

PROTOCOL_WHITELIST = "file,pipe"
"""Protocols an input may use unless the caller sets its own ``-protocol_whitelist``."""

STDERR_RING_BYTES = 64 * 1024
"""How much of stderr is kept while ffmpeg runs (the end is what explains a failure)."""

ERROR_TAIL_BYTES = 8 * 1024
"""How much of that ring travels on an :class:`FFmpegError`: errors end up in job records
(NATS KV values), which should stay small; classification still sees the whole ring."""

PROGRESS_INTERVAL_S = 0.25
"""At most ~4 progress callbacks a second; the final ``progress=end`` is always delivered."""


class Progress(msgspec.Struct, frozen=True):
    """One progress report from a running ffmpeg.

    Attributes:
        out_time_s: media time written so far, in seconds.
        fraction: ``out_time_s / duration_s`` clamped to 0..1 and never decreasing, or
            ``None`` when the caller did not say how long the output will be. ``1.0`` once
            ffmpeg reports the end.
        speed: media seconds per wall second (``2.0`` = twice real time), when known.
        frame: video frames written so far, when there is video.
    """

    out_time_s: float
    fraction: float | None
    speed: float | None
    frame: int | None


class RunResult(msgspec.Struct, frozen=True):
    """How a successful run ended."""

    returncode: int
    elapsed_s: float
    stderr_tail: str
    frames: int | None = None
    """Video frames written, from ffmpeg's last progress report (0 for an output without
    video; None when ffmpeg reported no progress)."""

    def require_frames(self, what: str = "the input") -> None:
        """Refuse a run that wrote no video frame: its input had none to decode.

        ffmpeg exits 0 when every packet of a picture fails to decode inside a filter graph
        with a second input (an overlay's logo, a montage's silence), leaving an output
        without a single frame. That is the input's fault, known now: ``invalid_input``
        with the decoder's own complaint, not an output check failing later.

        Raises:
            PermanentError: ``invalid_input`` when no frame was written.
        """
        if self.frames != 0:
            return
        complaint = next((line.strip() for line in reversed(self.stderr_tail.splitlines())
                          if "rror while decoding" in line or "Invalid data" in line), "")
        raise PermanentError(ErrorCode.INVALID_INPUT,
                             f"no video frame could be decoded from {what}"
                             + (f" ({_clip(complaint)[:200]})" if complaint else ""))

    def undecoded_video_inputs(self) -> list[int]:
        """The inputs (``-i`` order, from 0) with a video stream that had packets but gave
        not one frame: a picture that never decodes, which ffmpeg papers over when other
        inputs feed the same graph. Read from ffmpeg's closing per-stream statistics,
        which it prints only at ``-loglevel verbose`` (``[]`` otherwise)."""
        return sorted({int(m.group(1)) for m in _UNDECODED.finditer(self.stderr_tail)})


ProgressCallback = Callable[[Progress], Awaitable[None]]


def step_timeout(settings: Settings, media_duration_s: float | None, cost: float = 1.0) -> float:
    """Deadline for one ffmpeg step, derived from how much media it has to chew through.

    ``timeout_per_media_s * cost`` seconds per second of input, clamped to
    ``[timeout_min_s, timeout_max_s]``; an unknown duration gets the maximum.
    """
    if media_duration_s is None or media_duration_s <= 0:
        return settings.timeout_max_s if media_duration_s is None else settings.timeout_min_s
    budget = media_duration_s * settings.timeout_per_media_s * cost
    return min(settings.timeout_max_s, max(settings.timeout_min_s, budget))


class FFmpegRunner:
    """Runs ffmpeg commands with progress, deadlines, cancellation and resource limits.

    One runner is shared by every task of a process; it holds no per-run state except the
    set of live child pids (:attr:`pids`).

    Args:
        binaries: where ffmpeg lives.
        threads: the ``-threads`` value callers should pass to encoders (0: ffmpeg decides).
            The runner does not inject it: where it goes (per output, per filter graph) is
            the caller's decision.
        nice: added to the child's niceness so renders yield the CPU to the event loops
            and heartbeats of the processes around them.
        address_space_bytes: ``RLIMIT_AS`` for the child; a decoder fed a hostile file then
            fails with ENOMEM instead of taking the machine down.
        file_size_bytes: ``RLIMIT_FSIZE`` for the child: the largest file it may write, so a
            runaway output fails its step (``disk_full``) before it fills the disk.
        kill_grace_s: how long SIGTERM gets to end the child before SIGKILL.
        work_dir: default parent of :meth:`workdir` directories (``None``: system temp).
    """

    def __init__(
        self,
        binaries: Binaries,
        *,
        threads: int = 0,
        nice: int = 10,
        address_space_bytes: int | None = None,
        file_size_bytes: int | None = None,
        kill_grace_s: float = 5.0,
        work_dir: str | None = None,
    ) -> None:
        self._binaries = binaries
        self._threads = threads
        self._nice = nice
        self._address_space = _cap_to_hard_limit(address_space_bytes)
        self._file_size = _cap_to_hard_limit(file_size_bytes, resource.RLIMIT_FSIZE)
        self._kill_grace_s = kill_grace_s
        self._work_dir = work_dir
        self._pids: set[int] = set()

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        binaries: Binaries | None = None,
        *,
        kill_grace_s: float = 5.0,
    ) -> FFmpegRunner:
        """A runner configured from ``JETCUT_FFMPEG*`` / ``JETCUT_WORK_DIR`` settings.

        Raises:
            BinaryNotFoundError: when ``binaries`` is not given and none can be found.
        """
        mb = 1024 * 1024
        return cls(
            binaries or find_binaries(settings),
            threads=settings.ffmpeg_threads,
            nice=settings.ffmpeg_nice,
            address_space_bytes=(settings.ffmpeg_max_memory_mb * mb
                                 if settings.ffmpeg_max_memory_mb else None),
            file_size_bytes=(settings.ffmpeg_max_file_mb * mb
                             if settings.ffmpeg_max_file_mb else None),
            kill_grace_s=kill_grace_s,
            work_dir=settings.work_dir,
        )

    @property
    def binaries(self) -> Binaries:
        return self._binaries

    @property
    def threads(self) -> int:
        """The ``-threads`` value callers should use for encoders."""
        return self._threads

    @property
    def pids(self) -> frozenset[int]:
        """Pids of the ffmpeg children running right now (for metrics, shutdown, tests)."""
        return frozenset(self._pids)

    def command(self, args: Sequence[str]) -> list[str]:
        """The full argv :meth:`run` executes for ``args`` (useful for logs and tests)."""
        return [
            self._binaries.ffmpeg,
            "-hide_banner",
            "-nostdin",
            "-y",
            "-progress",
            "pipe:1",
            "-nostats",
            *_whitelist_inputs(args),
        ]

    async def run(
        self,
        args: list[str],
        *,
        duration_s: float | None = None,
        timeout_s: float,
        on_progress: ProgressCallback | None = None,
        cancel: asyncio.Event | None = None,
        cwd: str | None = None,
    ) -> RunResult:
        """Run ffmpeg with ``args`` and wait for it, however it ends.

        Args:
            args: ffmpeg arguments without the binary (``ffmpeg-python``'s ``get_args()``).
            duration_s: expected output duration, to turn media time into a fraction.
            timeout_s: wall-clock deadline for the whole run.
            on_progress: awaited with each (throttled) :class:`Progress`. It runs inline
                with the stdout reader: while it is slow, progress lines queue in the pipe
                (ffmpeg writes ~2 small blocks a second, so the 64 KiB pipe buffer covers
                minutes of stall before ffmpeg would block). If it raises, the child is
                stopped and the exception propagates.
            cancel: when set, the child is stopped and :class:`~shared.errors.Cancelled`
                raised.
            cwd: working directory of the child (usually a :meth:`workdir`).

        Returns:
            Exit status, wall time and the end of stderr.

        Raises:
            FFmpegError: ``timeout`` (retryable) when the deadline passed; otherwise the
                classification of :func:`classify_failure`.
            Cancelled: ``cancel`` was set.
            asyncio.CancelledError: the awaiting task was cancelled; the child is stopped
                before it propagates.
        """
        argv = self.command(args)
        loop = asyncio.get_running_loop()
        die_with_parent = die_with_parent_hook()
        started = loop.time()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=cwd,
                # Own session and process group: our signals reach ffmpeg and anything it
                # spawns, and a Ctrl-C meant for the worker does not hit it mid-write.
                start_new_session=True,
                preexec_fn=partial(self._preexec, die_with_parent),
                env=child_env(self._binaries),
            )
        except OSError as exc:
            # A missing binary or work dir is about this worker, not the input: retry.
            raise FFmpegError(
                ErrorCode.FFMPEG_FAILED, f"could not start ffmpeg: {exc}", non_retryable=False
            ) from exc

        self._pids.add(proc.pid)
        tail = _Ring(STDERR_RING_BYTES)
        reporter = _Reporter(on_progress, duration_s, loop)
        assert proc.stdout is not None and proc.stderr is not None
        progress_task = asyncio.create_task(_read_progress(proc.stdout, reporter))
        stderr_task = asyncio.create_task(_drain(proc.stderr, tail))
        exit_task = asyncio.create_task(proc.wait())
        cancel_task = asyncio.create_task(cancel.wait()) if cancel is not None else None
        stop_reason: str | None = None
        try:
            pending: set[asyncio.Task[Any]] = {exit_task, progress_task}
            if cancel_task is not None:
                pending.add(cancel_task)
            while True:
                remaining = started + timeout_s - loop.time()
                if remaining <= 0:
                    # Exited right at the deadline: judge it by its exit status instead.
                    stop_reason = None if exit_task.done() else "timeout"
                    break
                done, pending = await asyncio.wait(
                    pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                if cancel_task is not None and cancel_task in done:
                    stop_reason = "cancel"
                    break
                if progress_task in done and progress_task.exception() is not None:
                    stop_reason = "callback"
                    break
                if exit_task.done() and progress_task.done():
                    break
                if not done:
                    stop_reason = None if exit_task.done() else "timeout"
                    break
        except BaseException:
            # Our own task was cancelled (or something unexpected happened): the child must
            # not outlive us. Shielded so that a second cancel cannot skip the wait().
            reporter.closed = True
            await asyncio.shield(self._stop(proc))
            raise
        finally:
            if cancel_task is not None:
                cancel_task.cancel()
            if stop_reason is not None:
                reporter.closed = True
                await asyncio.shield(self._stop(proc))
            try:
                await _settle(progress_task, stderr_task, exit_task, grace_s=self._kill_grace_s)
            finally:
                self._pids.discard(proc.pid)

        elapsed = loop.time() - started
        stderr_text = tail.text()
        if stop_reason == "callback":
            progress_task.result()  # re-raises the callback's exception
        if stop_reason == "timeout":
            raise FFmpegError(
                ErrorCode.TIMEOUT,
                f"ffmpeg ran longer than its {timeout_s:g}s deadline and was stopped",
                non_retryable=False,
                returncode=proc.returncode,
                stderr_tail=_clip(stderr_text),
            )
        if stop_reason == "cancel":
            raise Cancelled(f"ffmpeg stopped after {elapsed:.1f}s: the job was cancelled")
        returncode = proc.returncode
        assert returncode is not None
        if returncode != 0:
            raise classify_failure(returncode, stderr_text, _input_urls(argv))
        return RunResult(returncode=returncode, elapsed_s=elapsed, stderr_tail=stderr_text,
                         frames=reporter.frames)

    def workdir(self, parent: str | None = None) -> contextlib.AbstractAsyncContextManager[Path]:
        """A private (0700) temp directory, removed on exit, error and cancellation alike.

        Args:
            parent: where to create it (default: ``work_dir``, then the system temp dir).
        """
        return self._workdir(parent or self._work_dir)

    @contextlib.asynccontextmanager
    async def _workdir(self, parent: str | None) -> AsyncIterator[Path]:
        if parent is not None:
            os.makedirs(parent, exist_ok=True)
        # The owner's pid is in the name so the janitor can tell an orphan (its process
        # died before the cleanup below ran) from a step still running on this host.
        path = Path(tempfile.mkdtemp(prefix=f"jetcut-{os.getpid()}-", dir=parent))
        try:
            yield path
        finally:
            # A step's scratch can be gigabytes of segments: remove it off the event loop.
            # The thread finishes even if this await is cancelled again.
            await asyncio.shield(asyncio.to_thread(shutil.rmtree, path, ignore_errors=True))

    def _preexec(self, die_with_parent: Callable[[], None]) -> None:
        # Runs in the forked child before exec: only plain syscalls, no locks, no logging.
        # First, so that ffmpeg never outlives a worker that is killed outright.
        die_with_parent()
        if self._nice:
            os.nice(self._nice)
        # A crash on a hostile file should not leave a core dump of a 100 MB binary.
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if self._address_space is not None:
            resource.setrlimit(resource.RLIMIT_AS, (self._address_space, self._address_space))
        if self._file_size is not None:
            # Past the limit a write fails with EFBIG ("File too large"), which ffmpeg
            # reports, instead of SIGXFSZ killing it without a word.
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (self._file_size, self._file_size))

    async def _stop(self, proc: asyncio.subprocess.Process) -> None:
        """SIGTERM the child's group, SIGKILL it after the grace period, then reap it."""
        if proc.returncode is not None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self._kill_grace_s)
        except TimeoutError:
            _signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()


def classify_failure(returncode: int, stderr_tail: str, inputs: Iterable[str] = ()) -> FFmpegError:
    """Turn a non-zero exit into a code and a retry decision.

    * Killed by a signal (OOM killer, an operator), disk full, out of memory: the run was
      unlucky, not wrong -> ``ffmpeg_failed``, retryable.
    * Crashed (SIGSEGV, SIGABRT, ...): a decoder that crashes on a file always will ->
      ``invalid_input``, not retryable.
    * The input could not be opened or parsed -> ``invalid_input``, not retryable.
    * Anything else is a deterministic failure of our own command -> ``ffmpeg_failed``,
      not retryable: the same command on the same input fails the same way.

    Args:
        returncode: the child's exit status (negative: killed by that signal).
        stderr_tail: the end of its stderr.
        inputs: the ``-i`` values, to recognise "<input>: Invalid argument".
    """
    reason = _last_line(stderr_tail)
    tail = _clip(stderr_tail)

    def error(code: ErrorCode, message: str, non_retryable: bool) -> FFmpegError:
        return FFmpegError(
            code, message, non_retryable=non_retryable, returncode=returncode, stderr_tail=tail
        )

    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        if -returncode in CRASH_SIGNALS:
            # A decoder that crashes on a file crashes on it every time: never retry.
            return error(ErrorCode.INVALID_INPUT, f"ffmpeg crashed ({name}) on this input", True)
        return error(ErrorCode.FFMPEG_FAILED, f"ffmpeg was killed by {name}", False)
    for marker in _DISK_FULL_MARKERS:
        if marker in stderr_tail:
            # The machine ran out of room, not the input: another worker (or this one, once
            # the janitor has swept) can succeed. Nothing partial is ever uploaded.
            return error(ErrorCode.DISK_FULL, f"ffmpeg could not write its output: {marker}",
                         False)
    for marker in _TRANSIENT_MARKERS:
        if marker in stderr_tail:
            return error(ErrorCode.FFMPEG_FAILED, f"ffmpeg failed: {marker}", False)
    refused = refused_format(stderr_tail)
    if refused is not None:
        return error(ErrorCode.UNSUPPORTED_FORMAT,
                     f"refusing input format {refused!r}: jetcut reads media containers only, "
                     "never playlists or lists that name other files", True)
    for marker in _INVALID_INPUT_MARKERS:
        if marker in stderr_tail:
            return error(ErrorCode.INVALID_INPUT, f"input rejected by ffmpeg: {reason}", True)
    for url in inputs:
        if f"{url}: Invalid argument" in stderr_tail:
            return error(ErrorCode.INVALID_INPUT, f"input rejected by ffmpeg: {reason}", True)
    return error(ErrorCode.FFMPEG_FAILED, f"ffmpeg exited with status {returncode}: {reason}", True)


CRASH_SIGNALS = frozenset(
    int(s) for s in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGFPE, signal.SIGILL)
)
"""Signals a process raises on itself when it crashes, as opposed to being killed."""

_DISK_FULL_MARKERS = (
    "No space left on device",
    "File too large",  # RLIMIT_FSIZE (JETCUT_FFMPEG_MAX_FILE_MB) or the filesystem's own limit
    "Disk quota exceeded",
)
_TRANSIENT_MARKERS = (
    "Cannot allocate memory",
    # ffmpeg caught SIGTERM/SIGINT from someone other than this runner and exited 255.
    "Exiting normally, received signal",
)
_INVALID_INPUT_MARKERS = (
    "Invalid data found when processing input",
    "moov atom not found",
    "does not contain any stream",
    "matches no streams",
    "Protocol not found",
    "not on whitelist",
)
_GENERIC_LAST_LINES = frozenset({"Conversion failed!"})
_STATISTICS = re.compile(r"\[AVIOContext @ [^\]]*\] Statistics:|(Input|Output) (file|stream) #"
                        r"|Total: \d+ packets")
_UNDECODED = re.compile(r"Input stream #(\d+):\d+ \(video\): [1-9]\d* packets read "
                        r"\(\d+ bytes\); 0 frames decoded")


def _whitelist_inputs(args: Sequence[str]) -> list[str]:
    """Put ``-protocol_whitelist`` among the options of every input that lacks one, and
    ``-format_whitelist`` among those of every input that neither has one nor forces its
    demuxer with ``-f`` (a caller forcing ``lavfi``, ``concat`` or ``image2`` on its own
    files knows what it reads).

    Input options apply to the next ``-i`` only, so one whitelist at the front would
    protect the first input alone.
    """
    out: list[str] = []
    has_whitelist = False
    has_format = False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-protocol_whitelist":
            has_whitelist = True
        elif arg in ("-f", "-format_whitelist"):
            has_format = True
        elif arg == "-i":
            if not has_whitelist:
                out += ["-protocol_whitelist", PROTOCOL_WHITELIST]
            if not has_format:
                out += ["-format_whitelist", FORMAT_WHITELIST]
            out += args[i : i + 2]
            has_whitelist = has_format = False
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def _input_urls(argv: Sequence[str]) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "-i"]


def _cap_to_hard_limit(limit: int | None, which: int = resource.RLIMIT_AS) -> int | None:
    # setrlimit cannot raise the soft limit above the hard one; ask for what is allowed.
    if limit is None:
        return None
    hard = resource.getrlimit(which)[1]
    return limit if hard == resource.RLIM_INFINITY else min(limit, hard)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    # Only called while the child is unreaped, so its pid (= its group id) is still ours.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def _settle(*tasks: asyncio.Task[Any], grace_s: float) -> None:
    """Let the pipe readers reach EOF (they do once the child is gone), then cancel
    whatever is left, e.g. a progress callback stuck after a stop."""
    _done, pending = await asyncio.wait(tasks, timeout=grace_s)
    for task in pending:
        task.cancel()
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved here; re-raised by the caller where it matters
    if pending:
        await asyncio.wait(pending)


class _Ring:
    """The last ``limit`` bytes written to it."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buf = bytearray()
        self._truncated = False

    def feed(self, data: bytes) -> None:
        self._buf += data
        excess = len(self._buf) - self._limit
        if excess > 0:
            del self._buf[:excess]
            self._truncated = True

    def text(self) -> str:
        data = bytes(self._buf)
        if self._truncated:
            # Drop the partial first line the cut left behind.
            data = data.partition(b"\n")[2]
        return data.decode("utf-8", "replace")


async def _drain(stream: asyncio.StreamReader, ring: _Ring) -> None:
    while chunk := await stream.read(16 * 1024):
        ring.feed(chunk)


async def _read_progress(stream: asyncio.StreamReader, reporter: _Reporter) -> None:
    while True:
        try:
            line = await stream.readline()
        except ValueError:
            # A line longer than the reader's limit is not a progress line; skip it.
            continue
        if not line:
            return
        await reporter.line(line.decode("utf-8", "replace"))


class _Reporter:
    """Assembles ``-progress`` blocks into :class:`Progress` and throttles the callback."""

    def __init__(
        self,
        callback: ProgressCallback | None,
        duration_s: float | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._callback = callback
        self._duration = duration_s if duration_s and duration_s > 0 else None
        self._loop = loop
        self._fields: dict[str, str] = {}
        self._last_emit = -math.inf
        self._fraction = 0.0
        self.closed = False
        self.frames: int | None = None
        """The frame count of the latest complete progress report."""

    async def line(self, line: str) -> None:
        key, sep, value = line.partition("=")
        if not sep:
            return
        key, value = key.strip(), value.strip()
        if key != "progress":
            self._fields[key] = value
            return
        fields, self._fields = self._fields, {}
        end = value == "end"
        frame = _number(fields.get("frame", ""))
        if frame is not None:
            self.frames = int(frame)
        now = self._loop.time()
        if self._callback is None or self.closed:
            return
        if not end and now - self._last_emit < PROGRESS_INTERVAL_S:
            return
        self._last_emit = now
        await self._callback(self._build(fields, end))

    def _build(self, fields: dict[str, str], end: bool) -> Progress:
        out_time = _out_time(fields)
        fraction: float | None = None
        if self._duration is not None:
            # Never report going backwards: with several outputs out_time can jitter.
            raw = 1.0 if end else min(1.0, max(0.0, out_time / self._duration))
            self._fraction = max(self._fraction, raw)
            fraction = self._fraction
        speed = _number(fields.get("speed", "").rstrip("x"))
        frame = _number(fields.get("frame", ""))
        return Progress(
            out_time_s=out_time,
            fraction=fraction,
            speed=speed,
            frame=int(frame) if frame is not None else None,
        )


def _out_time(fields: dict[str, str]) -> float:
    # out_time_ms is microseconds too (a long-standing ffmpeg misnomer); out_time is
    # HH:MM:SS.ffffff and may be negative right at the start.
    for key in ("out_time_us", "out_time_ms"):
        value = _number(fields.get(key, ""))
        if value is not None:
            return max(0.0, value / 1_000_000)
    text = fields.get("out_time", "")
    try:
        hours, minutes, seconds = text.lstrip("-").split(":")
        if text.startswith("-"):
            return 0.0
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except ValueError:
        return 0.0


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        # A verbose run ends with byte counts and per-stream statistics: not a reason.
        if line not in _GENERIC_LAST_LINES and not _STATISTICS.match(line):
            return line
    return lines[-1] if lines else "(no stderr)"


def _clip(text: str) -> str:
    if len(text) <= ERROR_TAIL_BYTES:
        return text
    return text[-ERROR_TAIL_BYTES:].partition("\n")[2]
