"""Segment-parallel encoding loses nothing: split, encode the parts apart, join them, and the
result is the single-pass encode's equal — every frame, the audio in sync, about the size.

The source has B-frames (x264 ``veryfast``), so parts start with negative decode times and
edit lists: the case where naive splitting and joining drops or duplicates frames.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest

from functions.concat.handler import handle
from functions.encode_part.handler import encode_args, keyframe_times
from functions.registry import FUNCTIONS
from functions.segment.handler import Packet, plan_parts
from shared.errors import PermanentError
from shared.events import StageTask
from shared.media import Binaries, FFmpegRunner, VideoStream
from shared.params.hls import ConcatParams, EncodePartParams, rung_size
from shared.settings import load_settings
from shared.stage import StageContext
from tests.support.media import ffprobe_json
from tests.support.nats import fetch_output, running, submit_job, wait_for_job

pytestmark = pytest.mark.timeout(120)

FPS = 25
SECONDS = 8


def run(binaries: Binaries, *args: str) -> bytes:
    out = subprocess.run([binaries.ffmpeg, "-hide_banner", "-nostdin", "-v", "error", "-y",
                          *args], check=True, capture_output=True, timeout=120)
    return out.stdout


def packets(binaries: Binaries, path: Path, stream: str) -> list[dict[str, Any]]:
    out = subprocess.run([binaries.ffprobe, "-v", "error", "-select_streams", stream,
                          "-show_entries", "packet=size,flags,pts_time", "-of", "json",
                          str(path)], check=True, capture_output=True, timeout=60)
    result: list[dict[str, Any]] = json.loads(out.stdout)["packets"]
    return result


def stream_md5(binaries: Binaries, path: Path, stream: str) -> bytes:
    """MD5 of a stream's packets, copied: equal only for the very same bitstream."""
    return run(binaries, "-i", str(path), "-map", f"0:{stream}", "-c", "copy", "-f", "md5", "-")


