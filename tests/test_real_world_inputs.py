"""Inputs as people really upload them, through the bus with recipe ``web``.

Each input is made here with the real ffmpeg, then checked to really have the property the
test is about (odd size, rotation, variable frame rate, 10 bits, a lying duration, ...), so
a change in how ffmpeg writes files cannot quietly turn a test into a plain-clip test.
"""

from __future__ import annotations

import itertools
import math
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from functions.conductor import function as conductor
from functions.probe import function as probe
from functions.thumbnail import function as thumbnail
from functions.transcode import function as transcode
from shared.jobstate import JobRecord
from shared.media import Binaries
from shared.runtime import Runtime
from tests.support.media import MakeClip, MakeFile, ffprobe_json, file_maker
from tests.support.nats import fetch_output, running, submit_job, wait_for_job

pytestmark = pytest.mark.timeout(120)



@pytest.fixture
async def runtime(make_settings):  # type: ignore[no-untyped-def]
    async with running(make_settings(), [conductor, probe, transcode, thumbnail]) as rt:
        yield rt


@pytest.fixture(scope="session")
def make(binaries: Binaries, tmp_path_factory: pytest.TempPathFactory) -> MakeFile:
    """``make(name, ffmpeg_args)`` -> the file ffmpeg wrote (args end before the output)."""
    return file_maker(binaries, tmp_path_factory.mktemp("real-world"))


SOURCE = ["-f", "lavfi", "-i", "testsrc2=size=640x360:rate=25",
          "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"]
X264 = ["-c:v", "libx264", "-preset", "ultrafast"]


async def web(runtime: Runtime, path: Path, *, timeout: float = 60.0) -> JobRecord:
    job_id = await submit_job(runtime, [path], recipe="web")
    return await wait_for_job(runtime.services, job_id, timeout=timeout)


