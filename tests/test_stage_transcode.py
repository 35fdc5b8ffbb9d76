"""The transcode stage through the bus: every codec, rate control, frame rate, audio codecs,
and params that cannot work refused before anything runs.

Each job is ``probe -> transcode`` as inline steps on a 1-second 160x90 clip, run by the real
conductor, probe and transcode functions on a real nats-server and the local store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from functions.conductor import function as conductor
from functions.probe import function as probe
from functions.transcode import function as transcode
from functions.transcode.handler import build
from shared.errors import PermanentError
from shared.media import MediaInfo
from shared.params.video import TranscodeParams
from shared.runtime import Runtime
from tests.support.media import MakeClip, ffprobe_json
from tests.support.nats import fetch_output, running, submit_job, wait_for_job

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def runtime(make_settings):  # type: ignore[no-untyped-def]
    async with running(make_settings(), [conductor, probe, transcode]) as rt:
        yield rt


@pytest.fixture(scope="session")
def clip(make_clip: MakeClip) -> Path:
    return make_clip("tiny", duration=1.0, width=160, height=90, fps=25)


def steps(**params: Any) -> dict[str, Any]:
    return {"probe": {"stage": "probe", "uses": [":input"]},
            "transcode": {"stage": "transcode", "uses": [":input", "probe"], "params": params}}


async def render(runtime: Runtime, clip: Path, tmp_path: Path, binaries,  # type: ignore[no-untyped-def]
                 **params: Any) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Run probe -> transcode with ``params``; (ffprobe of the output, step meta, key)."""
    job_id = await submit_job(runtime, [clip], steps=steps(**params))
    record = await wait_for_job(runtime.services, job_id)
    assert record.status == "succeeded", record.error
    key = record.steps["transcode"].outputs["video"]
    out = await fetch_output(runtime, record, "transcode", "video",
                             tmp_path / f"out-{job_id}{Path(key).suffix}")
    return ffprobe_json(binaries, out), record.steps["transcode"].meta, key


def streams(info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["codec_type"]: s for s in info["streams"]}


@pytest.mark.parametrize(("vcodec", "codec_name", "suffix", "format_name", "acodec"), [
    ("h264", "h264", ".mp4", "mov,mp4", "aac"),
    ("hevc", "hevc", ".mp4", "mov,mp4", "aac"),
    ("vp9", "vp9", ".webm", "matroska,webm", "opus"),
    ("av1", "av1", ".mp4", "mov,mp4", "aac"),
])
async def test_each_video_codec(runtime, clip, tmp_path, binaries,  # type: ignore[no-untyped-def]
                                vcodec, codec_name, suffix, format_name, acodec) -> None:
    info, meta, key = await render(runtime, clip, tmp_path, binaries, vcodec=vcodec)
    assert key.endswith("/transcode/video" + suffix)
    assert info["format"]["format_name"].startswith(format_name)
    v, a = streams(info)["video"], streams(info)["audio"]
    assert v["codec_name"] == codec_name
    assert v["pix_fmt"] == "yuv420p"
    assert (v["width"], v["height"]) == (160, 90)
    assert v.get("sample_aspect_ratio", "1:1") == "1:1"
    assert a["codec_name"] == acodec and a["channels"] == 2
    assert abs(float(info["format"]["duration"]) - 1.0) <= 0.1
    assert meta == {"width": 160, "height": 90, "vcodec": vcodec, "acodec": acodec,
                    "container": suffix[1:], "fps": None, "frames": 25, "hdr": None,
                    "deinterlaced": False, "still": False}
    # Colour described on every output, whatever the codec: players need not guess.
    assert (v["color_space"], v["color_transfer"], v["color_primaries"],
            v["color_range"]) == ("bt709", "bt709", "bt709", "tv")
    if vcodec == "hevc":
        assert v["codec_tag_string"] == "hvc1"  # Apple players refuse hev1 in MP4
    if suffix == ".mp4":
        assert info["format"].get("tags", {}).keys() <= {"major_brand", "minor_version",
                                                          "compatible_brands", "encoder"}


