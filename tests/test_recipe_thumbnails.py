"""The ``thumbnails`` recipe and the ``thumbnail`` stage's modes, through the real bus.

poster, evenly spaced frames (timestamps checked against the source), a sprite sheet whose
size is columns x rows tiles, and a WebVTT index whose cues cover the clip without gaps.
Also: an upright sprite from a rotated clip, and a clip of a single frame.
"""

from __future__ import annotations

import itertools
import re
import subprocess
from pathlib import Path

import pytest

from functions.registry import FUNCTIONS
from functions.thumbnail.handler import slice_bounds_ms, sprite_vtt
from shared.media import Binaries
from shared.recipes import resolve
from tests.support.media import MakeClip, ffprobe_json
from tests.support.nats import fetch_output, running, submit_job, wait_for_job

pytestmark = pytest.mark.timeout(120)

_CUE = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) --> (\d\d):(\d\d):(\d\d)\.(\d{3})$")


def parse_vtt(text: str) -> list[tuple[int, int, str]]:
    """(start_ms, end_ms, payload) of every cue; fails on anything malformed."""
    blocks = text.strip().split("\n\n")
    assert blocks[0] == "WEBVTT"
    cues = []
    for block in blocks[1:]:
        timing, payload = block.split("\n")
        m = _CUE.match(timing)
        assert m, timing
        h1, m1, s1, ms1, h2, m2, s2, ms2 = map(int, m.groups())
        cues.append((((h1 * 60 + m1) * 60 + s1) * 1000 + ms1,
                     ((h2 * 60 + m2) * 60 + s2) * 1000 + ms2, payload))
    return cues


def gray(binaries: Binaries, path: Path, at: float | None = None) -> bytes:
    """A frame as 64x36 grayscale bytes (``at``: seek in a video first)."""
    seek = ["-ss", f"{at:.3f}"] if at is not None else []
    out = subprocess.run(
        [binaries.ffmpeg, "-v", "error", "-nostdin", *seek, "-i", str(path), "-frames:v", "1",
         "-s", "64x36", "-f", "rawvideo", "-pix_fmt", "gray", "pipe:1"],
        capture_output=True, timeout=60, check=True)
    assert len(out.stdout) == 64 * 36
    return out.stdout


def diff(a: bytes, b: bytes) -> float:
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)


def test_slices_are_contiguous_and_cover_the_span() -> None:
    assert slice_bounds_ms(3.0, 6, None) == [0, 500, 1000, 1500, 2000, 2500, 3000]
    assert slice_bounds_ms(2.5, 3, 1.0) == [0, 1000, 2000, 2500]  # interval, short last
    assert slice_bounds_ms(0.04, 10, None) == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
    assert slice_bounds_ms(0.0, 5, None) == [0, 1]
    vtt = sprite_vtt([0, 500, 1000, 1500], "sprite.jpg", 2, 160, 90)
    assert parse_vtt(vtt) == [(0, 500, "sprite.jpg#xywh=0,0,160,90"),
                              (500, 1000, "sprite.jpg#xywh=160,0,160,90"),
                              (1000, 1500, "sprite.jpg#xywh=0,90,160,90")]


def test_recipe_params_are_checked_before_anything_runs() -> None:
    steps = resolve("thumbnails", None, {"count": 4, "columns": 2}, 1)
    assert {n: s.params.get("mode") for n, s in steps.items()} == {
        "probe": None, "poster": "poster", "frames": "frames", "sprite": "sprite"}
    for bad in ({"count": 0}, {"columns": 99}, {"tile_width": 8}, {"nope": 1}):
        with pytest.raises(Exception, match="invalid_recipe"):
            resolve("thumbnails", None, bad, 1)