async def outputs(runtime: Runtime, record: JobRecord, binaries: Binaries,
                  tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """ffprobe of (video, poster) of a succeeded web job."""
    assert record.status == "succeeded", record.error
    video = await fetch_output(runtime, record, "transcode", "video", tmp_path / "video.mp4")
    poster = await fetch_output(runtime, record, "poster", "poster", tmp_path / "poster.jpg")
    assert poster.read_bytes()[:3] == b"\xff\xd8\xff"
    return ffprobe_json(binaries, video), ffprobe_json(binaries, poster)


def stream(info: dict[str, Any], kind: str) -> dict[str, Any]:
    found = [s for s in info["streams"] if s["codec_type"] == kind]
    assert len(found) == 1, info["streams"]
    return found[0]


def duration(info: dict[str, Any]) -> float:
    return float(info["format"]["duration"])


def rotation(video: dict[str, Any]) -> int:
    return next((int(s["rotation"]) for s in video.get("side_data_list", [])
                 if "rotation" in s), 0)


def decoded_frames(binaries: Binaries, path: Path) -> int:
    """Video frames a decoder gets out of ``path`` (an edit list may hide some packets)."""
    out = subprocess.run([binaries.ffprobe, "-v", "error", "-select_streams", "v:0",
                          "-count_frames", "-show_entries", "stream=nb_read_frames",
                          "-of", "csv=p=0", str(path)], capture_output=True, check=True,
                         timeout=60)
    return int(out.stdout)


def frame_times(binaries: Binaries, path: Path) -> list[float]:
    """Presentation times of the video frames, in display order."""
    out = subprocess.run([binaries.ffprobe, "-v", "error", "-select_streams", "v:0",
                          "-show_entries", "packet=pts_time", "-of", "csv=p=0", str(path)],
                         capture_output=True, check=True, timeout=60)
    return sorted(float(line) for line in out.stdout.split())


def assert_failed_once(record: JobRecord, code: str) -> None:
    """Failed with ``code``, and no step ran more than once (never retried)."""
    assert record.status == "failed"
    assert record.error is not None and record.error.code == code, record.error
    assert {s.attempt for s in record.steps.values()} <= {0, 1}


async def test_odd_dimensions_give_even_output_with_the_same_shape(  # type: ignore[no-untyped-def]
    runtime, make, binaries, tmp_path
) -> None:
    # x264 needs even sizes for 4:2:0, so an odd-sized source is 4:4:4 (as screen recorders
    # write them); the output is still 4:2:0 and even.
    src = make("odd.mp4", [*SOURCE, "-t", "2", "-vf", "scale=641:361,setsar=1", *X264,
                           "-pix_fmt", "yuv444p", "-c:a", "aac"])
    v = stream(ffprobe_json(binaries, src), "video")
    assert (v["width"], v["height"]) == (641, 361)

    video, poster = await outputs(runtime, await web(runtime, src), binaries, tmp_path)
    out = stream(video, "video")
    assert (out["width"], out["height"]) == (640, 360)
    # Square pixels, not the 5769:5776 that a plain scale to even sizes leaves behind.
    assert out["sample_aspect_ratio"] == "1:1" and out["display_aspect_ratio"] == "16:9"
    assert out["pix_fmt"] == "yuv420p" and out["profile"] == "High"
    assert abs(640 / 360 - 641 / 361) < 0.01
    assert (stream(poster, "video")["width"], stream(poster, "video")["height"]) == (640, 360)


async def test_portrait_phone_video_comes_out_upright(  # type: ignore[no-untyped-def]
    runtime, make_clip: MakeClip, binaries, tmp_path
) -> None:
    src = make_clip("portrait", duration=2.0, rotate=90)
    v = stream(ffprobe_json(binaries, src), "video")
    assert (v["width"], v["height"], abs(rotation(v))) == (640, 360, 90)

    record = await web(runtime, src)
    video, poster = await outputs(runtime, record, binaries, tmp_path)
    out = stream(video, "video")
    assert (out["width"], out["height"]) == (360, 640)
    assert rotation(out) == 0  # turned in the pixels, not flagged to be turned again
    pic = stream(poster, "video")
    assert pic["width"] < pic["height"]
    assert (pic["width"], pic["height"]) == (360, 640)


async def test_audio_only_input_fails_fast_with_no_video_stream(  # type: ignore[no-untyped-def]
    runtime, make_clip: MakeClip
) -> None:
    src = make_clip("audio-only", duration=2.0, video=False, container="m4a")
    record = await web(runtime, src, timeout=15)
    assert_failed_once(record, "no_video_stream")
    assert record.error is not None and "no video stream" in record.error.message
    assert record.steps["probe"].status == "done"


async def test_video_without_audio_gives_video_only(  # type: ignore[no-untyped-def]
    runtime, make_clip: MakeClip, binaries, tmp_path
) -> None:
    src = make_clip("silent", duration=2.0, audio=False)
    record = await web(runtime, src)
    video, _ = await outputs(runtime, record, binaries, tmp_path)
    assert [s["codec_type"] for s in video["streams"]] == ["video"]
    assert record.steps["transcode"].meta["acodec"] is None
    assert abs(duration(video) - 2.0) <= 0.1


@pytest.fixture(scope="session")
def vfr_clip(make: MakeFile, binaries: Binaries) -> Path:
    """One second at 30 fps, then one second at 10 fps, timestamps kept as they are."""
    src = make("vfr.mp4", [
        "-f", "lavfi", "-i", "testsrc2=size=320x180:rate=30",
        "-f", "lavfi", "-i", "testsrc2=size=320x180:rate=10",
        "-f", "lavfi", "-i", "sine=sample_rate=48000",
        "-filter_complex", "[0:v]trim=duration=1,setpts=PTS-STARTPTS[a];"
                           "[1:v]trim=duration=1,setpts=PTS-STARTPTS[b];[a][b]concat=n=2[v]",
        "-map", "[v]", "-map", "2:a", "-t", "2", *X264, "-fps_mode", "vfr", "-c:a", "aac"])
    v = stream(ffprobe_json(binaries, src), "video")
    assert v["r_frame_rate"] != v["avg_frame_rate"] and int(v["nb_frames"]) == 40
    return src


async def test_variable_frame_rate_keeps_its_timing(  # type: ignore[no-untyped-def]
    runtime, vfr_clip, binaries, tmp_path
) -> None:
    source = ffprobe_json(binaries, vfr_clip)
    record = await web(runtime, vfr_clip)
    video, _ = await outputs(runtime, record, binaries, tmp_path)
    assert abs(duration(video) - duration(source)) <= 0.1
    out = stream(video, "video")
    assert int(out["nb_frames"]) == decoded_frames(binaries, vfr_clip)  # none added or lost
    # Each frame keeps its time: the fast second 1/30 s apart, then 0.1 s apart (the source's
    # 40th frame lies outside its edit list, so no decoder shows it).
    times = frame_times(binaries, tmp_path / "video.mp4")
    assert times == pytest.approx([i / 30 for i in range(30)] + [1 + i / 10 for i in range(9)],
                                  abs=0.002)


async def test_browser_recording_keeps_its_jittery_timestamps(  # type: ignore[no-untyped-def]
    runtime, make, binaries, tmp_path
) -> None:
    """A MediaRecorder-style WebM: millisecond timestamps jittering around 30 fps. Each frame
    keeps its own time to the millisecond (an encoder counting in 1/30 s would round them
    onto the grid, off by up to 16 ms)."""
    src = make("recording.webm", [
        "-f", "lavfi", "-i", "testsrc2=size=160x90:rate=30", "-t", "1.5",
        "-vf", "settb=1/1000,setpts='(N/30+0.006*sin(N*1.7))/TB'",
        "-fps_mode", "passthrough", "-enc_time_base:v", "1:1000", "-c:v", "libvpx",
        "-b:v", "200k"])
    times = frame_times(binaries, src)
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(times)]
    assert len(set(gaps)) > 3 and max(gaps) - min(gaps) > 0.008  # really jittery
    record = await web(runtime, src)
    assert record.status == "succeeded", record.error
    await fetch_output(runtime, record, "transcode", "video", tmp_path / "video.mp4")
    out = frame_times(binaries, tmp_path / "video.mp4")
    assert len(out) == len(times)
    assert max(abs((a - times[0]) - (b - out[0])) for a, b in zip(times, out,
                                                                   strict=True)) < 0.0015


