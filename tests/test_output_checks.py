"""Output checks (shared/media/verify.py): each check passes a good output and fails a bad
one that was really made so (black, frozen, short, wrong, corrupt, silent), and a failed check
fails the step through the real bus with ``output_check_failed``, never retried."""

from __future__ import annotations

import os
import random
import stat
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest

from functions.conductor import function as conductor
from functions.probe import function as probe_fn
from shared.errors import ErrorCode, TransientError
from shared.events import CheckResult, StageTask
from shared.media import Binaries
from shared.media.verify import OutputCheckFailed, has_filter, verify_outputs
from shared.params.video import TranscodeParams
from shared.settings import Settings, load_settings
from shared.stage import StageContext, StageResult, stage
from tests.support.media import MakeClip, ffprobe_json
from tests.support.nats import running, submit_job, wait_for_job

pytestmark = pytest.mark.timeout(120)

SRC = "testsrc2=size=320x180:rate=25"


def _ffmpeg(binaries: Binaries, out: Path, *args: str) -> Path:
    proc = subprocess.run([binaries.ffmpeg, "-hide_banner", "-nostdin", "-v", "error", "-y",
                           *args, "-threads", "2", str(out)], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return out


@pytest.fixture(scope="module")
def source(binaries: Binaries, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 s of moving picture and a tone: what every bad output below was made from."""
    root = tmp_path_factory.mktemp("checks")
    return _ffmpeg(binaries, root / "source.mp4", "-f", "lavfi", "-i", SRC, "-f", "lavfi",
                   "-i", "sine=sample_rate=48000", "-t", "3", "-c:v", "libx264", "-preset",
                   "ultrafast", "-c:a", "aac")


def encode(binaries: Binaries, source: Path, out: Path, *args: str) -> Path:
    """A transcode of ``source`` with extra filters/options (before the output)."""
    return _ffmpeg(binaries, out, "-i", str(source), *args, "-c:v", "libx264", "-preset",
                   "ultrafast")


def settings(**overrides: Any) -> Settings:
    return load_settings({}, **overrides)


async def check(binaries: Binaries, out: Path, source: Path, stage_name: str = "transcode",
                **overrides: Any) -> list[CheckResult]:
    return await verify_outputs(binaries, settings(**overrides), stage_name, {"video": out},
                                {":input": {"media": source}})


def failed_checks(exc: OutputCheckFailed) -> dict[str, dict[str, Any]]:
    return {c["check"]: c for c in exc.details["checks"] if not c["passed"]}


async def test_a_faithful_encode_passes_every_check_with_a_score(
    binaries: Binaries, source: Path, tmp_path: Path
) -> None:
    out = encode(binaries, source, tmp_path / "good.mp4", "-c:a", "aac")
    results = await check(binaries, out, source)
    assert {r.check for r in results} == {"decode", "streams", "duration", "black", "freeze",
                                          "quality"}
    assert all(r.passed for r in results)
    quality = next(r for r in results if r.check == "quality")
    metric = "vmaf" if has_filter(binaries, "libvmaf") else "ssim"
    assert quality.measured["metric"] == metric
    assert quality.measured["score"] >= (80.0 if metric == "vmaf" else 0.95)


async def test_ssim_when_configured(binaries: Binaries, source: Path, tmp_path: Path) -> None:
    out = encode(binaries, source, tmp_path / "good.mp4", "-c:a", "aac")
    results = await check(binaries, out, source, output_check_metric="ssim")
    quality = next(r for r in results if r.check == "quality")
    assert quality.measured["metric"] == "ssim" and 0.95 <= quality.measured["score"] <= 1.0


@pytest.mark.parametrize(("name", "args", "check_name"), [
    ("black", ["-vf", "drawbox=c=black:t=fill:enable='between(t,0.5,2.5)'", "-c:a", "aac"],
     "black"),
    ("frozen", ["-vf", "trim=end=0.8,tpad=stop_mode=clone:stop_duration=2.2", "-c:a", "aac"],
     "freeze"),
    ("short", ["-t", "2", "-c:a", "aac"], "duration"),
    ("silent", ["-an"], "streams"),
    ("mirrored", ["-vf", "hflip,vflip", "-c:a", "aac"], "quality"),
])
async def test_a_bad_output_fails_the_check_that_names_it(
    binaries: Binaries, source: Path, tmp_path: Path, name: str, args: list[str],
    check_name: str
) -> None:
    out = encode(binaries, source, tmp_path / f"{name}.mp4", *args)
    with pytest.raises(OutputCheckFailed) as info:
        await check(binaries, out, source)
    exc = info.value
    assert exc.code == ErrorCode.OUTPUT_CHECK_FAILED and exc.non_retryable
    assert check_name in failed_checks(exc), exc.message
    assert exc.details["output"] == "video"
    assert f"{exc.details['check']} check failed on output 'video': measured" in exc.message


async def test_a_corrupt_output_fails_decode(binaries: Binaries, source: Path,
                                             tmp_path: Path) -> None:
    good = encode(binaries, source, tmp_path / "good.ts", "-c:a", "aac", "-f", "mpegts")
    data = bytearray(good.read_bytes())
    for at in range(len(data) // 3, 2 * len(data) // 3, 1000):  # scribble over the middle
        data[at:at + 200] = os.urandom(200)
    bad = tmp_path / "corrupt.ts"
    bad.write_bytes(bytes(data))
    with pytest.raises(OutputCheckFailed) as info:
        await check(binaries, bad, source)
    assert "decode" in failed_checks(info.value)
    assert failed_checks(info.value)["decode"]["measured"]["errors"] > 0


def _complaints(binaries: Binaries, path: Path) -> str:
    """What ffmpeg's decoders say (errors only) about decoding ``path`` whole."""
    return subprocess.run(
        [binaries.ffmpeg, "-hide_banner", "-nostdin", "-v", "error", "-i", str(path),
         "-f", "null", "-"], capture_output=True, timeout=60).stderr.decode().strip()


async def test_a_damaged_source_does_not_fail_a_clean_outputs_decode(
    binaries: Binaries, source: Path, tmp_path: Path
) -> None:
    """The output and the source are decoded in one pass, whose log does not say which
    input a decoder complaint came from: the source's own damage must not count against a
    clean output (the output is then decoded alone to tell)."""
    data = bytearray(source.read_bytes())  # media data first, its index (moov) at the end
    scribble = random.Random(1)  # seeded: the same damage every run (some damage crashes
    for at in range(len(data) // 3, len(data) // 2, 2000):  # the bundled ffmpeg outright)
        data[at:at + 50] = scribble.randbytes(50)
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(bytes(data))
    assert _complaints(binaries, damaged), "the damaged source must make its decoder complain"
    out = encode(binaries, damaged, tmp_path / "clean.mp4", "-c:a", "aac")
    try:
        results = [msgspec.to_builtins(r) for r in await check(binaries, out, damaged)]
    except OutputCheckFailed as exc:  # damage may shift other figures; decode is the point
        results = exc.details["checks"]
    decode = next(c for c in results if c["check"] == "decode")
    assert decode["passed"] and decode["measured"]["errors"] == 0, decode


async def test_long_outputs_are_decoded_in_windows(binaries: Binaries, source: Path,
                                                   tmp_path: Path) -> None:
    out = encode(binaries, source, tmp_path / "good.mp4", "-c:a", "aac")
    results = await check(binaries, out, source, output_check_whole_max_s=1.0,
                          output_check_windows=2, output_check_window_s=0.5)
    decode = next(r for r in results if r.check == "decode")
    assert decode.passed and decode.measured["windows"] == 2
    whole = await check(binaries, out, source)
    assert next(r for r in whole if r.check == "decode").measured["windows"] == 1


@pytest.mark.parametrize("stage_name", ["transcode", "watermark"])
async def test_black_that_the_source_has_is_not_a_failure(binaries: Binaries, tmp_path: Path,
                                                          stage_name: str) -> None:
    """``watermark`` scores no quality: its source is measured only once the output shows
    black, and then excuses it."""
    src = _ffmpeg(binaries, tmp_path / "fade.mp4", "-f", "lavfi", "-i", SRC, "-t", "3",
                  "-vf", "drawbox=c=black:t=fill:enable='lt(t,1.5)'", "-c:v", "libx264",
                  "-preset", "ultrafast")
    out = encode(binaries, src, tmp_path / "out.mp4")
    results = await check(binaries, out, src, stage_name)
    black = next(r for r in results if r.check == "black")
    assert black.passed and black.measured["output_s"] >= 1.0
    assert black.note.startswith("the source has 1.")


async def test_a_check_that_crashes_is_transient(binaries: Binaries, source: Path,
                                                 tmp_path: Path) -> None:
    crasher = tmp_path / "ffmpeg"
    crasher.write_text("#!/bin/sh\nkill -SEGV $$\n")
    crasher.chmod(crasher.stat().st_mode | stat.S_IEXEC)
    broken = Binaries(ffmpeg=str(crasher), ffprobe=binaries.ffprobe)
    out = encode(binaries, source, tmp_path / "good.mp4", "-c:a", "aac")
    with pytest.raises(TransientError) as info:
        await check(broken, out, source, output_check_metric="ssim")
    assert not info.value.non_retryable and "crashed" in info.value.message


async def test_stages_without_a_promise_and_disabled_checks_check_nothing(
    binaries: Binaries, source: Path
) -> None:
    assert await check(binaries, source, source, stage_name="segment") == []
    assert await check(binaries, source, source, output_checks=False) == []


def _black_transcode(binaries: Binaries) -> Any:
    """A ``transcode`` stage that writes black video: the runtime must refuse its output."""

    async def handle(task: StageTask, ctx: StageContext[TranscodeParams]) -> StageResult:
        src = ctx.input_file()
        out = ctx.workdir / "video.mp4"
        _ffmpeg(binaries, out, "-i", str(src), "-vf", "drawbox=c=black:t=fill",
                "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac")
        return StageResult(files={"video": out})

    return stage("transcode", handle)


async def test_a_failed_check_fails_the_step_once_with_its_values(  # type: ignore[no-untyped-def]
    make_settings, binaries: Binaries, make_clip: MakeClip
) -> None:
    clip = make_clip("checked", duration=2.0, width=320, height=180)
    steps = {"probe": {"stage": "probe", "uses": [":input"]},
             "transcode": {"stage": "transcode", "uses": [":input", "probe"]}}
    async with running(make_settings(), [conductor, probe_fn, _black_transcode(binaries)]) as rt:
        job_id = await submit_job(rt, [clip], steps=steps)
        record = await wait_for_job(rt.services, job_id)
    assert record.status == "failed"
    assert record.error is not None and record.error.code == "output_check_failed"
    assert "black check failed on output 'video'" in record.error.message
    assert record.steps["transcode"].attempt == 1  # never retried
    assert record.steps["transcode"].outputs == {}  # nothing was uploaded


async def test_checks_are_in_the_manifest_and_the_job_view(  # type: ignore[no-untyped-def]
    make_settings, binaries: Binaries, make_clip: MakeClip, tmp_path: Path
) -> None:
    from functions.thumbnail import function as thumbnail
    from functions.transcode import function as transcode

    clip = make_clip("checked-web", duration=2.0, width=320, height=180)
    async with running(make_settings(), [conductor, probe_fn, transcode, thumbnail]) as rt:
        job_id = await submit_job(rt, [clip], recipe="web", params={"preset": "ultrafast"})
        record = await wait_for_job(rt.services, job_id)
        assert rt.services is not None
        manifest = await rt.services.store.get_bytes(f"jobs/{job_id}/transcode/manifest.json")
    assert record.status == "succeeded", record.error
    checks = record.steps["transcode"].checks
    assert {c.check for c in checks} >= {"decode", "duration", "quality"}
    assert all(c.passed for c in checks)
    assert b'"checks"' in manifest and b'"quality"' in manifest
    poster = record.steps["poster"].checks
    assert [c.check for c in poster] == ["decode"]  # an image: it decodes, nothing more
    assert ffprobe_json(binaries, clip)["streams"]  # the source itself is untouched


async def test_animated_webp_is_checked_by_its_structure(binaries: Binaries,
                                                         tmp_path: Path) -> None:
    """ffmpeg cannot decode animated WebP: its RIFF chunks are checked instead, and a file
    cut short fails."""
    anim = _ffmpeg(binaries, tmp_path / "preview.webp", "-f", "lavfi", "-i",
                   "testsrc2=size=160x90:rate=10:duration=1", "-c:v", "libwebp_anim",
                   "-loop", "0")
    results = await verify_outputs(binaries, settings(), "preview", {"preview": anim}, {})
    assert [(r.check, r.passed, r.measured) for r in results] == [
        ("decode", True, {"frames": 10})]
    cut = tmp_path / "cut.webp"
    cut.write_bytes(anim.read_bytes()[: anim.stat().st_size // 2])
    with pytest.raises(OutputCheckFailed):
        await verify_outputs(binaries, settings(), "preview", {"preview": cut}, {})


async def test_a_cancelled_check_leaves_no_child_running(binaries: Binaries, source: Path,
                                                         tmp_path: Path) -> None:
    import asyncio

    from tests.support.waiting import eventually

    pids = tmp_path / "pids"
    slow = tmp_path / "ffmpeg"
    slow.write_text(f"#!/bin/sh\necho $$ >> {pids}\nexec sleep 60\n")
    slow.chmod(slow.stat().st_mode | stat.S_IEXEC)
    stuck = Binaries(ffmpeg=str(slow), ffprobe=binaries.ffprobe)
    out = encode(binaries, source, tmp_path / "good.mp4", "-c:a", "aac")
    task = asyncio.create_task(check(stuck, out, source, output_check_metric="ssim"))
    # One pass decodes the output and compares it with the source (shared/media/verify.py).
    await eventually(lambda: pids.exists() and len(pids.read_text().split()) == 1,
                     what="the decode-and-compare pass to start")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    started = [int(p) for p in pids.read_text().split()]
    await eventually(lambda: not any(alive(p) for p in started), what="the children to exit")


async def test_an_overlay_stage_that_blacks_out_the_picture_fails(
    binaries: Binaries, source: Path, tmp_path: Path
) -> None:
    out = encode(binaries, source, tmp_path / "black.mp4", "-vf",
                 "drawbox=c=black:t=fill:enable='between(t,0.5,2.5)'", "-c:a", "aac")
    with pytest.raises(OutputCheckFailed) as info:
        await check(binaries, out, source, "watermark")
    black = failed_checks(info.value)["black"]
    assert black["measured"]["output_s"] >= 1.5 and black["note"] == "the source has 0s"
    assert "quality" not in {c["check"] for c in info.value.details["checks"]}
