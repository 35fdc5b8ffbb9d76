"""loudnorm through the real bus: the ``audio`` recipe (probe -> loudnorm) on real media."""

from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path

import pytest

from functions.loudnorm.handler import _loudnorm_stats
from functions.registry import FUNCTIONS
from shared.errors import PermanentError
from shared.media import Binaries
from shared.recipes import resolve
from tests.support.media import ffprobe_json
from tests.support.nats import fetch_output, running, submit_job, wait_for_job

pytestmark = pytest.mark.timeout(90)


def _ffmpeg(binaries: Binaries, *args: str) -> str:
    proc = subprocess.run([binaries.ffmpeg, "-hide_banner", "-nostdin", "-y", *args],
                          capture_output=True, timeout=60, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def integrated_lufs(binaries: Binaries, path: Path) -> float:
    """Integrated loudness of ``path`` by ffmpeg's ebur128 scanner (not loudnorm's own
    measurement, so the stage is checked by an independent meter)."""
    stderr = _ffmpeg(binaries, "-i", str(path), "-map", "0:a:0", "-af",
                     "ebur128=framelog=quiet", "-f", "null", "-")
    summary = stderr[stderr.rindex("Summary:"):]
    match = re.search(r"I:\s+(-?[\d.]+|-inf) LUFS", summary)
    assert match, summary
    return float(match.group(1))


@pytest.fixture(scope="module")
def loud_and_quiet(binaries: Binaries, tmp_path_factory: pytest.TempPathFactory
                   ) -> tuple[Path, Path]:
    """A quiet audio-only M4A (pink noise, about -45 LUFS) and a loud MP4 with video
    (a 0.9-amplitude stereo tone, about -4 LUFS)."""
    root = tmp_path_factory.mktemp("loudness")
    quiet, loud = root / "quiet.m4a", root / "loud.mp4"
    _ffmpeg(binaries, "-v", "error", "-f", "lavfi", "-i",
            "anoisesrc=color=pink:amplitude=0.02:seed=7:sample_rate=44100", "-t", "3",
            "-c:a", "aac", str(quiet))
    _ffmpeg(binaries, "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=160x90:rate=25",
            "-f", "lavfi", "-i", "aevalsrc=0.9*sin(2*PI*440*t)|0.9*sin(2*PI*440*t):s=48000",
            "-t", "3", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
            "-c:a", "aac", "-b:a", "192k", str(loud))
    return quiet, loud


async def test_audio_recipe_normalises_quiet_and_loud_inputs(  # type: ignore[no-untyped-def]
    make_settings, binaries, loud_and_quiet, tmp_path
):
    quiet, loud = loud_and_quiet
    assert integrated_lufs(binaries, quiet) < -35
    assert integrated_lufs(binaries, loud) > -8
    async with running(make_settings(), list(FUNCTIONS.values())) as rt:
        jobs = await asyncio.gather(
            submit_job(rt, [quiet], recipe="audio"),  # aac/m4a at -23 LUFS, the defaults
            submit_job(rt, [loud], recipe="audio", params={
                "integrated_lufs": -16, "codec": "mp3", "bitrate_k": 192,
                "sample_rate": 44100}),
        )
        records = await asyncio.gather(*(wait_for_job(rt.services, j, timeout=60)
                                         for j in jobs))
        for record in records:
            assert record.status == "succeeded", (record.error, record.steps)
        quiet_out = await fetch_output(rt, records[0], "loudnorm", "audio", tmp_path / "q.m4a")
        loud_out = await fetch_output(rt, records[1], "loudnorm", "audio", tmp_path / "l.mp3")

    assert records[0].steps["loudnorm"].outputs["audio"].endswith("/audio.m4a")
    assert abs(integrated_lufs(binaries, quiet_out) - -23.0) <= 1.0
    assert abs(integrated_lufs(binaries, loud_out) - -16.0) <= 1.0

    info = ffprobe_json(binaries, quiet_out)
    assert [s["codec_type"] for s in info["streams"]] == ["audio"]
    stream = info["streams"][0]
    assert (stream["codec_name"], stream["sample_rate"], stream["channels"]) == ("aac", "48000", 2)
    stream = ffprobe_json(binaries, loud_out)["streams"][0]
    assert (stream["codec_name"], stream["sample_rate"]) == ("mp3", "44100")

    meta = records[0].steps["loudnorm"].meta
    assert meta["input"]["integrated_lufs"] < -35
    assert meta["target"] == {"integrated_lufs": -23.0, "true_peak_db": -1.0, "lra": 11.0}
    assert meta["normalization_type"] in ("linear", "dynamic")
    assert abs(meta["output"]["integrated_lufs"] - -23.0) <= 1.0
    meta = records[1].steps["loudnorm"].meta
    assert meta["input"]["integrated_lufs"] > -8
    assert meta["normalization_type"] == "linear", meta  # a tone needs a plain gain, no compression
    assert meta["video_kept"] is False


async def test_opus_output_and_keep_video(  # type: ignore[no-untyped-def]
    make_settings, binaries, loud_and_quiet, tmp_path
):
    _, loud = loud_and_quiet
    async with running(make_settings(), list(FUNCTIONS.values())) as rt:
        jobs = await asyncio.gather(
            submit_job(rt, [loud], recipe="audio", params={
                "codec": "opus", "keep_video": True, "integrated_lufs": -18, "channels": 1}),
            submit_job(rt, [loud], recipe="audio", params={"codec": "opus",
                                                          "container": "webm"}),
        )
        ogg_job, webm_job = await asyncio.gather(*(wait_for_job(rt.services, j, timeout=60)
                                                   for j in jobs))
        assert ogg_job.status == "succeeded", (ogg_job.error, ogg_job.steps)
        assert webm_job.status == "succeeded", (webm_job.error, webm_job.steps)
        audio = await fetch_output(rt, ogg_job, "loudnorm", "audio", tmp_path / "a.ogg")
        video = await fetch_output(rt, ogg_job, "loudnorm", "video", tmp_path / "v.mp4")
        webm = await fetch_output(rt, webm_job, "loudnorm", "audio", tmp_path / "a.webm")

    info = ffprobe_json(binaries, audio)
    assert info["format"]["format_name"] == "ogg"
    assert [(s["codec_name"], s["sample_rate"], s["channels"]) for s in info["streams"]] == [
        ("opus", "48000", 1)]
    assert abs(integrated_lufs(binaries, audio) - -18.0) <= 1.0

    info = ffprobe_json(binaries, video)
    streams = {s["codec_type"]: s for s in info["streams"]}
    assert streams["video"]["codec_name"] == "h264"  # copied, not re-encoded
    assert (streams["video"]["width"], streams["video"]["height"]) == (160, 90)
    assert streams["audio"]["codec_name"] == "opus"
    assert abs(integrated_lufs(binaries, video) - -18.0) <= 1.0
    assert ogg_job.steps["loudnorm"].meta["video_kept"] is True

    info = ffprobe_json(binaries, webm)
    assert "webm" in info["format"]["format_name"]
    assert [s["codec_name"] for s in info["streams"]] == ["opus"]
    assert abs(integrated_lufs(binaries, webm) - -23.0) <= 1.0


async def test_no_audio_fails_and_silence_passes_through(  # type: ignore[no-untyped-def]
    make_settings, make_clip, binaries, tmp_path
):
    silent_video = make_clip("no_audio", duration=1.0, width=160, height=90, audio=False)
    silence = tmp_path / "silence.m4a"
    _ffmpeg(binaries, "-v", "error", "-f", "lavfi", "-i", "anullsrc=r=44100:cl=mono", "-t", "2",
            "-c:a", "aac", str(silence))
    async with running(make_settings(), list(FUNCTIONS.values())) as rt:
        jobs = await asyncio.gather(submit_job(rt, [silent_video], recipe="audio"),
                                    submit_job(rt, [silence], recipe="audio"))
        failed, quiet = await asyncio.gather(*(wait_for_job(rt.services, j, timeout=30)
                                               for j in jobs))
    assert failed.status == "failed"
    assert failed.error is not None and failed.error.code == "no_audio_stream"
    step = failed.steps["loudnorm"]
    assert step.status == "failed" and step.attempt == 1  # bad input: never retried
    assert failed.steps["probe"].status == "done"

    # Digital silence has no loudness to correct (-inf LUFS): it is encoded, not amplified.
    assert quiet.status == "succeeded", (quiet.error, quiet.steps)
    meta = quiet.steps["loudnorm"].meta
    assert meta["normalization_type"] == "none" and meta["output"] is None
    assert meta["input"]["integrated_lufs"] is None


@pytest.mark.parametrize("params, field", [
    ({"codec": "opus", "sample_rate": 44100}, "sample_rate"),
    ({"codec": "aac", "container": "ogg"}, "container"),
    ({"integrated_lufs": 3}, "integrated_lufs"),
    ({"bitrate_k": 8}, "bitrate_k"),
    ({"codec": "opus", "channels": 1, "bitrate_k": 320}, "bitrate_k"),
    ({"loudness": -23}, "loudness"),
])
def test_bad_params_are_invalid_recipe(params, field):  # type: ignore[no-untyped-def]
    with pytest.raises(PermanentError) as caught:
        resolve("audio", None, params, n_inputs=1)
    assert caught.value.code == "invalid_recipe"
    assert field in caught.value.message


def test_loudnorm_stats_are_read_from_the_end_of_stderr() -> None:
    stderr = (
        "Input #0, mov,mp4 ...\n  Stream #0:0: Audio: aac\n"
        "[Parsed_loudnorm_1 @ 0x5559] \n{\n\t\"input_i\" : \"-27.61\",\n"
        "\t\"input_tp\" : \"-4.47\",\n\t\"input_lra\" : \"18.10\",\n"
        "\t\"input_thresh\" : \"-39.20\",\n\t\"output_i\" : \"-23.01\",\n"
        "\t\"normalization_type\" : \"dynamic\",\n\t\"target_offset\" : \"-inf\"\n}\n"
        "[out#0/null @ 0x1] video:0kB audio:1kB\n"
    )
    stats = _loudnorm_stats(stderr)
    assert stats["input_i"] == -27.61 and stats["normalization_type"] == "dynamic"
    assert stats["target_offset"] == float("-inf")
    with pytest.raises(PermanentError):
        _loudnorm_stats("no json here {\"other\": 1}")