@pytest.mark.parametrize(("fps", "rate"), [
    (15, "15/1"),
    # Above the source's average rate: constant at that average (no frames invented).
    (30, "400/19"),
])
async def test_variable_frame_rate_to_constant(  # type: ignore[no-untyped-def]
    runtime, vfr_clip, binaries, tmp_path, fps, rate
) -> None:
    job_id = await submit_job(runtime, [vfr_clip], steps={
        "probe": {"stage": "probe", "uses": [":input"]},
        "transcode": {"stage": "transcode", "uses": [":input", "probe"],
                      "params": {"fps": fps}}})
    record = await wait_for_job(runtime.services, job_id)
    assert record.status == "succeeded", record.error
    path = await fetch_output(runtime, record, "transcode", "video", tmp_path / "cfr.mp4")
    video = ffprobe_json(binaries, path)
    out = stream(video, "video")
    assert out["r_frame_rate"] == out["avg_frame_rate"] == rate
    assert abs(duration(video) - duration(ffprobe_json(binaries, vfr_clip))) <= 0.1


@pytest.mark.parametrize("vcodec", ["libx264", "libx265"])
async def test_ten_bit_input_gives_eight_bit_output(  # type: ignore[no-untyped-def]
    runtime, make_clip: MakeClip, binaries, tmp_path, vcodec
) -> None:
    src = make_clip(f"ten-bit-{vcodec}", duration=1.0, vcodec=vcodec, pix_fmt="yuv420p10le")
    v = stream(ffprobe_json(binaries, src), "video")
    assert v["pix_fmt"] == "yuv420p10le" and v["profile"] in ("High 10", "Main 10")

    video, _ = await outputs(runtime, await web(runtime, src), binaries, tmp_path)
    out = stream(video, "video")
    assert out["pix_fmt"] == "yuv420p" and out["profile"] == "High"