def test_mp4_is_faststart(clip, binaries, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """moov before mdat, checked on the bytes (ffprobe cannot tell)."""
    import subprocess

    media = {"streams": [{"codec_type": "video", "width": 160, "height": 90, "fps": 25.0},
                         {"codec_type": "audio"}]}
    out = tmp_path / "v.mp4"
    args, _ = build(TranscodeParams(), media_info(media), clip, out)
    subprocess.run([binaries.ffmpeg, "-v", "error", "-y", *args], check=True, timeout=60)
    data = out.read_bytes()
    assert 0 < data.find(b"moov") < data.find(b"mdat")


async def test_crf_and_bitrate(runtime, clip, tmp_path, binaries) -> None:  # type: ignore[no-untyped-def]
    low, _, _ = await render(runtime, clip, tmp_path, binaries, crf=51)
    high, _, _ = await render(runtime, clip, tmp_path, binaries, crf=10)
    rate, _, _ = await render(runtime, clip, tmp_path, binaries, video_bitrate_k=400)
    size = {name: int(info["format"]["size"]) for name, info in
            (("crf51", low), ("crf10", high), ("400k", rate))}
    assert size["crf51"] < size["crf10"], size
    video_kbps = int(streams(rate)["video"]["bit_rate"]) / 1000
    assert 200 <= video_kbps <= 600, video_kbps  # ABR on one second: near the target


async def test_vp9_bitrate_mode(runtime, clip, tmp_path, binaries) -> None:  # type: ignore[no-untyped-def]
    info, _, _ = await render(runtime, clip, tmp_path, binaries, vcodec="vp9",
                              video_bitrate_k=300)
    assert streams(info)["video"]["codec_name"] == "vp9"
    assert int(info["format"]["bit_rate"]) / 1000 < 600


@pytest.mark.parametrize(("fps", "rate", "frames"), [
    (10, "10/1", 10),     # converted down: constant 10 fps
    (50, "25/1", 25),     # capped: a 25 fps source is never doubled up
    (12.5, "25/2", 13),   # fractional rates stay exact (the last frame is kept)
])
async def test_fps(runtime, clip, tmp_path, binaries, fps, rate, frames) -> None:  # type: ignore[no-untyped-def]
    info, meta, _ = await render(runtime, clip, tmp_path, binaries, fps=fps)
    v = streams(info)["video"]
    assert v["r_frame_rate"] == rate and v["avg_frame_rate"] == rate
    assert abs(int(v["nb_frames"]) - frames) <= 1
    assert abs(float(info["format"]["duration"]) - 1.0) <= 0.1
    assert meta["fps"] == pytest.approx(eval(rate))


@pytest.mark.parametrize(("vcodec", "audio_codec", "codec_name"), [
    ("h264", "aac", "aac"),
    ("h264", "mp3", "mp3"),
    ("h264", "opus", "opus"),
    ("vp9", "opus", "opus"),
])
async def test_audio_codecs(runtime, clip, tmp_path, binaries,  # type: ignore[no-untyped-def]
                            vcodec, audio_codec, codec_name) -> None:
    info, meta, _ = await render(runtime, clip, tmp_path, binaries, vcodec=vcodec,
                                 audio_codec=audio_codec, audio_bitrate_k=96)
    a = streams(info)["audio"]
    assert a["codec_name"] == codec_name and meta["acodec"] == audio_codec
    assert abs(float(a.get("duration") or info["format"]["duration"]) - 1.0) <= 0.1


@pytest.mark.parametrize(("params", "size"), [
    ({"max_height": 46}, (80, 46)),     # 81.8 wide -> 80: even, aspect within a pixel
    ({"max_width": 100}, (100, 56)),
    ({"max_height": 1080}, (160, 90)),  # never upscaled
])
async def test_fit(runtime, clip, tmp_path, binaries, params, size) -> None:  # type: ignore[no-untyped-def]
    info, meta, _ = await render(runtime, clip, tmp_path, binaries, **params)
    v = streams(info)["video"]
    assert (v["width"], v["height"]) == size == (meta["width"], meta["height"])
    assert v.get("sample_aspect_ratio", "1:1") == "1:1"


@pytest.mark.parametrize(("params", "field"), [
    ({"crf": 20, "video_bitrate_k": 500}, "video_bitrate_k"),
    ({"crf": 0}, "crf"),                       # lossless x264 is not web-playable
    ({"crf": 52}, "crf"),
    ({"vcodec": "vp9", "crf": 64}, "crf"),
    ({"vcodec": "vp9", "audio_codec": "aac"}, "audio_codec"),
    ({"vcodec": "vp9", "audio_codec": "mp3"}, "audio_codec"),
    ({"vcodec": "av1", "preset": "fast"}, "preset"),
    ({"vcodec": "mpeg2"}, "vcodec"),
    ({"fps": 0}, "fps"),
    ({"video_bitrate_k": 10}, "video_bitrate_k"),
    ({"audio_codec": "mp3", "audio_bitrate_k": 384}, "audio_bitrate_k"),
    ({"max_height": 8}, "max_height"),
    ({"size": "720p"}, "size"),
])
async def test_invalid_params_fail_the_job(runtime, clip, params, field) -> None:  # type: ignore[no-untyped-def]
    job_id = await submit_job(runtime, [clip], steps=steps(**params))
    record = await wait_for_job(runtime.services, job_id, timeout=15)
    assert record.status == "failed"
    assert record.error is not None and record.error.code == "invalid_recipe"
    assert "step 'transcode'" in record.error.message and field in record.error.message
    assert record.error.details == {"step": "transcode", "field": "params"}
    assert all(s.attempt == 0 for s in record.steps.values())  # nothing ran


def test_params_defaults_follow_the_codec() -> None:
    assert (TranscodeParams().container, TranscodeParams().effective_crf) == ("mp4", 23)
    vp9 = TranscodeParams(vcodec="vp9")
    assert (vp9.container, vp9.effective_crf, vp9.effective_audio_codec,
            vp9.effective_preset) == ("webm", 32, "opus", None)
    assert TranscodeParams(vcodec="hevc").effective_preset == "veryfast"
    assert TranscodeParams(video_bitrate_k=800).effective_crf is None


def media_info(raw: dict[str, Any]) -> MediaInfo:
    """Probe meta as the probe step reports it, typed as a stage gets it (``ctx.probe()``)."""
    return msgspec.convert(raw, MediaInfo)


MEDIA = {"streams": [
    {"index": 0, "codec_type": "audio"},
    {"index": 1, "codec_type": "video", "width": 600, "height": 600, "attached_pic": True},
    {"index": 2, "codec_type": "video", "width": 1920, "height": 1080, "fps": 30.0},
    {"index": 3, "codec_type": "audio"},
]}


def test_command_maps_the_first_picture_and_first_audio(tmp_path) -> None:  # type: ignore[no-untyped-def]
    args, meta = build(TranscodeParams(), media_info(MEDIA), tmp_path / "in.mov",
                       tmp_path / "video.mp4", threads=2)
    line = " ".join(args)
    assert "[0:v:1]" in line  # the cover art is video stream 0; the picture is 1
    assert "-map 0:a:0?" in line and args.count("-map") == 2
    for option in ("-movflags +faststart", "-map_metadata -1", "-pix_fmt yuv420p",
                   "-c:v libx264", "-profile:v high", "-crf 23", "-preset veryfast",
                   "-c:a aac", "-ac 2", "-threads 2", "-f mp4"):
        assert option in line, option
    assert args[-1].endswith("video.mp4")  # every option precedes the output
    assert (meta["width"], meta["height"]) == (1280, 720)


def test_command_turns_a_quarter_rotated_source(tmp_path) -> None:  # type: ignore[no-untyped-def]
    media = {"streams": [{"codec_type": "video", "width": 1920, "height": 1080,
                          "rotation": 90}]}
    _, meta = build(TranscodeParams(), media_info(media), tmp_path / "in", tmp_path / "out")
    assert (meta["width"], meta["height"]) == (404, 720)


def test_command_fits_anamorphic_video_by_its_displayed_shape(tmp_path) -> None:  # type: ignore[no-untyped-def]
    media = {"streams": [{"codec_type": "video", "width": 720, "height": 576,
                          "sar": "64:45"}]}  # PAL 16:9
    args, meta = build(TranscodeParams(max_height=576), media_info(media), tmp_path / "in",
                       tmp_path / "out")
    assert (meta["width"], meta["height"]) == (1024, 576)
    assert "setsar=r=sar*1/1" in " ".join(args)


@pytest.mark.parametrize("media", [
    {"streams": [{"codec_type": "audio"}]},
    {"streams": [{"codec_type": "audio"},
                 {"codec_type": "video", "width": 500, "height": 500, "attached_pic": True}]},
])
def test_command_refuses_media_without_a_picture(tmp_path, media) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PermanentError) as caught:
        build(TranscodeParams(), media_info(media), tmp_path / "in", tmp_path / "out")
    assert caught.value.code == "no_video_stream"


def test_docs_describe_every_param() -> None:
    import re

    from shared.params.video import CONTAINER, DEFAULT_CRF, WebParams

    text = (Path(__file__).resolve().parents[1] / "docs" / "recipes" / "video.md").read_text()
    words = set(re.findall(r"[A-Za-z0-9_]+", text))
    for struct in (TranscodeParams, WebParams):
        for field in struct.__struct_fields__:
            assert f"`{field}`" in text, f"docs/recipes/video.md does not mention {field}"
    for vcodec, crf in DEFAULT_CRF.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{vcodec}` |"))
        assert f"| {CONTAINER[vcodec].upper()} | {crf} |" in row.upper(), row
    assert {"web", "transcode", "no_video_stream", "invalid_input"} <= words
