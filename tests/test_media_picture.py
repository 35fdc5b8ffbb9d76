"""Picture handling users expect by default (``shared.media.picture``), through the recipes.

Each source is made here with the bundled ffmpeg and first checked to really have its
property (rotation, non-square pixels, interlaced fields, HDR, a still picture); then the
outputs of ``web``, ``hls``, ``thumbnails``, ``preview`` and ``montage`` are checked for the
property's fix: displayed size, 1:1 pixels, progressive frames, 8-bit BT.709 tags and a
picture that looks as it should.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from functions.registry import FUNCTIONS
from shared.jobstate import JobRecord
from shared.media import Binaries
from shared.runtime import Runtime
from tests.support.media import MakeFile, ffprobe_json, file_maker
from tests.support.nats import fetch_output, running, submit_job, wait_for_job

pytestmark = pytest.mark.timeout(180)

SDR = {"color_space": "bt709", "color_transfer": "bt709", "color_primaries": "bt709",
       "color_range": "tv"}
GREY = 170
"""Mean luma below which a picture meant to be white reads as grey (SDR white is 235)."""
WHITE = 185
"""Mean luma above which it reads as white."""


@pytest.fixture(scope="module")
def make(binaries: Binaries, tmp_path_factory: pytest.TempPathFactory) -> MakeFile:
    """``make(name, ffmpeg_args)`` -> the file ffmpeg wrote (args end before the output)."""
    return file_maker(binaries, tmp_path_factory.mktemp("picture"))


@pytest.fixture
async def runtime(make_settings):  # type: ignore[no-untyped-def]
    async with running(make_settings(concurrency=2), list(FUNCTIONS.values())) as rt:
        yield rt


def video_of(info: dict[str, Any]) -> dict[str, Any]:
    found = [s for s in info["streams"] if s["codec_type"] == "video"]
    assert len(found) == 1, info["streams"]
    return found[0]


def tags(video: dict[str, Any]) -> dict[str, Any]:
    return {k: video.get(k) for k in SDR}


def idet(binaries: Binaries, path: Path) -> dict[str, int]:
    """idet's multi-frame verdict over the whole video: counts of TFF, BFF, progressive."""
    out = subprocess.run([binaries.ffmpeg, "-hide_banner", "-nostdin", "-i", str(path),
                          "-map", "0:v:0", "-vf", "idet", "-f", "null", "-"],
                         capture_output=True, timeout=120).stderr.decode()
    line = next(x for x in out.splitlines() if "Multi frame detection" in x)
    return {k: int(v) for k, v in re.findall(r"(TFF|BFF|Progressive):\s*(\d+)", line)}


def luma(binaries: Binaries, path: Path) -> float:
    """Mean luma of the first frame on the 8-bit scale (a 10-bit value divided by 4)."""
    out = subprocess.run([binaries.ffmpeg, "-hide_banner", "-nostdin", "-i", str(path),
                          "-frames:v", "1", "-vf",
                          "signalstats,metadata=print:key=lavfi.signalstats.YAVG",
                          "-f", "null", "-"], capture_output=True, timeout=60).stderr.decode()
    value = float(re.findall(r"YAVG=([0-9.]+)", out)[0])
    ten_bit = video_of(ffprobe_json(binaries, path))["pix_fmt"].endswith("10le")
    return value / 4 if ten_bit else value


async def job(runtime: Runtime, path: Path, recipe: str | None = None, *,
              steps: dict[str, Any] | None = None,
              params: dict[str, Any] | None = None) -> JobRecord:
    job_id = await submit_job(runtime, [path], recipe=recipe, steps=steps, params=params)
    return await wait_for_job(runtime.services, job_id, timeout=150)


async def fetched(runtime: Runtime, record: JobRecord, step: str, name: str,
                  dest: Path) -> Path:
    assert record.status == "succeeded", (record.error, {
        n: (s.status, s.error) for n, s in record.steps.items() if s.error})
    return await fetch_output(runtime, record, step, name, dest)


# -- sources -----------------------------------------------------------------------------

SRC = ["-f", "lavfi", "-i", "testsrc2=size=320x180:rate=25"]
X264 = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]


