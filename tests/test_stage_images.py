"""The image and overlay stages: preview, watermark, subtitles (thumbnail: test_recipe_thumbnails).

Pure helpers are tested directly; the stages run through the real bus, conductor and ffmpeg
on small generated clips, and their outputs are decoded again to check what a viewer sees.
"""

from __future__ import annotations

import itertools
import re
import struct
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest

from functions.preview.handler import window
from functions.registry import FUNCTIONS
from functions.subtitles import fonts
from functions.subtitles.cues import SubtitleError, parse, to_ass
from functions.watermark.handler import placement
from shared.media import Binaries
from shared.params import images
from shared.params.images import WatermarkParams
from shared.recipes import resolve
from tests.support.docjobs import doc_text, job_bodies, plan_error
from tests.support.media import MakeClip, ffprobe_json
from tests.support.nats import fetch_output, running, submit_job, wait_for_job

pytestmark = pytest.mark.timeout(120)

W, H = 320, 180  # the source clip of the bus tests

SRT = b"""1
00:00:00,400 --> 00:00:01,300
HELLO <i>WORLD</i>

2
00:00:05,000 --> 00:00:06,000
(after the end of the clip)
"""

VTT = b"""WEBVTT - burnt in at the top

NOTE a comment block, not a cue

intro
00:00.400 --> 00:01.300 line:0 align:center
<v Narrator>HELLO &amp; <b>WELCOME</b></v>
"""


# --- helpers ----------------------------------------------------------------------------


def _ffmpeg(binaries: Binaries, *args: str) -> bytes:
    proc = subprocess.run([binaries.ffmpeg, "-v", "error", "-nostdin", "-y", *args],
                          capture_output=True, timeout=60, check=True)
    return proc.stdout


