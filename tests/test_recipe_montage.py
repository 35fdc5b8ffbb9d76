"""The montage recipe through the real bus: clips of mixed sizes, rates and audio, a title
card with hostile text, and a music bed."""

from __future__ import annotations

import asyncio
import re
import subprocess
from fractions import Fraction
from pathlib import Path

import ffmpeg
import pytest

from functions.montage import title as titles
from functions.registry import FUNCTIONS
from shared.errors import PermanentError
from shared.media import Binaries
from shared.params import audio, montage
from shared.recipes import resolve
from tests.support.docjobs import doc_text, job_bodies, plan_error
from tests.support.media import MakeClip, ffprobe_json
from tests.support.nats import fetch_output, running, submit_job, wait_for_job

pytestmark = pytest.mark.timeout(120)

HOSTILE = "a:b'c\\%{pts} [x];drawtext=text=PWNED:fontcolor=red,"
SIZE = {"width": 320, "height": 180, "fps": 25, "preset": "ultrafast"}


def _ffmpeg(binaries: Binaries, *args: str) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run([binaries.ffmpeg, "-hide_banner", "-nostdin", "-y", *args],
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def clips(make_clip: MakeClip) -> list[Path]:
    """Three clips that share nothing: size, aspect ratio, frame rate, audio."""
    return [
        make_clip("m_wide", duration=2.0, width=640, height=360, fps=25),
        make_clip("m_silent", duration=1.5, width=320, height=240, fps=30, audio=False),
        make_clip("m_portrait", duration=2.0, width=240, height=320, fps=24),
    ]


@pytest.fixture(scope="module")
def music(binaries: Binaries, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1.5 s, 1 kHz bed: shorter than any montage, so it has to loop."""
    path = tmp_path_factory.mktemp("music") / "bed.m4a"
    _ffmpeg(binaries, "-v", "error", "-f", "lavfi", "-i",
            "aevalsrc=0.25*sin(2*PI*1000*t):s=48000", "-t", "1.5", "-c:a", "aac", str(path))
    return path


def _streams(binaries: Binaries, path: Path) -> tuple[dict, dict]:
    info = ffprobe_json(binaries, path)
    return info, {s["codec_type"]: s for s in info["streams"]}


def band_volume(binaries: Binaries, path: Path, start: float, length: float, hz: int) -> float:
    """Mean volume (dB) of one frequency band of a section of ``path``."""
    band = f"bandpass=f={hz}:width_type=q:w=20"
    proc = _ffmpeg(binaries, "-ss", str(start), "-t", str(length), "-i", str(path), "-map",
                   "0:a:0", "-af", f"{band},{band},volumedetect", "-f", "null", "-")
    match = re.search(r"mean_volume: (-?[\d.]+|-inf) dB", proc.stderr.decode())
    assert match, proc.stderr[-2000:]
    return float(match.group(1))


def gray_frame(binaries: Binaries, path: Path, at: float) -> bytes:
    proc = _ffmpeg(binaries, "-v", "error", "-ss", str(at), "-i", str(path), "-frames:v", "1",
                   "-vf", "scale=160:90", "-f", "rawvideo", "-pix_fmt", "gray", "-")
    assert len(proc.stdout) == 160 * 90
    return proc.stdout


async def test_three_mixed_clips_become_one_uniform_video(  # type: ignore[no-untyped-def]
    make_settings, binaries, clips, tmp_path
):
    async with running(make_settings(), list(FUNCTIONS.values())) as rt:
        jobs = await asyncio.gather(
            submit_job(rt, clips, recipe="montage", params={
                "clips": 3, "crossfade_s": 0.5, "transition": "wipeleft", **SIZE}),
            # Cuts, and two silent clips of one length: each needs its own silence source.
            submit_job(rt, [clips[1], clips[0], clips[1]], recipe="montage",
                       params={"clips": 3, "crossfade_s": 0, **SIZE}),
        )
        faded, cut = await asyncio.gather(*(wait_for_job(rt.services, j, timeout=90)
                                            for j in jobs))
        assert faded.status == "succeeded", (faded.error, faded.steps)
        assert cut.status == "succeeded", (cut.error, cut.steps)
        faded_out = await fetch_output(rt, faded, "montage", "video", tmp_path / "f.mp4")
        cut_out = await fetch_output(rt, cut, "montage", "video", tmp_path / "c.mp4")

    frames = {}
    for path, expected in ((faded_out, 2.0 + 1.5 + 2.0 - 2 * 0.5), (cut_out, 5.0)):
        info, streams = _streams(binaries, path)
        frames[path] = int(streams["video"]["nb_frames"])
        video = streams["video"]
        assert (video["width"], video["height"]) == (320, 180)
        assert video["pix_fmt"] == "yuv420p" and video["codec_name"] == "h264"
        assert video.get("sample_aspect_ratio", "1:1") == "1:1"
        # Constant frame rate: the nominal and average rates agree, and the frame count
        # is what the duration at that rate says.
        assert Fraction(video["r_frame_rate"]) == Fraction(video["avg_frame_rate"]) == 25
        assert abs(int(video["nb_frames"]) - expected * 25) <= 2
        assert abs(float(info["format"]["duration"]) - expected) <= 0.1
        assert streams["audio"]["codec_name"] == "aac" and streams["audio"]["channels"] == 2
    meta = faded.steps["montage"].meta
    assert meta["clips"] == 3 and meta["frames"] == frames[faded_out]
    assert abs(meta["crossfade_s"] - 0.5) <= 0.04  # whole frames: 13 at 25 fps

    # The portrait clip is pillarboxed: its left and right edges are the black background.
    frame = gray_frame(binaries, faded_out, 3.8)
    edges = [frame[row * 160 + col] for row in range(90) for col in (0, 1, 158, 159)]
    assert max(edges) < 30
    assert max(frame[45 * 160 + 70: 45 * 160 + 90]) > 60  # the picture itself is there


async def test_title_card_adds_its_length_and_shows_text_literally(  # type: ignore[no-untyped-def]
    make_settings, binaries, clips, tmp_path
):
    async with running(make_settings(), list(FUNCTIONS.values())) as rt:
        job_id = await submit_job(rt, clips[:2], recipe="montage", params={
            "clips": 2, "crossfade_s": 0.5, "title": HOSTILE, "title_s": 1.5,
            "background": "#203040", **SIZE})
        record = await wait_for_job(rt.services, job_id, timeout=90)
        assert record.status == "succeeded", (record.error, record.steps)
        out = await fetch_output(rt, record, "montage", "video", tmp_path / "t.mp4")

    info, streams = _streams(binaries, out)
    assert abs(float(info["format"]["duration"]) - (1.5 + 2.0 + 1.5 - 0.5)) <= 0.1
    assert "audio" in streams
    # The card is still: were %{pts} expanded, the text would change with every frame.
    first, later = gray_frame(binaries, out, 0.1), gray_frame(binaries, out, 1.2)
    assert sum(abs(a - b) for a, b in zip(first, later, strict=True)) / len(first) < 1.0
    # ... and it carries text (bright pixels on the dark background), in one colour only:
    # an injected fontcolor=red would have drawn a mid-grey second text.
    assert sum(1 for v in first if v > 150) > 20
    background = round(0.299 * 0x20 + 0.587 * 0x30 + 0.114 * 0x40)
    assert sum(1 for v in first if abs(v - background) <= 12) > 0.8 * len(first)


async def test_music_bed_plays_under_the_clips(  # type: ignore[no-untyped-def]
    make_settings, binaries, clips, music, tmp_path
):
    async with running(make_settings(), list(FUNCTIONS.values())) as rt:
        job_id = await submit_job(rt, [*clips, music], recipe="montage", params={
            "clips": 3, "music": True, "music_volume_db": -12, "music_fade_s": 0.2, **SIZE})
        record = await wait_for_job(rt.services, job_id, timeout=90)
        assert record.status == "succeeded", (record.error, record.steps)
        out = await fetch_output(rt, record, "montage", "video", tmp_path / "m.mp4")

    info, streams = _streams(binaries, out)
    assert abs(float(info["format"]["duration"]) - 4.5) <= 0.1  # the bed does not lengthen it
    assert streams["audio"]["codec_name"] == "aac"
    assert record.steps["montage"].meta["music"] is True
    # The first clip's tone is still clearly there, above the bed (440 Hz vs 1 kHz).
    clip_tone = band_volume(binaries, out, 0.3, 1.0, 440)
    bed_under_clip = band_volume(binaries, out, 0.3, 1.0, 1000)
    assert clip_tone > -40 and bed_under_clip > -50
    assert clip_tone > bed_under_clip + 3
    # Under the silent clip (fully shown 2.0..2.5 s) only the bed plays, looped past 1.5 s.
    assert band_volume(binaries, out, 2.05, 0.4, 1000) > -50
    assert band_volume(binaries, out, 2.05, 0.4, 440) < -60
    # The bed plays to the end (it was looped), and the last clip's tone too.
    assert band_volume(binaries, out, 3.6, 0.5, 1000) > -50
    assert band_volume(binaries, out, 3.6, 0.5, 440) > -40


async def test_clip_without_video_fails_with_no_video_stream(  # type: ignore[no-untyped-def]
    make_settings, make_clip, clips
):
    audio_only = make_clip("m_audio_only", duration=1.0, video=False)
    async with running(make_settings(), list(FUNCTIONS.values())) as rt:
        job_id = await submit_job(rt, [clips[0], audio_only], recipe="montage",
                                  params={"clips": 2, **SIZE})
        record = await wait_for_job(rt.services, job_id, timeout=30)
    assert record.status == "failed"
    assert record.error is not None and record.error.code == "no_video_stream"
    assert "clip 2" in record.error.message
    assert record.steps["montage"].attempt == 1


async def test_a_clip_whose_picture_never_decodes_is_invalid_input(  # type: ignore[no-untyped-def]
    make_settings, clips
):
    """A WebP that probes as a picture but that no decoder gets a frame out of, between two
    good clips: ffmpeg exits 0 and would write a montage without it; the step refuses the
    input instead of shipping a video short of a clip."""
    broken = Path(__file__).parent / "fixtures" / "public" / "webp.webp"
    async with running(make_settings(), list(FUNCTIONS.values())) as rt:
        job_id = await submit_job(rt, [clips[0], broken, clips[1]], recipe="montage",
                                  params={"clips": 3, **SIZE})
        record = await wait_for_job(rt.services, job_id, timeout=60)
    assert record.status == "failed", record.steps["montage"].meta
    assert record.error is not None and record.error.code == "invalid_input", record.error
    assert record.steps["montage"].attempt == 1


def test_recipe_names_one_input_per_clip_and_the_music_last() -> None:
    steps = resolve("montage", None, {"clips": 3, "music": True, "title": "Hi"}, n_inputs=4)
    assert list(steps) == ["montage"]
    assert steps["montage"].uses == [":input", ":input/1", ":input/2", ":input/3"]
    assert "clips" not in steps["montage"].params
    assert steps["montage"].params["title"] == "Hi"


@pytest.mark.parametrize("params, n_inputs, words", [
    ({"clips": 3}, 2, "input"),  # fewer uploads than clips
    ({"clips": 2, "music": True}, 2, "input"),  # no upload left for the music
    ({}, 2, "clips"),
    ({"clips": 2, "width": 641}, 2, "even"),
    ({"clips": 2, "background": "red:x=1"}, 2, "background"),
    ({"clips": 2, "title": "x" * 201}, 2, "title"),
    ({"clips": 2, "transition": "explode"}, 2, "transition"),
])
def test_bad_montage_jobs_are_invalid_recipe(params, n_inputs, words):  # type: ignore[no-untyped-def]
    with pytest.raises(PermanentError) as caught:
        resolve("montage", None, params, n_inputs=n_inputs)
    assert caught.value.code == "invalid_recipe"
    assert words in caught.value.message


def test_title_text_never_reaches_the_filter_graph(tmp_path: Path) -> None:
    from functions.montage.handler import _title_card
    from shared.params.montage import MontageParams

    card = _title_card(MontageParams(title=HOSTILE), tmp_path, Fraction(25), 50)
    args = " ".join(ffmpeg.output(card.video, card.audio, "out.mp4").get_args())
    assert "PWNED" not in args and "%{pts}" not in args
    assert "expansion=none" in args and "textfile=" in args
    written = "".join(p.read_text("utf-8") for p in sorted(tmp_path.glob("title-*.txt")))
    assert written.replace(" ", "") == HOSTILE.replace(" ", "")


def test_frame_rates_are_exact() -> None:
    from functions.montage.handler import frame_rate

    assert frame_rate(25) == 25 and frame_rate(12.5) == Fraction(25, 2)
    assert frame_rate(29.97) == Fraction(30000, 1001)
    assert frame_rate(23.976) == Fraction(24000, 1001)
    assert frame_rate(59.94) == Fraction(60000, 1001)


def test_title_layout_wraps_and_shrinks_long_text() -> None:
    short = titles.layout("Holiday 2024", 1280, 720, None)
    assert short.lines == ["Holiday 2024"] and short.font_size == 60
    wrapped = titles.layout("word " * 38, 320, 180, None)
    assert len(wrapped.lines) == 6 and max(len(line) for line in wrapped.lines) <= 34
    tall = titles.layout("\n".join(["Line"] * 10), 1280, 720, None)
    assert len(tall.lines) == 10 and tall.font_size < 60  # shrunk to fit the height
    assert tall.baselines == sorted(tall.baselines) and 0 < tall.baselines[0]
    assert tall.baselines[-1] < 720
    assert titles.clean_text("a\x00b\tc\r\nd\x1b") == "ab c\nd"


def test_missing_font_is_a_clear_error(tmp_path: Path) -> None:
    assert titles.find_font().is_file()
    with pytest.raises(PermanentError) as caught:
        titles.find_font(package=None, system_fonts=(str(tmp_path / "none.ttf"),))
    assert "fonts-dejavu-core" in caught.value.message
    assert "font-source-sans-pro" in caught.value.message


# --- the user documentation ---------------------------------------------------------------

DOC = Path(__file__).resolve().parents[1] / "docs" / "recipes" / "audio-montage.md"


def test_docs_name_every_stage_param_and_recipe() -> None:
    text = DOC.read_text(encoding="utf-8")
    words = set(re.findall(r"[A-Za-z0-9_]+", text))
    for family in (audio, montage):
        for recipe in family.RECIPES:
            assert f"`{recipe}`" in text, f"{DOC.name} does not show recipe {recipe}"
        for stage, info in family.STAGES.items():
            assert f"`{stage}`" in text, f"{DOC.name} does not show stage {stage}"
            for field in info.params.__struct_fields__:
                assert field in words, f"{DOC.name} does not mention {stage}.{field}"
    assert "`clips`" in text


def test_docs_curl_bodies_are_valid_jobs() -> None:
    """Every ``-d '{...}'`` job body in the doc plans, or fails exactly as the doc says."""
    text = doc_text(DOC)
    bodies = job_bodies(text)
    assert len(bodies) >= 10
    refused = []
    for body in bodies:
        error = plan_error(body)
        if error is not None:
            refused.append(error.message)
            assert error.message in text  # the doc shows the very message
    assert len(refused) == 2