@pytest.fixture(scope="module")
def anamorphic(make: MakeFile, binaries: Binaries) -> Path:
    """320x180 coded, pixels 4:3 wide: shown as 427x180 (DVD-style anamorphic)."""
    path = make("anamorphic.mp4", [*SRC, "-t", "2", "-vf", "setsar=4/3", *X264])
    assert video_of(ffprobe_json(binaries, path))["sample_aspect_ratio"] == "4:3"
    return path


@pytest.fixture(scope="module")
def interlaced(make: MakeFile, binaries: Binaries) -> Path:
    """Really interlaced: a white bar racing across black, 50 fields a second woven into
    25 frames (every edge combed), coded as interlaced H.264, top field first. idet reads
    such a picture without doubt, unlike busy test patterns."""
    path = make("interlaced.mp4", [
        "-f", "lavfi", "-i", "color=black:s=320x240:r=50",
        "-f", "lavfi", "-i", "color=white:s=60x200:r=50", "-t", "2",
        "-filter_complex", "[0][1]overlay=x='mod(t*500,260)':y=20,"
                           "tinterlace=mode=interleave_top",
        "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
        "-flags", "+ilme+ildct", "-x264-params", "tff=1"])
    assert video_of(ffprobe_json(binaries, path))["field_order"] in ("tt", "tb")
    verdict = idet(binaries, path)
    assert verdict["TFF"] > 10 * max(1, verdict["Progressive"]), verdict
    return path


def hdr_source(make: MakeFile, binaries: Binaries, transfer: str) -> Path:
    """A white picture (SDR white, 100 nits) coded as 10-bit HEVC HDR: PQ or HLG values,
    BT.2020 tags. Shown without tone mapping it is a dull grey, not white."""
    path = make(f"hdr-{transfer}.mp4", [
        "-f", "lavfi", "-i", "color=c=white:s=320x180:r=25", "-t", "1", "-vf",
        "format=yuv420p,zscale=tin=bt709:min=bt709:pin=bt709:rin=limited:t=linear:p=bt709"
        f":npl=100,format=gbrpf32le,zscale=p=bt2020:t={transfer}:m=bt2020nc:r=limited"
        ":npl=100,format=yuv420p10le",
        "-c:v", "libx265", "-x265-params", f"log-level=error:colorprim=bt2020:"
                                           f"transfer={transfer}:colormatrix=bt2020nc",
        "-color_primaries", "bt2020", "-color_trc", transfer, "-colorspace", "bt2020nc"])
    video = video_of(ffprobe_json(binaries, path))
    assert (video["pix_fmt"], video["color_transfer"], video["color_primaries"]) == (
        "yuv420p10le", transfer, "bt2020")
    assert luma(binaries, path) < GREY  # its code values are far below SDR white's
    return path


@pytest.fixture(scope="module")
def still_jpeg(make: MakeFile, binaries: Binaries) -> Path:
    path = make("still.jpg", ["-f", "lavfi", "-i", "testsrc2=size=320x240", "-frames:v", "1"])
    info = ffprobe_json(binaries, path)
    assert info["format"]["format_name"] == "image2"
    assert video_of(info)["color_range"] == "pc"  # full-range JPEG: converted for video
    return path


# -- tests -------------------------------------------------------------------------------

async def test_non_square_pixels_come_out_square(runtime, anamorphic, binaries,  # type: ignore[no-untyped-def]
                                                 tmp_path) -> None:
    record = await job(runtime, anamorphic, "web")
    video = video_of(ffprobe_json(binaries, await fetched(runtime, record, "transcode",
                                                          "video", tmp_path / "v.mp4")))
    assert (video["width"], video["height"]) == (426, 180)
    assert video.get("sample_aspect_ratio", "1:1") == "1:1"
    assert tags(video) == SDR
    poster = video_of(ffprobe_json(binaries, await fetched(runtime, record, "poster",
                                                           "poster", tmp_path / "p.jpg")))
    assert (poster["width"], poster["height"]) == (426, 180)
    assert poster.get("sample_aspect_ratio", "1:1") in ("1:1", "0:1")

    record = await job(runtime, anamorphic, "hls", params={"ladder": [180],
                                                          "segment_seconds": 1})
    rung = video_of(ffprobe_json(binaries, await fetched(runtime, record, "concat_180p",
                                                         "video", tmp_path / "h.mp4")))
    assert (rung["width"], rung["height"]) == (426, 180)
    assert rung.get("sample_aspect_ratio", "1:1") == "1:1"
    assert tags(rung) == SDR


