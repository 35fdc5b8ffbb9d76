"""FFmpegRunner against the real ffmpeg: progress, deadline, cancellation, failures, clean-up."""

from __future__ import annotations

import asyncio
import itertools
import os
from pathlib import Path
from typing import Any

import ffmpeg
import pytest

from shared.errors import Cancelled, ErrorCode, FFmpegError, PermanentError
from shared.media import (
    PROTOCOL_WHITELIST,
    Binaries,
    FFmpegRunner,
    Progress,
    classify_failure,
    find_binaries,
    step_timeout,
)
from shared.media.allowlist import FORMAT_WHITELIST
from shared.settings import Settings
from tests.support.media import ffprobe_json

# An endless realtime source: ffmpeg runs until something stops it.
ENDLESS = ffmpeg.input("testsrc2=size=160x120:rate=25", f="lavfi", re=None).output("-", f="null")


@pytest.fixture
def runner(binaries: Binaries) -> FFmpegRunner:
    return FFmpegRunner(binaries, kill_grace_s=2.0)


def _gone(pid: int) -> bool:
    """True once the pid is neither running nor a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def _child_pid(runner: FFmpegRunner, task: asyncio.Task[Any]) -> int:
    async with asyncio.timeout(10):
        while not runner.pids:
            if task.done():
                task.result()
                pytest.fail("run ended before its child was seen")
            await asyncio.sleep(0.01)
    (pid,) = runner.pids
    return pid


async def test_transcode_reports_increasing_progress(
    runner: FFmpegRunner, binaries: Binaries, clip_3s: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.mp4"
    # -readrate 4 spreads the 3 s clip over ~0.75 s so that several progress blocks appear.
    args = (
        ffmpeg.input(str(clip_3s), readrate=4)
        .output(str(out), vcodec="libx264", preset="ultrafast", acodec="aac")
        .global_args("-stats_period", "0.1")
        .get_args()
    )
    seen: list[Progress] = []

    async def on_progress(p: Progress) -> None:
        seen.append(p)

    result = await runner.run(args, duration_s=3.0, timeout_s=60, on_progress=on_progress)

    assert result.returncode == 0 and result.elapsed_s > 0
    assert len(seen) >= 2, seen
    fractions = [p.fraction for p in seen]
    assert all(f is not None for f in fractions)
    assert fractions == sorted(fractions)  # type: ignore[type-var]
    assert fractions[-1] == pytest.approx(1.0)
    assert seen[-1].out_time_s == pytest.approx(3.0, abs=0.1)
    assert seen[-1].frame == 75
    probed = ffprobe_json(binaries, out)
    assert {s["codec_name"] for s in probed["streams"]} == {"h264", "aac"}
    assert not runner.pids


async def test_progress_is_throttled(runner: FFmpegRunner, clip_3s: Path, tmp_path: Path) -> None:
    args = (
        ffmpeg.input(str(clip_3s), readrate=4)
        .output(str(tmp_path / "o.mp4"), vcodec="libx264", preset="ultrafast")
        .global_args("-stats_period", "0.05")
        .get_args()
    )
    stamps: list[float] = []
    loop = asyncio.get_running_loop()

    async def on_progress(p: Progress) -> None:
        stamps.append(loop.time())

    await runner.run(args, duration_s=3.0, timeout_s=60, on_progress=on_progress)
    assert len(stamps) >= 3
    gaps = [b - a for a, b in itertools.pairwise(stamps[:-1])]  # the last is always sent
    assert all(gap >= 0.2 for gap in gaps), gaps


async def test_timeout_terminates_the_child(runner: FFmpegRunner) -> None:
    task = asyncio.create_task(runner.run(ENDLESS.get_args(), timeout_s=1.0))
    pid = await _child_pid(runner, task)

    with pytest.raises(FFmpegError) as info:
        await task

    assert info.value.code == ErrorCode.TIMEOUT
    assert info.value.non_retryable is False
    assert _gone(pid)
    assert not runner.pids


async def test_sigkill_after_grace_when_sigterm_is_ignored(
    binaries: Binaries, tmp_path: Path
) -> None:
    # ffmpeg blocked opening a FIFO with no writer keeps running through SIGTERM (the
    # open() is restarted after the handler), so only the SIGKILL escalation ends it.
    fifo = tmp_path / "stuck.fifo"
    os.mkfifo(fifo)
    runner = FFmpegRunner(binaries, kill_grace_s=0.5)
    args = ffmpeg.input(str(fifo)).output("-", f="null").get_args()
    loop = asyncio.get_running_loop()
    started = loop.time()
    task = asyncio.create_task(runner.run(args, timeout_s=0.5))
    pid = await _child_pid(runner, task)

    with pytest.raises(FFmpegError) as info:
        await task

    assert info.value.code == ErrorCode.TIMEOUT
    assert info.value.returncode == -9
    assert loop.time() - started >= 0.95  # deadline + grace
    assert _gone(pid)


async def test_cancel_event_stops_the_child(runner: FFmpegRunner) -> None:
    cancel = asyncio.Event()
    running = asyncio.Event()

    async def on_progress(p: Progress) -> None:
        running.set()

    task = asyncio.create_task(
        runner.run(ENDLESS.get_args(), timeout_s=60, on_progress=on_progress, cancel=cancel)
    )
    pid = await _child_pid(runner, task)
    async with asyncio.timeout(10):
        await running.wait()
    cancel.set()

    with pytest.raises(Cancelled):
        await task
    assert _gone(pid)
    assert not runner.pids


async def test_task_cancellation_kills_the_child(runner: FFmpegRunner) -> None:
    task = asyncio.create_task(runner.run(ENDLESS.get_args(), timeout_s=60))
    pid = await _child_pid(runner, task)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _gone(pid)
    assert not runner.pids


async def test_child_gets_the_configured_nice_and_resource_limits(
    binaries: Binaries, tmp_path: Path
) -> None:
    settings = Settings(ffmpeg_nice=7, ffmpeg_max_memory_mb=4096, ffmpeg_max_file_mb=64,
                        work_dir=str(tmp_path))
    runner = FFmpegRunner.from_settings(settings, binaries, kill_grace_s=2.0)
    task = asyncio.create_task(runner.run(ENDLESS.get_args(), timeout_s=60))
    pid = await _child_pid(runner, task)
    try:
        stat = _proc_text(pid, "stat").rsplit(")", 1)[1].split()
        limits = _proc_text(pid, "limits")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert int(stat[16]) == os.getpriority(os.PRIO_PROCESS, 0) + 7  # field 19: nice
    assert int(stat[2]) == pid  # field 5: process group = its own
    assert "Max address space         4294967296" in limits
    assert "Max file size             67108864" in limits
    assert "Max core file size        0" in limits


async def test_an_output_past_the_file_size_limit_is_a_transient_disk_full(
    binaries: Binaries, tmp_path: Path
) -> None:
    runner = FFmpegRunner(binaries, file_size_bytes=64 * 1024, kill_grace_s=2.0)
    out = tmp_path / "big.mkv"
    cmd = ffmpeg.input("testsrc2=size=320x240:rate=25:duration=4", f="lavfi").output(
        str(out), vcodec="ffv1")  # lossless: megabytes, far past the 64 KiB limit
    with pytest.raises(FFmpegError) as caught:
        await runner.run(cmd.get_args(), timeout_s=60)
    assert caught.value.code == ErrorCode.DISK_FULL
    assert not caught.value.non_retryable  # another try, or another worker, can succeed
    assert out.stat().st_size <= 64 * 1024


def _proc_text(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/{name}") as fh:
        return fh.read()


async def test_failing_progress_callback_stops_the_child(runner: FFmpegRunner) -> None:
    async def on_progress(p: Progress) -> None:
        raise RuntimeError("progress sink broke")

    with pytest.raises(RuntimeError, match="progress sink broke"):
        await runner.run(ENDLESS.get_args(), timeout_s=60, on_progress=on_progress)
    assert not runner.pids


async def test_text_file_is_invalid_input(
    runner: FFmpegRunner, text_file: Path, tmp_path: Path
) -> None:
    args = ffmpeg.input(str(text_file)).output(str(tmp_path / "o.mp4")).get_args()
    with pytest.raises(FFmpegError) as info:
        await runner.run(args, timeout_s=30)
    assert info.value.code == ErrorCode.INVALID_INPUT
    assert info.value.non_retryable is True
    assert "Invalid data found" in info.value.stderr_tail


PUBLIC = Path(__file__).parent / "fixtures" / "public"


async def test_a_run_reports_the_video_frames_it_wrote(
    runner: FFmpegRunner, clip_3s: Path, tmp_path: Path
) -> None:
    args = ffmpeg.input(str(clip_3s)).output(str(tmp_path / "o.mp4"), vframes=7).get_args()
    result = await runner.run(args, timeout_s=60)
    assert result.frames == 7
    result.require_frames()  # frames were written: nothing to refuse


async def test_an_overlay_on_an_undecodable_picture_is_invalid_input(
    runner: FFmpegRunner, tmp_path: Path
) -> None:
    """ffmpeg exits 0 when a picture that never decodes meets a second input in the graph
    (a watermark's logo): the run's frame count is what tells, and it is the input's fault."""
    logo = ffmpeg.input("color=red:size=16x16", f="lavfi", t=1)
    broken = ffmpeg.input(str(PUBLIC / "webp.webp"))
    args = ffmpeg.overlay(broken.video, logo, eof_action="repeat").output(
        str(tmp_path / "o.mp4"), vcodec="libx264").get_args()
    result = await runner.run(args, timeout_s=60)
    assert result.returncode == 0 and result.frames == 0
    with pytest.raises(PermanentError) as info:
        result.require_frames("the input")
    assert info.value.code == ErrorCode.INVALID_INPUT
    assert "no video frame could be decoded from the input" in info.value.message
    assert "Invalid data" in info.value.message


async def test_verbose_statistics_name_the_input_whose_picture_never_decoded(
    runner: FFmpegRunner, clip_3s: Path, tmp_path: Path
) -> None:
    """A good clip, and a picture that never decodes under a logo: ffmpeg exits 0; its
    closing per-input statistics (verbose) say which input gave no frame."""
    logo = ffmpeg.input("color=red:size=16x16", f="lavfi", t=1)
    good = ffmpeg.input(str(clip_3s)).video.filter("scale", 64, 64)
    broken = ffmpeg.input(str(PUBLIC / "webp.webp"))
    marked = ffmpeg.overlay(broken.video, logo, eof_action="repeat").filter("scale", 64, 64)
    out = ffmpeg.merge_outputs(
        ffmpeg.output(good, str(tmp_path / "good.mp4"), vcodec="libx264"),
        ffmpeg.output(marked, str(tmp_path / "o.mp4"), vcodec="libx264"))
    args = out.get_args()
    inputs = [args[k + 1] for k, arg in enumerate(args[:-1]) if arg == "-i"]
    result = await runner.run(["-loglevel", "verbose", *args], timeout_s=60)
    assert result.returncode == 0
    assert result.undecoded_video_inputs() == [inputs.index(str(PUBLIC / "webp.webp"))]
    quiet = await runner.run(args, timeout_s=60)
    assert quiet.undecoded_video_inputs() == []  # only verbose runs print the statistics


@pytest.mark.parametrize("url", ["concat:{clip}|{clip}", "http://127.0.0.1:9/clip.mp4"])
async def test_inputs_outside_the_whitelist_are_refused(
    runner: FFmpegRunner, clip_3s: Path, tmp_path: Path, url: str
) -> None:
    args = ffmpeg.input(url.format(clip=clip_3s)).output(str(tmp_path / "o.mp4")).get_args()
    with pytest.raises(FFmpegError) as info:
        await runner.run(args, timeout_s=30)
    assert info.value.code == ErrorCode.INVALID_INPUT
    assert info.value.non_retryable is True
    assert "not on whitelist" in info.value.stderr_tail


async def test_own_command_failure_is_permanent(
    runner: FFmpegRunner, clip_3s: Path, tmp_path: Path
) -> None:
    args = ffmpeg.input(str(clip_3s)).output(str(tmp_path / "o.mp4"), vcodec="nope").get_args()
    with pytest.raises(FFmpegError) as info:
        await runner.run(args, timeout_s=30)
    assert info.value.code == ErrorCode.FFMPEG_FAILED
    assert info.value.non_retryable is True
    assert "nope" in info.value.message


def test_whitelist_goes_before_every_input(runner: FFmpegRunner) -> None:
    args = ["-i", "a.mp4", "-protocol_whitelist", "file,crypto", "-i", "b.mp4",
            "-f", "lavfi", "-i", "color", "out.mp4"]
    argv = runner.command(args)

    assert argv[:7] == [
        runner.binaries.ffmpeg, "-hide_banner", "-nostdin", "-y", "-progress", "pipe:1", "-nostats"
    ]  # fmt: skip
    assert argv[7:] == [
        "-protocol_whitelist", PROTOCOL_WHITELIST, "-format_whitelist", FORMAT_WHITELIST,
        "-i", "a.mp4",
        "-protocol_whitelist", "file,crypto", "-format_whitelist", FORMAT_WHITELIST,
        "-i", "b.mp4",  # the caller's own protocol whitelist stays
        "-f", "lavfi", "-protocol_whitelist", PROTOCOL_WHITELIST,  # a forced demuxer stays
        "-i", "color",
        "out.mp4",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("returncode", "stderr", "code", "non_retryable"),
    [
        (-9, "", ErrorCode.FFMPEG_FAILED, False),
        (1, "av_interleaved_write_frame(): No space left on device\n", ErrorCode.DISK_FULL,
         False),
        (1, "Error writing trailer: File too large\n", ErrorCode.DISK_FULL, False),
        (1, "in.mp4: Invalid argument\n", ErrorCode.INVALID_INPUT, True),
        (1, "[mov] moov atom not found\nin.mp4: Invalid data found when processing input\n",
         ErrorCode.INVALID_INPUT, True),
        (1, "Unknown encoder 'nope'\nConversion failed!\n", ErrorCode.FFMPEG_FAILED, True),
    ],
)  # fmt: skip
def test_classify_failure(
    returncode: int, stderr: str, code: ErrorCode, non_retryable: bool
) -> None:
    error = classify_failure(returncode, stderr, ["in.mp4"])
    assert (error.code, error.non_retryable) == (code, non_retryable)
    assert error.returncode == returncode


def test_classify_failure_names_the_real_reason() -> None:
    error = classify_failure(1, "Unknown encoder 'nope'\nConversion failed!\n")
    assert "Unknown encoder 'nope'" in error.message
    # A verbose run (montage) ends with statistics after the reason: they are skipped.
    verbose = ("[mjpeg @ 0x1] No JPEG data found in image\nConversion failed!\n"
               "Input file #1 (in/1/media.jpg):\n"
               "  Input stream #1:0 (video): 1 packets read (9 bytes); 0 frames decoded;\n"
               "  Total: 1 packets (9 bytes) demuxed\n"
               "[AVIOContext @ 0x2b4ca580] Statistics: 9 bytes read, 0 seeks\n")
    assert "No JPEG data found in image" in classify_failure(1, verbose).message


async def test_workdir_is_private_and_removed(runner: FFmpegRunner, tmp_path: Path) -> None:
    async with runner.workdir(str(tmp_path)) as work:
        assert work.parent == tmp_path
        assert work.stat().st_mode & 0o777 == 0o700
        (work / "sub").mkdir()
        (work / "sub" / "seg.ts").write_bytes(b"x" * 1024)
    assert not work.exists()


async def test_workdir_removed_after_exception(runner: FFmpegRunner, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        async with runner.workdir(str(tmp_path)) as work:
            (work / "partial.mp4").write_bytes(b"x")
            raise ValueError("step failed")
    assert not work.exists()
    assert os.listdir(tmp_path) == []


async def test_workdir_removed_after_cancellation(runner: FFmpegRunner, tmp_path: Path) -> None:
    entered = asyncio.Event()
    seen: list[Path] = []

    async def step() -> None:
        async with runner.workdir(str(tmp_path)) as work:
            seen.append(work)
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(step())
    async with asyncio.timeout(5):
        await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not seen[0].exists()


def test_binaries_prefer_the_real_static_build() -> None:
    found = find_binaries(Settings())
    for path in (found.ffmpeg, found.ffprobe):
        with open(path, "rb") as fh:
            assert not fh.read(2) == b"#!", f"{path} is a script wrapper"


def test_configured_binary_that_does_not_exist_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="JETCUT_FFMPEG"):
        find_binaries(Settings(ffmpeg=str(tmp_path / "no-ffmpeg")))


def test_step_timeout_scales_with_media_and_is_clamped() -> None:
    settings = Settings(timeout_min_s=60, timeout_max_s=3600, timeout_per_media_s=10)
    assert step_timeout(settings, 1.0) == 60
    assert step_timeout(settings, 30.0) == 300
    assert step_timeout(settings, 30.0, cost=2.0) == 600
    assert step_timeout(settings, 10_000.0) == 3600
    assert step_timeout(settings, None) == 3600


@pytest.mark.parametrize(("returncode", "code", "non_retryable"), [
    (-11, ErrorCode.INVALID_INPUT, True),   # SIGSEGV: the decoder crashed on the file
    (-6, ErrorCode.INVALID_INPUT, True),    # SIGABRT
    (-9, ErrorCode.FFMPEG_FAILED, False),   # SIGKILL: OOM killer or an operator
    (-15, ErrorCode.FFMPEG_FAILED, False),  # SIGTERM
])
def test_crashes_are_the_inputs_fault_kills_are_not(returncode, code, non_retryable) -> None:  # type: ignore[no-untyped-def]
    from shared.media.runner import classify_failure

    error = classify_failure(returncode, "")
    assert error.code == code and error.non_retryable is non_retryable