@pytest.fixture(scope="module")
def bframe_clip(binaries: Binaries, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bframes") / "bframes.mp4"
    run(binaries, "-f", "lavfi", "-i", f"testsrc2=size=640x360:rate={FPS}",
        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000",
        "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-g", str(FPS),
        "-c:a", "aac", "-t", str(SECONDS), "-threads", "2", str(path))
    return path


async def test_split_encode_join_is_exact(make_settings, bframe_clip: Path, binaries: Binaries,
                                          tmp_path: Path) -> None:
    source_frames = len(packets(binaries, bframe_clip, "v:0"))
    assert source_frames == FPS * SECONDS
    # Parts of 3 s, HLS segments of 2 s: keyframes must still fall on the 2 s grid of the
    # whole video, wherever a part starts.
    # Not progressive: this is the plain split (video only, parts on the 3 s grid).
    params = {"segment_seconds": 2, "part_seconds": 3, "ladder": [360, 240],
              "progressive": False}
    # The test reads the intermediates (parts, joined renditions, audio) after success.
    settings = make_settings(concurrency=2, keep_intermediates=True)
    async with running(settings, list(FUNCTIONS.values())) as rt:
        job_id = await submit_job(rt, [bframe_clip], recipe="hls", params=params)
        record = await wait_for_job(rt.services, job_id, timeout=100)
        assert record.status == "succeeded", record.error
        out = {r: await fetch_output(rt, record, f"concat_{r}", "video", tmp_path / f"{r}.mp4")
               for r in ("360p", "240p")}
        audio = await fetch_output(rt, record, "audio", "audio", tmp_path / "audio.m4a")
        parts = [await fetch_output(rt, record, "segment", f"part.{i:04d}",
                                    tmp_path / f"part{i}.mkv") for i in range(3)]
        store = rt.services.store
        audio_objects = sorted(o.key.rsplit("/", 1)[1]
                               for o in await store.list(f"jobs/{job_id}/audio/"))
        audio_manifest = msgspec.json.decode(
            await store.get_bytes(f"jobs/{job_id}/audio/manifest.json"))

    # segment: three stream-copied parts cut at keyframes on the 3 s grid, every frame once
    segment = record.steps["segment"].meta
    assert segment["count"] == 3 and segment["frames"] == [75, 75, 50]
    assert segment["starts"] == [0.0, 3.0, 6.0] and segment["durations"] == [3.0, 3.0, 2.0]
    source_bytes = sum(int(p["size"]) for p in packets(binaries, bframe_clip, "v:0"))
    part_packets = [packets(binaries, part, "v:0") for part in parts]
    assert all(pk[0]["flags"].startswith("K") for pk in part_packets)
    assert sum(int(p["size"]) for pk in part_packets for p in pk) == source_bytes  # no re-encode
    assert all([s["codec_type"] for s in ffprobe_json(binaries, part)["streams"]] == ["video"]
               for part in parts)

    for rendition, path in out.items():
        info = ffprobe_json(binaries, path)
        streams = {s["codec_type"]: s for s in info["streams"]}
        # every frame, once, in order
        video_packets = packets(binaries, path, "v:0")
        assert len(video_packets) == source_frames, rendition
        times = sorted(float(p["pts_time"]) for p in video_packets)
        assert all(abs(b - a - 1 / FPS) < 1e-3 for a, b in itertools.pairwise(times))
        keys = [round(float(p["pts_time"]), 3) for p in video_packets if "K" in p["flags"]]
        # the 2 s grid (HLS cuts identically in every rung) plus each part's first frame
        assert keys == [0.0, 2.0, 3.0, 4.0, 6.0], rendition
        # the audio was encoded once and copied in: the very same bitstream in each rung
        assert stream_md5(binaries, path, "a:0") == stream_md5(binaries, audio, "a:0")
        offset = float(streams["audio"]["start_time"]) - float(streams["video"]["start_time"])
        assert abs(offset) <= 1 / FPS, (rendition, offset)
        assert abs(float(info["format"]["duration"]) - SECONDS) <= 0.1
    steps = record.steps
    assert steps["audio"].attempt == 1 and not steps["audio"].from_checkpoint
    assert audio_objects == ["audio.m4a", "manifest.json"] and audio_manifest["attempt"] == 1
    for r in ("360p", "240p"):
        assert [s["codec_type"] for s in ffprobe_json(binaries, tmp_path / f"{r}.mp4")[
            "streams"]] == ["video", "audio"]

    # about the size of one encode of the whole clip with the same settings
    spec = record.steps["encode_360p"].params
    single = tmp_path / "single.mp4"
    video = VideoStream(fps=float(FPS), rotation=0)
    run(binaries, *encode_args(bframe_clip, single, msgspec.convert(spec, EncodePartParams),
                               video, rung_size(640, 360, 360), 0.0, float(SECONDS)))
    single_bytes = sum(int(p["size"]) for p in packets(binaries, single, "v:0"))
    joined_bytes = sum(int(p["size"]) for p in packets(binaries, out["360p"], "v:0"))
    print(f"joined/single video bytes: {joined_bytes}/{single_bytes} = "
          f"{joined_bytes / single_bytes:.4f}")
    assert abs(joined_bytes / single_bytes - 1) <= 0.03, (joined_bytes, single_bytes)
    assert len(packets(binaries, single, "v:0")) == source_frames


def _packets(count: int, every: int, fps: float = 25.0) -> list[Packet]:
    return [Packet(time=i / fps, duration=1 / fps, key=i % every == 0, discard=False)
            for i in range(count)]


def test_plan_cuts_at_the_first_keyframe_on_or_after_each_multiple() -> None:
    plan = plan_parts(_packets(200, 25), 2.0)
    assert plan.cuts == [50, 100, 150] and plan.frames == [50] * 4
    assert plan.starts == [0.0, 2.0, 4.0, 6.0] and plan.durations == pytest.approx([2.0] * 4)
    # keyframes every 3 s, parts of 2 s: cut at 3 (the first on/after 2) and 6 (after 4)
    plan = plan_parts(_packets(200, 75), 2.0)
    assert plan.cuts == [75, 150] and plan.frames == [75, 75, 50]
    # one keyframe only: one part, however long
    assert plan_parts(_packets(200, 1000), 2.0).frames == [200]


def test_plan_tolerates_float_noise_reordering_and_discarded_frames() -> None:
    packets = _packets(100, 25)
    packets[50] = Packet(time=1.99995, duration=0.04, key=True, discard=False)
    assert plan_parts(packets, 2.0).cuts == [50]
    # B-frames: decode order differs from presentation order; starts use the earliest frame
    reordered = [Packet(time=t, duration=0.04, key=k, discard=False) for t, k in
                 [(0.0, True), (0.08, False), (0.04, False), (0.16, False), (0.12, False),
                  (0.2, True), (0.28, False), (0.24, False)]]
    plan = plan_parts(reordered, 0.2)
    assert plan.cuts == [5] and plan.frames == [5, 3]
    assert plan.starts == pytest.approx([0.0, 0.2]) and plan.durations == pytest.approx(
        [0.2, 0.12])
    # an edit list's discarded lead-in neither counts as a frame nor moves time zero
    lead = [Packet(time=-0.08, duration=0.04, key=True, discard=True), *_packets(50, 25)]
    plan = plan_parts(lead, 0.5)
    assert plan.frames == [25, 25] and plan.starts == pytest.approx([0.0, 1.0])
    # ... but a stream copy keeps it: the part that holds it says how many frames to drop
    assert plan.skips == [1, 0] and plan.origin == 0.0


def test_a_short_first_part_then_the_grid() -> None:
    # keyframes every second, a first part of 1 s, then parts of 4 s on the 4 s grid
    plan = plan_parts(_packets(250, 25), 4.0, first_part_seconds=1.0)
    assert plan.starts == pytest.approx([0.0, 1.0, 4.0, 8.0])
    assert plan.frames == [25, 75, 100, 50] and plan.skips == [0, 0, 0, 0]
    assert plan_parts(_packets(250, 25), 4.0).starts == pytest.approx([0.0, 4.0, 8.0])


def test_keyframes_sit_on_the_whole_videos_grid() -> None:
    assert keyframe_times(0.0, 8.0, 2.0) == [0.0, 1.998, 3.998, 5.998]
    assert keyframe_times(3.0, 3.0, 2.0) == [0.0, 0.998]  # a part starting at 3 s: 4 s mark
    assert keyframe_times(4.0, 2.0, 2.0) == [0.0]  # starts on the grid: its first frame


async def test_concat_refuses_a_join_that_lost_frames(binaries: Binaries, tmp_path: Path) -> None:
    """The join is checked against what the parts say they hold: a mismatch fails the step
    with a stable code and says which check failed."""
    parts = {}
    for i in range(2):
        path = tmp_path / f"video.{i:04d}.mp4"
        run(binaries, "-f", "lavfi", "-i", f"testsrc2=size=160x90:rate={FPS}", "-t", "1",
            "-c:v", "libx264", "-preset", "ultrafast", str(path))
        parts[f"video.{i:04d}"] = path
    runner = FFmpegRunner(binaries)
    services: Any = type("S", (), {"media": staticmethod(lambda: (binaries, runner)),
                                   "settings": load_settings({})})()
    task = StageTask(job_id="j", tenant="default", step="concat", stage="concat", attempt=1)

    def context(frames: int) -> StageContext[ConcatParams]:
        (tmp_path / f"w{frames}").mkdir()
        return StageContext(task=task, params=ConcatParams(name="x"),
                            workdir=tmp_path / f"w{frames}", services=services,
                            inputs={"encode": parts},
                            meta={"encode": {"parts": [{"frames": frames, "duration_s": 1.0}] * 2}})

    result = await handle(task, context(FPS))
    assert result.meta["frames"] == 2 * FPS and result.meta["duration_s"] == 2.0
    with pytest.raises(PermanentError) as err:
        await handle(task, context(FPS + 1))
    assert err.value.code == "ffmpeg_failed"
    assert err.value.details == {"check": "frame count", "frames": 2 * FPS,
                                 "expected_frames": 2 * FPS + 2}


# --------------------------------------------------------------------------------------------
# Variable frame rate: a browser-style recording (VP8/Vorbis WebM, millisecond timestamps that
# jitter around a nominal 30 fps, and gaps where frames were dropped) with a flash-and-beep
# sync marker near its end.

VFR_NOMINAL_FPS = 30
MARK_S = 2.4
"""When the source flashes white and beeps (its first bright frame is the first at/after)."""
SYNC_TOLERANCE_S = 0.040


def stderr_of(binaries: Binaries, *args: str) -> str:
    out = subprocess.run([binaries.ffmpeg, "-hide_banner", "-nostdin", *args], check=True,
                         capture_output=True, timeout=120)
    return out.stderr.decode()


def flash_time(binaries: Binaries, path: Path) -> float:
    """Presentation time of the first frame whose mean luma is bright (the white flash)."""
    log = stderr_of(binaries, "-i", str(path), "-map", "0:v:0", "-vf",
                    "signalstats,metadata=print:key=lavfi.signalstats.YAVG", "-f", "null", "-")
    times = re.findall(r"pts_time:(\S+)\s*\n.*YAVG=([0-9.]+)", log)
    start = float(ffprobe_json(binaries, path)["streams"][0].get("start_time") or 0)
    bright = [float(t) for t, y in times if float(y) > 128]
    assert bright, "no flash found"
    return bright[0] - start


def beep_time(binaries: Binaries, path: Path, *, origin: float) -> float:
    """When the audio first stops being silent (the beep), relative to ``origin``."""
    log = stderr_of(binaries, "-i", str(path), "-map", "0:a:0", "-af",
                    "silencedetect=n=-40dB:d=0.05", "-f", "null", "-")
    ends = [float(t) for t in re.findall(r"silence_end: ([0-9.]+)", log)]
    assert ends, "no beep found"
    return ends[0] - origin


def video_span(binaries: Binaries, path: Path) -> tuple[list[float], float]:
    """Frame times from the first frame (sorted) and the video's length: the last frame's
    end, from its own packet duration when the file has one."""
    out = subprocess.run([binaries.ffprobe, "-v", "error", "-select_streams", "v:0",
                          "-show_entries", "packet=pts_time,duration_time", "-of", "json",
                          str(path)], check=True, capture_output=True, timeout=60)
    pkts = json.loads(out.stdout)["packets"]
    times = sorted(float(p["pts_time"]) for p in pkts)
    last = max(pkts, key=lambda p: float(p["pts_time"]))
    # An MP4 made with B-frames leaves packet durations unset: then the last frame lasts
    # the median interval, as concat's own check measures it.
    steps = sorted(b - a for a, b in itertools.pairwise(times))
    last_duration = float(last.get("duration_time") or steps[len(steps) // 2])
    t0 = times[0]
    return [t - t0 for t in times], times[-1] + last_duration - t0


@pytest.fixture(scope="module")
def vfr_marker_clip(binaries: Binaries, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vfr") / "recording.webm"
    # Timestamps in milliseconds: the nominal 30 fps grid, a +-6 ms jitter and a dropped
    # frame's gap every 9 frames; the encoder counts in milliseconds so they survive.
    times = "(N/30+0.006*sin(N*1.7)+0.03*floor(N/9))/TB"
    run(binaries, "-f", "lavfi", "-i", f"color=c=black:s=160x90:r={VFR_NOMINAL_FPS}:d=3",
        "-f", "lavfi", "-i",
        f"aevalsrc='if(between(t,{MARK_S},{MARK_S + 0.1}),0.5*sin(2*PI*1000*t),0)'"
        ":s=48000:d=3",
        "-filter:v", f"settb=1/1000,setpts='{times}',"
        f"drawbox=c=white:t=fill:enable='gte(t,{MARK_S})*lt(t,{MARK_S + 0.04})',"
        "noise=alls=8:allf=t",
        "-fps_mode", "passthrough", "-enc_time_base:v", "1:1000", "-c:v", "libvpx", "-g", "8",
        "-b:v", "200k", "-c:a", "libvorbis", "-t", "3", str(path))
    return path


async def test_vfr_source_joins_exactly_and_stays_in_sync(
        make_settings, vfr_marker_clip: Path, binaries: Binaries, tmp_path: Path) -> None:
    """Split at keyframes, encode apart, join: every source frame keeps its own time, the
    joined video is as long as the source's (within one frame), and the audio is in sync
    within 40 ms at the start and at the marker near the end."""
    source_times, source_length = video_span(binaries, vfr_marker_clip)
    gaps = [b - a for a, b in itertools.pairwise(source_times)]
    # The source really is what it claims: VFR with jitter and dropped-frame gaps...
    assert max(gaps) > 1.5 / VFR_NOMINAL_FPS and max(gaps) - min(gaps) > 0.010
    assert any(abs(g - 1 / VFR_NOMINAL_FPS) > 0.002 for g in gaps)
    # ...with its flash and beep together near the end.
    source_flash = flash_time(binaries, vfr_marker_clip)
    source_beep = beep_time(binaries, vfr_marker_clip, origin=0.0)
    assert abs(source_flash - MARK_S) < 1 / VFR_NOMINAL_FPS + 0.01
    assert abs(source_beep - MARK_S) < SYNC_TOLERANCE_S

    params = {"segment_seconds": 1, "part_seconds": 0.5, "ladder": [90]}
    async with running(make_settings(concurrency=2), list(FUNCTIONS.values())) as rt:
        job_id = await submit_job(rt, [vfr_marker_clip], recipe="hls", params=params)
        record = await wait_for_job(rt.services, job_id, timeout=100)
        assert record.status == "succeeded", record.error
        joined = await fetch_output(rt, record, "concat_90p", "video", tmp_path / "90p.mp4")
    assert record.steps["segment"].meta["count"] >= 4  # really split into several parts

    times, length = video_span(binaries, joined)
    # Every frame, each at its own source time (to the millisecond the WebM carries).
    assert len(times) == len(source_times)
    assert max(abs(a - b) for a, b in zip(times, source_times, strict=True)) < 0.0015
    assert abs(length - source_length) <= 1 / VFR_NOMINAL_FPS, (length, source_length)
    info = ffprobe_json(binaries, joined)
    streams = {s["codec_type"]: s for s in info["streams"]}
    video_start = float(streams["video"]["start_time"])
    # Start: audio and picture begin together; end: the marker's flash and beep agree.
    assert abs(float(streams["audio"]["start_time"]) - video_start) <= SYNC_TOLERANCE_S
    flash = flash_time(binaries, joined)
    beep = beep_time(binaries, joined, origin=video_start)
    assert abs(flash - beep) <= SYNC_TOLERANCE_S, (flash, beep)
    assert abs(flash - source_flash) <= 0.002, (flash, source_flash)