async def test_interlaced_source_is_deinterlaced(runtime, interlaced, binaries,  # type: ignore[no-untyped-def]
                                                 tmp_path) -> None:
    record = await job(runtime, interlaced, "web")
    assert record.steps["transcode"].meta["deinterlaced"] is True
    out = await fetched(runtime, record, "transcode", "video", tmp_path / "v.mp4")
    verdict = idet(binaries, out)
    assert verdict["Progressive"] > 10 * max(1, verdict["TFF"] + verdict["BFF"]), verdict
    assert video_of(ffprobe_json(binaries, out)).get("field_order", "progressive") == (
        "progressive")

    record = await job(runtime, interlaced, "preview", params={"format": "mp4",
                                                              "duration_s": 1.5})
    out = await fetched(runtime, record, "preview", "preview", tmp_path / "p.mp4")
    verdict = idet(binaries, out)
    assert verdict["Progressive"] > 10 * max(1, verdict["TFF"] + verdict["BFF"]), verdict


@pytest.mark.parametrize("transfer", ["smpte2084", "arib-std-b67"])
async def test_hdr_is_tone_mapped_to_8_bit_bt709(runtime, make, binaries, tmp_path,  # type: ignore[no-untyped-def]
                                                 transfer: str) -> None:
    source = hdr_source(make, binaries, transfer)
    record = await job(runtime, source, "web")
    assert record.steps["transcode"].meta["hdr"] == "tone-mapped"
    out = await fetched(runtime, record, "transcode", "video", tmp_path / "v.mp4")
    video = video_of(ffprobe_json(binaries, out))
    assert video["pix_fmt"] == "yuv420p" and tags(video) == SDR
    assert luma(binaries, out) > WHITE  # white again, not the grey of its code values
    steps = {"montage": {"stage": "montage", "uses": [":input"],
                         "params": {"width": 320, "height": 180}}}
    record = await job(runtime, source, steps=steps)
    out = await fetched(runtime, record, "montage", "video", tmp_path / "m.mp4")
    video = video_of(ffprobe_json(binaries, out))
    assert video["pix_fmt"] == "yuv420p" and tags(video) == SDR
    assert luma(binaries, out) > WHITE


async def test_hdr_can_be_kept_as_10_bit_hevc(runtime, make, binaries, tmp_path) -> None:  # type: ignore[no-untyped-def]
    source = hdr_source(make, binaries, "smpte2084")
    steps = {"probe": {"stage": "probe", "uses": [":input"]},
             "hdr": {"stage": "transcode", "uses": [":input", "probe"],
                     "params": {"vcodec": "hevc", "hdr": "keep"}}}
    record = await job(runtime, source, steps=steps)
    assert record.steps["hdr"].meta["hdr"] == "kept"
    out = await fetched(runtime, record, "hdr", "video", tmp_path / "v.mp4")
    video = video_of(ffprobe_json(binaries, out))
    assert (video["codec_name"], video["pix_fmt"], video["profile"]) == (
        "hevc", "yuv420p10le", "Main 10")
    assert (video["color_transfer"], video["color_primaries"], video["color_space"]) == (
        "smpte2084", "bt2020", "bt2020nc")
    assert abs(luma(binaries, out) - luma(binaries, source)) < 3  # the same PQ values


async def test_still_jpeg_gives_thumbnails_and_a_web_clip(runtime, still_jpeg, binaries,  # type: ignore[no-untyped-def]
                                                          tmp_path) -> None:
    record = await job(runtime, still_jpeg, "thumbnails", params={"count": 3})
    poster = video_of(ffprobe_json(binaries, await fetched(runtime, record, "poster",
                                                           "poster", tmp_path / "p.jpg")))
    assert (poster["width"], poster["height"]) == (320, 240)
    assert record.steps["frames"].meta["count"] >= 1
    assert record.steps["sprite"].outputs  # a sheet and its WebVTT

    record = await job(runtime, still_jpeg, "web", params={"still_s": 2})
    assert record.steps["transcode"].meta["still"] is True
    out = await fetched(runtime, record, "transcode", "video", tmp_path / "v.mp4")
    info = ffprobe_json(binaries, out)
    video = video_of(info)
    assert abs(float(info["format"]["duration"]) - 2.0) <= 0.08
    assert (video["width"], video["height"]) == (320, 240)
    # A full-range JPEG comes out as limited-range BT.709 video, tagged so.
    assert video["pix_fmt"] == "yuv420p" and tags(video) == SDR