@pytest.fixture(scope="module")
def short_picture(binaries: Binaries, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Picture for 1 s, sound for 3 s, and Matroska gives no per-stream duration: seeks
    past 1 s find no frame, and the stage must fall back to the last one."""
    path = tmp_path_factory.mktemp("short") / "short_picture.mkv"
    subprocess.run(
        [binaries.ffmpeg, "-v", "error", "-nostdin", "-f", "lavfi", "-t", "1", "-i",
         "testsrc2=size=160x90:rate=25", "-f", "lavfi", "-t", "3", "-i", "sine", "-c:v",
         "libx264", "-preset", "ultrafast", "-c:a", "aac", str(path)],
        check=True, capture_output=True, timeout=60)
    return path


async def test_thumbnails_recipe(make_settings, binaries, clip_3s, make_clip: MakeClip,  # type: ignore[no-untyped-def]
                                 short_picture, tmp_path):
    portrait = make_clip("thumbs_rotated", duration=1.0, width=160, height=96, rotate=90,
                         audio=False)
    one_frame = make_clip("thumbs_one_frame", duration=0.04, width=160, height=90,
                          audio=False)
    params = {"count": 6, "columns": 4, "tile_width": 80, "max_width": 320}
    async with running(make_settings(), list(FUNCTIONS.values())) as rt:
        main = await submit_job(rt, [clip_3s], recipe="thumbnails", params=params)
        rotated = await submit_job(rt, [portrait], recipe="thumbnails",
                                   params={"count": 3, "columns": 3, "tile_width": 48})
        single = await submit_job(rt, [one_frame], recipe="thumbnails",
                                  params={"count": 5, "columns": 5, "tile_width": 80})
        lying = await submit_job(rt, [short_picture], steps={
            "probe": {"stage": "probe", "uses": [":input"]},
            "frames": {"stage": "thumbnail", "uses": [":input", "probe"],
                       "params": {"mode": "frames", "count": 3}}})
        record = await wait_for_job(rt.services, main, timeout=60)
        assert record.status == "succeeded", record.error
        poster = await fetch_output(rt, record, "poster", "poster", tmp_path / "poster.jpg")
        frames = {name: await fetch_output(rt, record, "frames", name, tmp_path / f"{name}.jpg")
                  for name in record.steps["frames"].outputs}
        sprite = await fetch_output(rt, record, "sprite", "sprite.jpg", tmp_path / "sprite.jpg")
        vtt = await fetch_output(rt, record, "sprite", "sprite.vtt", tmp_path / "sprite.vtt")

        rot = await wait_for_job(rt.services, rotated, timeout=60)
        assert rot.status == "succeeded", rot.error
        rot_sprite = await fetch_output(rt, rot, "sprite", "sprite.jpg", tmp_path / "rot.jpg")
        one = await wait_for_job(rt.services, single, timeout=60)
        assert one.status == "succeeded", one.error
        one_vtt = await fetch_output(rt, one, "sprite", "sprite.vtt", tmp_path / "one.vtt")
        one_poster = await fetch_output(rt, one, "poster", "poster", tmp_path / "one.jpg")
        late = await wait_for_job(rt.services, lying, timeout=60)
        assert late.status == "succeeded", late.error
        last = await fetch_output(rt, late, "frames", "frame-0002", tmp_path / "last.jpg")

    # Poster: a JPEG at the source size (640x360 fits in max_width 320? no: scaled to 320).
    assert poster.read_bytes()[:3] == b"\xff\xd8\xff"
    p = ffprobe_json(binaries, poster)["streams"][0]
    assert (p["codec_name"], p["width"], p["height"]) == ("mjpeg", 320, 180)
    assert record.steps["poster"].meta["at_s"] == pytest.approx(0.3)

    # Frames: six, from the middle of six equal slices of the 3 s clip.
    meta = record.steps["frames"].meta
    assert sorted(frames) == [f"frame-{i:04d}" for i in range(6)]
    assert meta["count"] == 6 and (meta["width"], meta["height"]) == (320, 180)
    assert meta["times_s"] == pytest.approx([0.25, 0.75, 1.25, 1.75, 2.25, 2.75], abs=0.002)
    for name in frames:
        f = ffprobe_json(binaries, frames[name])["streams"][0]
        assert (f["codec_name"], f["width"], f["height"]) == ("mjpeg", 320, 180)
    # Each frame is the source's picture at its time, not a neighbour's (testsrc2 moves).
    third = gray(binaries, frames["frame-0002"])
    assert diff(third, gray(binaries, clip_3s, 1.25)) < 3
    assert diff(third, gray(binaries, clip_3s, 1.75)) > 3 * diff(
        third, gray(binaries, clip_3s, 1.25)) + 2

    # Sprite: 6 tiles of 80x45 in 4 columns -> 2 rows.
    smeta = record.steps["sprite"].meta
    assert (smeta["columns"], smeta["rows"], smeta["tile_width"], smeta["tile_height"]) == (
        4, 2, 80, 45)
    s = ffprobe_json(binaries, sprite)["streams"][0]
    assert (s["codec_name"], s["width"], s["height"]) == ("mjpeg", 320, 90)

    # VTT: six cues, 0 to the probed duration, each ending where the next starts.
    cues = parse_vtt(vtt.read_text())
    duration_ms = round(record.steps["probe"].meta["duration_s"] * 1000)
    assert len(cues) == 6 and cues[0][0] == 0 and cues[-1][1] == duration_ms
    assert all(a[1] == b[0] for a, b in itertools.pairwise(cues))
    assert [c[2] for c in cues] == [f"sprite.jpg#xywh={(i % 4) * 80},{(i // 4) * 45},80,45"
                                    for i in range(6)]

    # A clip stored landscape with a 90 degree display rotation gives upright (portrait) tiles.
    rmeta = rot.steps["sprite"].meta
    assert (rmeta["tile_width"], rmeta["tile_height"]) == (48, 80)
    r = ffprobe_json(binaries, rot_sprite)["streams"][0]
    assert (r["width"], r["height"]) == (3 * 48, 80)

    # One frame: one tile, one cue covering it, a poster all the same.
    assert one.steps["frames"].meta["count"] == 1
    assert one.steps["sprite"].meta["count"] == 1
    one_cues = parse_vtt(one_vtt.read_text())
    assert len(one_cues) == 1 and one_cues[0][0] == 0 and one_cues[0][1] > 0
    assert ffprobe_json(binaries, one_poster)["streams"][0]["width"] == 160

    # Asked for 2.5 s of a 1 s picture: the last frame there is (0.96 s), not nothing.
    assert late.steps["frames"].meta["count"] == 3
    assert diff(gray(binaries, last), gray(binaries, short_picture, 0.96)) < 3


async def test_gif_recipe(make_settings, binaries, clip_3s, tmp_path):  # type: ignore[no-untyped-def]
    async with running(make_settings(), list(FUNCTIONS.values())) as rt:
        job_id = await submit_job(rt, [clip_3s], recipe="gif",
                                  params={"duration_s": 1.5, "width": 200, "fps": 8})
        record = await wait_for_job(rt.services, job_id, timeout=60)
        assert record.status == "succeeded", record.error
        gif = await fetch_output(rt, record, "preview", "preview", tmp_path / "p.gif")
    meta = record.steps["preview"].meta
    assert meta["start_s"] == pytest.approx(0.3) and meta["duration_s"] == pytest.approx(1.5)
    info = ffprobe_json(binaries, gif)
    stream = info["streams"][0]
    assert info["format"]["format_name"] == "gif"
    assert (stream["width"], stream["height"]) == (200, 112)
    assert float(info["format"]["duration"]) == pytest.approx(1.5, abs=0.05)