async def test_one_frame_clip(runtime, make, binaries, tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = make("one-frame.mp4", ["-f", "lavfi", "-i", "testsrc2=size=640x360:rate=25",
                                 "-frames:v", "1", *X264])
    assert int(stream(ffprobe_json(binaries, src), "video")["nb_frames"]) == 1

    record = await web(runtime, src)
    video, poster = await outputs(runtime, record, binaries, tmp_path)
    assert int(stream(video, "video")["nb_frames"]) == 1
    assert duration(video) < 0.1
    assert record.steps["transcode"].meta["frames"] == 1
    assert record.steps["poster"].meta["at_s"] == 0
    assert (stream(poster, "video")["width"], stream(poster, "video")["height"]) == (640, 360)


def _mkv_with_duration(src: Path, seconds: float) -> Path:
    """A copy of a Matroska file whose Segment Duration element says ``seconds``."""
    data = bytearray(src.read_bytes())
    at = data.find(b"\x44\x89\x88")  # Duration, an 8-byte float, in milliseconds here
    assert at > 0, "no 8-byte Duration element"
    data[at + 3:at + 11] = struct.pack(">d", seconds * 1000.0)
    out = src.with_name(f"lies-{seconds:g}s.mkv")
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("claimed_s", [3600.0, 0.5])
async def test_container_duration_that_lies(  # type: ignore[no-untyped-def]
    runtime, make, binaries, tmp_path, claimed_s
) -> None:
    real = make("real-2s.mkv", [*SOURCE, "-t", "2", *X264, "-c:a", "libopus"])
    src = _mkv_with_duration(real, claimed_s)
    assert float(ffprobe_json(binaries, src)["format"]["duration"]) == claimed_s

    record = await web(runtime, src)
    assert record.steps["probe"].meta["duration_s"] == claimed_s
    video, _ = await outputs(runtime, record, binaries, tmp_path)
    assert abs(duration(video) - 2.0) <= 0.1  # the content, not the claim
    assert int(stream(video, "video")["nb_frames"]) == 50


@pytest.fixture(scope="session")
def ts_readable(make: MakeFile) -> Path:
    """An MPEG-TS file (no duration field). The bundled static ffprobe used to crash on
    these (shared.media.child_env): this input must now go through like any other."""
    return make("no-duration.ts", [*SOURCE, "-t", "2", *X264, "-c:a", "aac"])


async def test_transport_stream_without_a_duration_field(  # type: ignore[no-untyped-def]
    runtime, ts_readable, binaries, tmp_path
) -> None:
    record = await web(runtime, ts_readable)
    video, _ = await outputs(runtime, record, binaries, tmp_path)
    assert abs(duration(video) - 2.0) <= 0.1


async def test_truncated_file_is_invalid_input(runtime, make, tmp_path) -> None:  # type: ignore[no-untyped-def]
    whole = make("moov-at-end.mp4", [*SOURCE, "-t", "3", *X264, "-c:a", "aac"])
    data = whole.read_bytes()
    assert data.find(b"mdat") < data.find(b"moov")  # not faststart: the index is at the end
    cut = tmp_path / "truncated.mp4"
    cut.write_bytes(data[: math.floor(len(data) * 0.3)])

    record = await web(runtime, cut, timeout=15)
    assert_failed_once(record, "invalid_input")
    assert record.steps["probe"].status == "failed"


async def test_truncated_faststart_file_is_invalid_input(  # type: ignore[no-untyped-def]
    runtime, make, binaries, tmp_path
) -> None:
    """The index survives at the front, so probe is happy; the media ends early, which
    ffmpeg only logs. A 1-second "rendition" of a 3-second upload must not succeed."""
    whole = make("faststart.mp4", [*SOURCE, "-t", "3", *X264, "-c:a", "aac",
                                   "-movflags", "+faststart"])
    data = whole.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")
    cut = tmp_path / "cut-upload.mp4"
    cut.write_bytes(data[: math.floor(len(data) * 0.3)])
    assert float(ffprobe_json(binaries, cut)["format"]["duration"]) == 3.0

    record = await web(runtime, cut, timeout=30)
    assert_failed_once(record, "invalid_input")
    assert record.error is not None and "cut off" in record.error.message