async def test_still_picture_previews_and_montages_as_its_one_frame(  # type: ignore[no-untyped-def]
        runtime, still_jpeg, binaries, tmp_path) -> None:
    record = await job(runtime, still_jpeg, "preview", params={"format": "mp4"})
    out = await fetched(runtime, record, "preview", "preview", tmp_path / "p.mp4")
    assert record.steps["preview"].meta["frames"] == 1
    assert (video_of(ffprobe_json(binaries, out))["width"], tags(video_of(ffprobe_json(
        binaries, out)))) == (320, SDR)
    steps = {"montage": {"stage": "montage", "uses": [":input"],
                         "params": {"width": 320, "height": 240}}}
    record = await job(runtime, still_jpeg, steps=steps)
    out = await fetched(runtime, record, "montage", "video", tmp_path / "m.mp4")
    assert record.steps["montage"].meta["frames"] == 1
    assert tags(video_of(ffprobe_json(binaries, out))) == SDR


async def test_still_picture_through_hls_fails_with_a_clear_code(runtime, still_jpeg) -> None:  # type: ignore[no-untyped-def]
    record = await job(runtime, still_jpeg, "hls")
    assert record.status == "failed"
    assert record.error is not None and record.error.code == "not_supported", record.error
    assert "still picture" in record.error.message
    assert record.steps["segment"].attempt == 1  # never retried


async def test_rotated_source_thumbnails_and_preview_are_upright(  # type: ignore[no-untyped-def]
        runtime, make, binaries, tmp_path) -> None:
    plain = make("plain.mp4", [*SRC, "-t", "1", *X264])
    rotated = make("rotated.mp4", ["-display_rotation", "90", "-i", str(plain), "-c", "copy"])
    side = video_of(ffprobe_json(binaries, rotated)).get("side_data_list", [])
    assert any(abs(int(s.get("rotation", 0))) == 90 for s in side), side
    record = await job(runtime, rotated, "thumbnails", params={"count": 2})
    poster = video_of(ffprobe_json(binaries, await fetched(runtime, record, "poster",
                                                           "poster", tmp_path / "p.jpg")))
    assert (poster["width"], poster["height"]) == (180, 320)
    record = await job(runtime, rotated, "preview", params={"format": "mp4"})
    preview = video_of(ffprobe_json(binaries, await fetched(runtime, record, "preview",
                                                            "preview", tmp_path / "p.mp4")))
    assert preview["width"] < preview["height"] and tags(preview) == SDR


def test_scale_options_take_the_input_colours_from_the_probe() -> None:
    from shared.media import VideoStream, picture

    jpeg = VideoStream(width=320, height=240, color_space="bt470bg", color_range="pc")
    assert picture.scale_options(jpeg) == {"out_color_matrix": "bt709", "out_range": "tv",
                                           "in_color_matrix": "bt601", "in_range": "pc"}
    # Untagged: what players assume for the size (BT.709 from HD up, BT.601 below).
    assert picture.scale_options(VideoStream(width=1920, height=1080))[
        "in_color_matrix"] == "bt709"
    assert picture.scale_options(VideoStream(width=640, height=360))[
        "in_color_matrix"] == "bt601"
    # HDR is converted by the tone-mapping chain; kept HDR is not touched at all.
    pq = VideoStream(width=320, height=180, color_transfer="smpte2084",
                     color_space="bt2020nc", color_primaries="bt2020")
    assert "in_color_matrix" not in picture.scale_options(pq)
    assert picture.scale_options(pq, keep_hdr=True) == {}
    assert picture.filter_chain(pq, keep_hdr=True) == []
    assert any(f.startswith("tonemap=") for f in picture.filter_chain(pq))
    interlaced_turned = VideoStream(width=720, height=576, field_order="tt", rotation=90)
    assert picture.filter_chain(interlaced_turned, rotate=True)[:2] == [
        "bwdif=mode=send_frame:parity=auto:deint=all", "transpose=cclock"]