def frame_rgb(binaries: Binaries, path: Path, at: float, size: tuple[int, int]) -> bytes:
    """One decoded frame as packed RGB24 at ``size``."""
    data = _ffmpeg(binaries, "-ss", f"{at:.3f}", "-i", str(path), "-frames:v", "1",
                   "-s", f"{size[0]}x{size[1]}", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1")
    assert len(data) == size[0] * size[1] * 3
    return data


def region_mean(rgb: bytes, width: int, box: tuple[int, int, int, int]) -> tuple[float, ...]:
    x0, y0, x1, y1 = box
    sums, n = [0, 0, 0], 0
    for y in range(y0, y1):
        row = rgb[(y * width + x0) * 3:(y * width + x1) * 3]
        for c in range(3):
            sums[c] += sum(row[c::3])
        n += x1 - x0
    return tuple(s / n for s in sums)


def region_diff(a: bytes, b: bytes, width: int, box: tuple[int, int, int, int]) -> float:
    """Mean absolute difference of two RGB frames over ``box``."""
    x0, y0, x1, y1 = box
    total, n = 0, 0
    for y in range(y0, y1):
        lo, hi = (y * width + x0) * 3, (y * width + x1) * 3
        total += sum(abs(p - q) for p, q in zip(a[lo:hi], b[lo:hi], strict=True))
        n += hi - lo
    return total / n


def webp_animation(path: Path) -> dict[str, Any]:
    """Canvas size, loop count and frame durations of an animated WebP (ffmpeg cannot
    decode those, so read the RIFF chunks)."""
    data = path.read_bytes()
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    info: dict[str, Any] = {"durations_ms": []}
    pos = 12
    while pos + 8 <= len(data):
        tag, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = data[pos + 8:pos + 8 + size]
        if tag == b"VP8X":
            info["size"] = (1 + int.from_bytes(body[4:7], "little"),
                            1 + int.from_bytes(body[7:10], "little"))
        elif tag == b"ANIM":
            info["loop"] = struct.unpack("<H", body[4:6])[0]
        elif tag == b"ANMF":
            info["durations_ms"].append(int.from_bytes(body[12:15], "little"))
        elif tag in (b"VP8 ", b"VP8L"):
            info["still"] = True  # one frame only: libwebp writes a plain still image
        pos += 8 + size + (size & 1)
    return info


@pytest.fixture(scope="module")
def source(make_clip: MakeClip) -> Path:
    return make_clip("overlay_src", duration=2.0, width=W, height=H)


@pytest.fixture(scope="module")
def logo(binaries: Binaries, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("logo") / "logo.png"
    _ffmpeg(binaries, "-f", "lavfi", "-i", "color=c=red:size=48x24", "-frames:v", "1",
            str(path))
    return path


@pytest.fixture(scope="module")
def logo_jpeg(binaries: Binaries, logo: Path) -> Path:
    path = logo.with_suffix(".jpg")
    _ffmpeg(binaries, "-i", str(logo), "-q:v", "2", str(path))
    return path


def _files(tmp: Path, **content: bytes) -> dict[str, Path]:
    out = {}
    for name, data in content.items():
        path = tmp / name.replace("_", ".")
        path.write_bytes(data)
        out[name] = path
    return out


# --- pure helpers -------------------------------------------------------------------------


def test_preview_window_stays_inside_the_clip() -> None:
    assert window(30.0, None, 3.0) == (3.0, 3.0)  # 10% in
    assert window(4.0, None, 3.0) == pytest.approx((0.4, 3.0))
    assert window(2.0, None, 3.0) == (0.0, 2.0)  # shorter than asked: all of it
    assert window(10.0, 8.5, 3.0) == (8.5, 1.5)  # cut at the end
    assert window(10.0, 12.0, 3.0) == (7.0, 3.0)  # past the end: the last seconds
    assert window(0.04, None, 3.0) == (0.0, pytest.approx(0.04))  # one frame
    assert window(0.0, None, 3.0) == (0.0, 3.0)  # unknown duration


def test_watermark_placement_per_corner() -> None:
    image = (100, 50)
    at = {pos: placement(WatermarkParams(position=pos, margin=10), (640, 360), image)
          for pos in ("top-left", "top-right", "bottom-left", "bottom-right")}
    assert at == {"top-left": (10, 10, 100, 50), "top-right": (530, 10, 100, 50),
                  "bottom-left": (10, 300, 100, 50), "bottom-right": (530, 300, 100, 50)}
    assert placement(WatermarkParams(scale=0.5, margin=0), (640, 360), image) == \
        (320, 200, 320, 160)
    # Too big for the frame: shrunk to fit inside the margins, aspect kept.
    assert placement(WatermarkParams(margin=20), (320, 180), (1000, 500)) == (20, 20, 280, 140)


def test_srt_and_vtt_parse_to_defused_ass_text() -> None:
    srt = parse(SRT)
    assert [(c.start_ms, c.end_ms) for c in srt] == [(400, 1300), (5000, 6000)]
    assert srt[0].text == "HELLO {\\i1}WORLD{\\i0}"
    vtt = parse(VTT)
    assert [(c.start_ms, c.end_ms, c.text) for c in vtt] == [
        (400, 1300, "HELLO & {\\b1}WELCOME{\\b0}")]
    hostile = parse(b"1\n00:00:01,000 --> 00:00:02,000\n{\\fnEvil\\fs900}big {x} a\\Nb\n"
                    b"<font color=red>red</font> } {\n")
    # Override blocks go (libass would hide them anyway); a stray brace or backslash is
    # shown, never interpreted.
    assert hostile[0].text == "big  a\\\u2060Nb\\Nred \uff5d \uff5b"
    # BOM and CRLF, cp1252 on request.
    assert parse(b"\xef\xbb\xbf1\r\n00:00:01,000 --> 00:00:02,500\r\nok\r\n")[0].end_ms == 2500
    assert parse("1\n00:00:01,000 --> 00:00:02,000\ncaf\xe9\n".encode("cp1252"),
                 "cp1252")[0].text == "caf\xe9"


PNG_HEAD = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"


@pytest.mark.parametrize("data, encoding, why", [
    (PNG_HEAD, "utf-8", "not utf-8 text"),
    (PNG_HEAD, "cp1252", "control characters"),  # decodes, but is no text
    (b"1\n00:00:01,000 --> 00:00:02,000\nhi\x00\n", "latin-1", "control characters"),
    (b"#EXTM3U\n#EXTINF:1,\nhttp://example.invalid/x.ts\n", "utf-8", "no SRT/WebVTT cues"),
    (b"ffconcat version 1.0\nfile /etc/passwd\n", "utf-8", "no SRT/WebVTT cues"),
    (b"", "utf-8", "no SRT/WebVTT cues"),
    (b"1\n00:00:01,000 --> 00:00:02,000\nx\n" * 200_000, "utf-8", "larger than"),
])
def test_non_subtitle_files_are_refused(data: bytes, encoding: str, why: str) -> None:
    with pytest.raises(SubtitleError, match=why):
        parse(data, encoding)


def test_ass_script_is_sized_to_the_video() -> None:
    script = to_ass(parse(SRT), width=W, height=H, font="DejaVu Sans", font_size=0.1,
                    color="FFCC00", top=False, margin=0.05)
    assert f"PlayResX: {W}\nPlayResY: {H}" in script
    assert "Style: Default,DejaVu Sans,18,&H0000CCFF," in script
    assert "Dialogue: 0,0:00:00.40,0:00:01.30,Default,,0,0,0,,HELLO {\\i1}WORLD{\\i0}" in script


def test_missing_font_fails_with_a_clear_error(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    assert fonts.find_font().files  # this machine has one (the pip font or DejaVu)
    monkeypatch.setattr(fonts, "_candidates", lambda: [("Nope", tmp_path, ("Nope.ttf",))])
    with pytest.raises(fonts.NoFont, match="fonts-dejavu-core") as err:
        fonts.find_font()
    assert err.value.code == "internal" and err.value.non_retryable


def test_recipes_plan_the_second_input() -> None:
    steps = resolve("watermark", None, {"position": "top-left", "opacity": 0.5}, 2)
    assert steps["watermark"].uses == [":input", ":input/1", "probe"]
    assert steps["watermark"].params["opacity"] == 0.5
    assert resolve("subtitles", None, {}, 2)["subtitles"].uses == [":input", ":input/1", "probe"]
    assert resolve("gif", None, {"fps": 5}, 1)["preview"].params["format"] == "gif"
    with pytest.raises(Exception, match="invalid_recipe"):
        resolve("watermark", None, {}, 1)  # no image input
    with pytest.raises(Exception, match="opacity"):
        resolve("watermark", None, {"opacity": 2}, 2)


# --- through the bus ------------------------------------------------------------------------


async def test_previews_watermarks_and_subtitles(make_settings, binaries, source, logo,  # type: ignore[no-untyped-def]
                                                 logo_jpeg, tmp_path):
    subs = _files(tmp_path, subs_srt=SRT, subs_vtt=VTT)
    preview = {"start_s": 0.5, "duration_s": 1.0, "width": 160, "fps": 10}
    both = [":input", "probe"]
    steps: dict[str, Any] = {
        "probe": {"stage": "probe", "uses": [":input"]},
        "gif": {"stage": "preview", "uses": both, "params": {**preview, "format": "gif"}},
        "webp": {"stage": "preview", "uses": both, "params": {**preview, "format": "webp"}},
        "mp4": {"stage": "preview", "uses": both, "params": {**preview, "format": "mp4"}},
        "wm": {"stage": "watermark", "uses": [":input", ":input/1", "probe"],
               "params": {"position": "bottom-right", "margin": 8, "preset": "ultrafast"}},
        "wm_faint": {"stage": "watermark", "uses": [":input", ":input/4", "probe"],
                     "params": {"position": "top-left", "margin": 0, "scale": 0.25,
                                "opacity": 0.5, "preset": "ultrafast"}},
        "srt": {"stage": "subtitles", "uses": [":input", ":input/2", "probe"],
                "params": {"font_size": 0.12, "preset": "ultrafast"}},
        "vtt": {"stage": "subtitles", "uses": [":input", ":input/3", "probe"],
                "params": {"position": "top", "font_size": 0.12, "preset": "ultrafast"}},
    }
    async with running(make_settings(), list(FUNCTIONS.values())) as rt:
        job_id = await submit_job(
            rt, [source, logo, subs["subs_srt"], subs["subs_vtt"], logo_jpeg], steps=steps)
        record = await wait_for_job(rt.services, job_id, timeout=90)
        assert record.status == "succeeded", (record.error, {
            n: s.error for n, s in record.steps.items()})

        out = {}
        for step, name, filename in [("gif", "preview", "p.gif"), ("webp", "preview", "p.webp"),
                                     ("mp4", "preview", "p.mp4"), ("wm", "video", "wm.mp4"),
                                     ("wm_faint", "video", "faint.mp4"),
                                     ("srt", "video", "srt.mp4"), ("vtt", "video", "vtt.mp4")]:
            out[step] = await fetch_output(rt, record, step, name, tmp_path / filename)

    # Previews: 1 s at 10 fps, 160 wide.
    gif = ffprobe_json(binaries, out["gif"])
    assert gif["format"]["format_name"] == "gif"
    assert (gif["streams"][0]["width"], gif["streams"][0]["height"]) == (160, 90)
    assert float(gif["format"]["duration"]) == pytest.approx(1.0, abs=0.05)
    assert _count_frames(binaries, out["gif"]) == 10
    assert record.steps["gif"].meta["frames"] == 10
    webp = webp_animation(out["webp"])
    assert webp["size"] == (160, 90) and webp["loop"] == 0
    assert len(webp["durations_ms"]) == 10 and sum(webp["durations_ms"]) == 1000
    mp4 = ffprobe_json(binaries, out["mp4"])
    assert [s["codec_type"] for s in mp4["streams"]] == ["video"]  # silent
    assert mp4["streams"][0]["codec_name"] == "h264"
    assert (mp4["streams"][0]["width"], mp4["streams"][0]["height"]) == (160, 90)
    assert _count_frames(binaries, out["mp4"]) == 10

    # Watermark: same duration and streams; the corner turned red, the rest did not change.
    for step in ("wm", "wm_faint"):
        info = ffprobe_json(binaries, out[step])
        assert abs(float(info["format"]["duration"]) - 2.0) <= 0.1
        codecs = {s["codec_type"]: s["codec_name"] for s in info["streams"]}
        assert codecs == {"video": "h264", "audio": "aac"}
        assert record.steps[step].meta["audio"] == "copy"
    src = frame_rgb(binaries, source, 1.0, (W, H))
    marked = frame_rgb(binaries, out["wm"], 1.0, (W, H))
    box = record.steps["wm"].meta["overlay"]
    assert box == {"x": W - 48 - 8, "y": H - 24 - 8, "width": 48, "height": 24}
    inner = (box["x"] + 4, box["y"] + 4, box["x"] + box["width"] - 4, box["y"] + 20)
    r, g, b = region_mean(marked, W, inner)
    assert r > 200 and g < 60 and b < 60, (r, g, b)
    assert region_diff(src, marked, W, inner) > 60
    assert region_diff(src, marked, W, (0, 0, 100, 60)) < 6  # the opposite corner
    faint = frame_rgb(binaries, out["wm_faint"], 1.0, (W, H))
    fbox = record.steps["wm_faint"].meta["overlay"]
    assert fbox == {"x": 0, "y": 0, "width": 80, "height": 40}
    # A JPEG at half opacity: half red, half the picture underneath.
    before = region_mean(src, W, (4, 4, 76, 36))
    after = region_mean(faint, W, (4, 4, 76, 36))
    for got, want in zip(after, [(255 + before[0]) / 2, before[1] / 2, before[2] / 2],
                         strict=True):
        assert got == pytest.approx(want, abs=12), (before, after)

    # Subtitles: pixels change in the text band during the cue, not outside it.
    bottom, top = (0, H * 2 // 3, W, H), (0, 0, W, H // 3)
    for step, band, other in [("srt", bottom, top), ("vtt", top, bottom)]:
        meta = record.steps[step].meta
        assert meta["cues"] >= 1 and meta["font"] and meta["audio"] == "copy"
        during_src, during = frame_rgb(binaries, source, 0.8, (W, H)), frame_rgb(
            binaries, out[step], 0.8, (W, H))
        after_src, after = frame_rgb(binaries, source, 1.7, (W, H)), frame_rgb(
            binaries, out[step], 1.7, (W, H))
        assert region_diff(during_src, during, W, band) > 8, step
        assert region_diff(during_src, during, W, other) < 4, step
        assert region_diff(after_src, after, W, band) < 4, step
        assert abs(float(ffprobe_json(binaries, out[step])["format"]["duration"]) - 2.0) <= 0.1


async def test_bad_overlay_inputs_fail_with_invalid_input(make_settings, source, logo,  # type: ignore[no-untyped-def]
                                                          text_file, tmp_path):
    binary = tmp_path / "subs.srt"
    binary.write_bytes(logo.read_bytes())  # a PNG named .srt
    playlist = tmp_path / "list.vtt"
    playlist.write_bytes(b"#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n")
    cases = {
        "text as image": ("watermark", text_file),
        "video as image": ("watermark", source),
        "binary as subtitles": ("subtitles", binary),
        "playlist as subtitles": ("subtitles", playlist),
    }
    async with running(make_settings(), list(FUNCTIONS.values())) as rt:
        jobs = {case: await submit_job(rt, [source, path], recipe=recipe)
                for case, (recipe, path) in cases.items()}
        for case, job_id in jobs.items():
            record = await wait_for_job(rt.services, job_id, timeout=30)
            assert record.status == "failed", case
            assert record.error is not None and record.error.code == "invalid_input", (
                case, record.error)
            step = record.steps[cases[case][0]]
            assert step.status == "failed" and step.attempt == 1, case  # never retried


async def test_previews_of_a_single_frame_clip(make_settings, binaries, make_clip,  # type: ignore[no-untyped-def]
                                               tmp_path):
    one_frame = make_clip("thumbs_one_frame", duration=0.04, width=160, height=90,
                          audio=False)
    steps: dict[str, Any] = {"probe": {"stage": "probe", "uses": [":input"]}}
    for fmt in ("gif", "webp", "mp4"):
        steps[fmt] = {"stage": "preview", "uses": [":input", "probe"],
                      "params": {"format": fmt, "width": 80}}
    async with running(make_settings(), list(FUNCTIONS.values())) as rt:
        job_id = await submit_job(rt, [one_frame], steps=steps)
        record = await wait_for_job(rt.services, job_id, timeout=30)
        assert record.status == "succeeded", record.error
        out = {fmt: await fetch_output(rt, record, fmt, "preview", tmp_path / f"one.{fmt}")
               for fmt in ("gif", "webp", "mp4")}
    assert all(record.steps[fmt].meta["frames"] == 1 for fmt in out)
    assert _count_frames(binaries, out["gif"]) == 1
    assert _count_frames(binaries, out["mp4"]) == 1
    webp = webp_animation(out["webp"])
    assert webp.get("still") or len(webp["durations_ms"]) == 1, webp


async def test_overlays_keep_a_browser_recordings_frame_times(make_settings, binaries, logo,  # type: ignore[no-untyped-def]
                                                              tmp_path):
    """A MediaRecorder-style WebM (millisecond timestamps jittering around 30 fps): the
    watermark and the burnt-in subtitles keep every frame at its own time. MP4's default
    constant rate duplicated frames (the video grew by 100 ms) and an encoder counting in
    1/30 s would round the times onto that grid, dropping frames that meet on one tick."""
    src = tmp_path / "recording.webm"
    _ffmpeg(binaries, "-f", "lavfi", "-i", "testsrc2=size=160x90:rate=30", "-t", "1.5",
            "-vf", "settb=1/1000,setpts='(N/30+0.006*sin(N*1.7))/TB'",
            "-fps_mode", "passthrough", "-enc_time_base:v", "1:1000", "-c:v", "libvpx",
            "-b:v", "200k", str(src))
    times = _frame_times(binaries, src)
    gaps = {round(b - a, 3) for a, b in itertools.pairwise(times)}
    assert len(gaps) > 3  # really jittery
    subs = _files(tmp_path, subs_srt=SRT)
    steps: dict[str, Any] = {
        "probe": {"stage": "probe", "uses": [":input"]},
        "wm": {"stage": "watermark", "uses": [":input", ":input/1", "probe"],
               "params": {"preset": "ultrafast"}},
        "srt": {"stage": "subtitles", "uses": [":input", ":input/2", "probe"],
                "params": {"preset": "ultrafast"}},
    }
    async with running(make_settings(), list(FUNCTIONS.values())) as rt:
        job_id = await submit_job(rt, [src, logo, subs["subs_srt"]], steps=steps)
        record = await wait_for_job(rt.services, job_id, timeout=90)
        assert record.status == "succeeded", (record.error, {
            n: s.error for n, s in record.steps.items()})
        for step in ("wm", "srt"):
            out = await fetch_output(rt, record, step, "video", tmp_path / f"{step}.mp4")
            got = _frame_times(binaries, out)
            assert len(got) == len(times), step
            assert max(abs((a - times[0]) - (b - got[0]))
                       for a, b in zip(times, got, strict=True)) < 0.0015, step


async def test_overlays_on_a_picture_that_never_decodes_are_invalid_input(  # type: ignore[no-untyped-def]
        make_settings, logo, tmp_path):
    """A WebP that probes as a picture but that no decoder gets a frame out of: ffmpeg itself
    exits 0 once a logo is overlaid on nothing; the step must refuse the input at once."""
    broken = Path(__file__).parent / "fixtures" / "public" / "webp.webp"
    async with running(make_settings(), list(FUNCTIONS.values())) as rt:
        job_id = await submit_job(rt, [broken, logo], recipe="watermark")
        record = await wait_for_job(rt.services, job_id, timeout=30)
    assert record.status == "failed"
    assert record.error is not None and record.error.code == "invalid_input", record.error
    assert "no video frame could be decoded" in record.error.message
    step = record.steps["watermark"]
    assert step.status == "failed" and step.attempt == 1  # never retried


def _frame_times(binaries: Binaries, path: Path) -> list[float]:
    """Presentation times of the video frames, in display order."""
    out = subprocess.run(
        [binaries.ffprobe, "-v", "error", "-select_streams", "v:0", "-show_entries",
         "packet=pts_time", "-of", "csv=p=0", str(path)],
        capture_output=True, timeout=60, check=True)
    return sorted(float(line.split(",")[0]) for line in out.stdout.decode().split())


def _count_frames(binaries: Binaries, path: Path) -> int:
    out = subprocess.run(
        [binaries.ffprobe, "-v", "error", "-count_frames", "-select_streams", "v:0",
         "-show_entries", "stream=nb_read_frames", "-of", "json", str(path)],
        capture_output=True, timeout=60, check=True)
    return int(msgspec.json.decode(out.stdout)["streams"][0]["nb_read_frames"])


# --- the user documentation ---------------------------------------------------------------

DOC = Path(__file__).resolve().parents[1] / "docs" / "recipes" / "images.md"


def test_docs_name_every_stage_param_and_recipe() -> None:
    text = DOC.read_text(encoding="utf-8")
    words = set(re.findall(r"[A-Za-z0-9_]+", text))
    for recipe in images.RECIPES:
        assert f"`{recipe}`" in text, f"docs/recipes/images.md does not show recipe {recipe}"
    for stage, info in images.STAGES.items():
        assert f"`{stage}`" in text, f"docs/recipes/images.md does not show stage {stage}"
        for field in info.params.__struct_fields__:
            assert field in words, f"docs/recipes/images.md does not mention {stage}.{field}"


def test_docs_curl_bodies_are_valid_jobs() -> None:
    """Every ``-d '{...}'`` job body in the doc plans, or fails exactly as the doc says."""
    text = doc_text(DOC)
    bodies = job_bodies(text)
    assert len(bodies) >= 9
    refused = []
    for body in bodies:
        error = plan_error(body)
        if error is not None:
            refused.append(str(error))
    assert refused == ["invalid_recipe: step 'watermark': 'uses' names ':input/1' but the job "
                       "has 1 input(s)"]
