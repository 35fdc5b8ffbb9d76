"""probe() against the real ffprobe: typed fields, rotation, and the inputs it must refuse."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from shared.errors import ErrorCode, FFmpegError
from shared.media import AudioStream, Binaries, MediaInfo, ProbeLimits, VideoStream, probe
from shared.media.probe import _rotation
from tests.support.media import MakeClip

# `shared.media.probe` the attribute is the function (re-exported); the module is here.
probe_module = sys.modules["shared.media.probe"]


async def _refused(binaries: Binaries, path: Path, **kwargs: object) -> FFmpegError:
    with pytest.raises(FFmpegError) as info:
        await probe(binaries, str(path), **kwargs)  # type: ignore[arg-type]
    assert info.value.non_retryable is True
    return info.value


async def test_clip_fields(binaries: Binaries, clip_3s: Path) -> None:
    info = await probe(binaries, str(clip_3s))

    assert "mp4" in info.format_name.split(",")
    assert info.duration_s == pytest.approx(3.0, abs=0.1)
    assert info.size_bytes == os.stat(clip_3s).st_size
    assert info.bit_rate and info.bit_rate > 0
    video, audio = info.video, info.audio
    assert video is not None and audio is not None
    assert (video.codec_name, video.width, video.height) == ("h264", 640, 360)
    assert video.pix_fmt == "yuv420p"
    assert video.fps == pytest.approx(25.0)
    assert video.rotation == 0
    assert (info.display_width, info.display_height) == (640, 360)
    assert audio.codec_name == "aac"
    assert audio.sample_rate == 48000 and audio.channels == 1
    # Typed per kind: an audio stream has no picture fields to be filled by mistake.
    assert isinstance(audio, AudioStream) and not hasattr(audio, "fps")
    assert not hasattr(audio, "width")


async def test_audio_only(binaries: Binaries, make_clip: MakeClip) -> None:
    info = await probe(binaries, str(make_clip("audio_only", duration=2.0, video=False)))
    assert info.has_audio and not info.has_video
    assert info.display_width is None
    assert info.duration_s == pytest.approx(2.0, abs=0.1)


async def test_video_only(binaries: Binaries, make_clip: MakeClip) -> None:
    path = make_clip("video_only", duration=1.0, width=320, height=240, fps=30, audio=False)
    info = await probe(binaries, str(path))
    assert info.has_video and not info.has_audio
    assert info.video is not None and info.video.fps == pytest.approx(30.0)
    assert (info.display_width, info.display_height) == (320, 240)


@pytest.mark.parametrize(
    ("display_rotation", "rotation", "display"),
    [(90, 90, (360, 640)), (-90, 270, (360, 640)), (180, 180, (640, 360))],
)
async def test_rotation(
    binaries: Binaries,
    make_clip: MakeClip,
    display_rotation: int,
    rotation: int,
    display: tuple[int, int],
) -> None:
    path = make_clip("rotated", duration=1.0, rotate=display_rotation)
    info = await probe(binaries, str(path))
    assert info.video is not None
    assert (info.video.width, info.video.height) == (640, 360)  # coded size is unchanged
    assert info.video.rotation == rotation
    assert (info.display_width, info.display_height) == display


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"side_data_list": [{"side_data_type": "Display Matrix", "rotation": -90}]}, 270),
        ({"side_data_list": [{"rotation": 89.6}]}, 90),
        ({"tags": {"rotate": "90"}}, 270),  # legacy tag is clockwise
        ({"tags": {"rotate": "270"}}, 90),
        ({"tags": {"rotate": "junk"}}, 0),
        ({}, 0),
    ],
)
def test_rotation_normalisation(raw: dict[str, object], expected: int) -> None:
    assert _rotation(raw) == expected


def test_cover_art_is_not_the_video() -> None:
    cover = VideoStream(index=1, codec_name="mjpeg", attached_pic=True)
    audio = AudioStream(index=0, codec_name="mp3")
    info = MediaInfo(format_name="mp3", duration_s=10.0, size_bytes=1000, bit_rate=None,
                     streams=[audio, cover])
    assert info.video is None and not info.has_video and info.has_audio


async def test_text_file_is_invalid(binaries: Binaries, text_file: Path) -> None:
    error = await _refused(binaries, text_file)
    assert error.code == ErrorCode.INVALID_INPUT


async def test_truncated_mp4_is_invalid_without_hanging(
    binaries: Binaries, clip_3s: Path, tmp_path: Path
) -> None:
    truncated = _truncated_copy(clip_3s, tmp_path / "truncated.mp4", 10_000)
    async with asyncio.timeout(15):
        error = await _refused(binaries, truncated, timeout_s=10)
    assert error.code == ErrorCode.INVALID_INPUT


def _truncated_copy(source: Path, target: Path, size: int) -> Path:
    with open(source, "rb") as fh:
        target.write_bytes(fh.read(size))
    return target


def _write_playlist(directory: Path, segment: Path) -> Path:
    path = directory / "holiday.mp4"
    path.write_text(
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:3\n"
        f"#EXTINF:3.0,\n{segment}\n#EXT-X-ENDLIST\n"
    )
    return path


async def test_hls_playlist_named_mp4_is_refused(
    binaries: Binaries, clip_3s: Path, tmp_path: Path
) -> None:
    error = await _refused(binaries, _write_playlist(tmp_path, clip_3s))
    assert error.code == ErrorCode.UNSUPPORTED_FORMAT
    assert "playlist" in error.message


async def test_reference_formats_are_refused_after_probing_too(
    binaries: Binaries, clip_3s: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Second line of defence: even if sniffing missed it, the demuxer ffprobe chose is checked.
    monkeypatch.setattr(probe_module, "_REFERENCE_MAGIC", (b"\x00never",))
    error = await _refused(binaries, _write_playlist(tmp_path, clip_3s))
    assert "'hls'" in error.message

    concat = tmp_path / "list.mp4"
    (tmp_path / "seg.mp4").symlink_to(clip_3s)
    concat.write_text("ffconcat version 1.0\nfile 'seg.mp4'\n")  # relative: the "safe" kind
    error = await _refused(binaries, concat)
    assert "'concat'" in error.message


async def test_missing_empty_and_special_files(binaries: Binaries, tmp_path: Path) -> None:
    error = await _refused(binaries, tmp_path / "absent.mp4")
    assert error.code == ErrorCode.INPUT_NOT_FOUND

    empty = tmp_path / "empty.mp4"
    empty.touch()
    assert (await _refused(binaries, empty)).code == ErrorCode.INVALID_INPUT

    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    async with asyncio.timeout(10):
        assert (await _refused(binaries, fifo)).code == ErrorCode.INVALID_INPUT

    assert (await _refused(binaries, tmp_path)).code == ErrorCode.INVALID_INPUT


@pytest.mark.parametrize(
    ("limits", "named"),
    [
        (ProbeLimits(max_pixels=320 * 240), "max_pixels"),
        (ProbeLimits(max_duration_s=1.0), "max_duration_s"),
        (ProbeLimits(max_streams=1), "max_streams"),
        (ProbeLimits(max_fps=24.0), "max_fps"),
    ],
)
async def test_limits(binaries: Binaries, clip_3s: Path, limits: ProbeLimits, named: str) -> None:
    error = await _refused(binaries, clip_3s, limits=limits)
    assert error.code == ErrorCode.INPUT_TOO_LARGE
    assert named in error.message


def _hanging_ffprobe(directory: Path) -> tuple[Path, Path]:
    script, pidfile = directory / "ffprobe", directory / "ffprobe.pid"
    script.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 60\n")
    script.chmod(0o755)
    return script, pidfile


async def test_a_probe_past_its_deadline_is_killed(
    binaries: Binaries, clip_3s: Path, tmp_path: Path
) -> None:
    # A stand-in ffprobe that never answers, as ffprobe would on a pathological file.
    script, pidfile = _hanging_ffprobe(tmp_path)
    hanging = Binaries(ffmpeg=binaries.ffmpeg, ffprobe=str(script))
    task = asyncio.create_task(_refused(hanging, clip_3s, timeout_s=1.5))
    async with asyncio.timeout(10):
        pid_text = await _eventually(lambda: _read(pidfile))
        error = await task
    assert error.code == ErrorCode.TIMEOUT
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_text), 0)  # killed and reaped: not even a zombie is left


async def _eventually(probe_value: Callable[[], str]) -> str:
    """Poll a condition the test cannot be notified of (a file another process writes)."""
    while True:
        if value := probe_value():
            return value
        await asyncio.sleep(0.01)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


async def test_text_named_like_an_image_is_invalid_input(binaries, tmp_path):  # type: ignore[no-untyped-def]
    fake = tmp_path / "notes.png"
    fake.write_text("not a picture at all\n" * 20)
    with pytest.raises(FFmpegError) as caught:
        await probe(binaries, str(fake))
    assert caught.value.code == ErrorCode.INVALID_INPUT and caught.value.non_retryable


async def test_probe_meta_round_trips_to_the_same_typed_info(binaries: Binaries,
                                                            clip_3s: Path) -> None:
    """What the probe step reports as meta is what a stage gets back from ``ctx.probe()``."""
    import msgspec

    info = await probe(binaries, str(clip_3s))
    meta = msgspec.json.decode(msgspec.json.encode(info))  # as it travels on the bus
    assert [s["codec_type"] for s in meta["streams"]] == ["video", "audio"]
    assert msgspec.convert(meta, MediaInfo) == info
    video = info.video
    assert video is not None
    assert (video.sar, video.field_order, video.avg_frame_rate) == ("1:1", "progressive",
                                                                    "25/1")


def test_video_stream_derived_facts() -> None:
    pal_wide = VideoStream(width=720, height=576, sar="64:45")
    assert pal_wide.display_size == (1024, 576)
    turned = VideoStream(width=720, height=576, sar="64:45", rotation=90)
    assert turned.display_size == (576, 1024)
    assert VideoStream(width=10, height=10, sar="0:1").display_size == (10, 10)
    assert VideoStream(field_order="tt").interlaced and VideoStream(field_order="bb").interlaced
    assert not VideoStream(field_order="progressive").interlaced
    assert not VideoStream().interlaced  # unknown is not a reason to deinterlace
    assert VideoStream(color_transfer="smpte2084").hdr
    assert VideoStream(color_transfer="arib-std-b67").hdr
    assert not VideoStream(color_transfer="bt709").hdr
    assert VideoStream(pix_fmt="yuv420p10le").bit_depth == 10
    assert VideoStream(pix_fmt="yuv420p").bit_depth == 8


@pytest.mark.parametrize(("streams", "what"), [
    ([AudioStream(index=0)], "audio only"),
    ([AudioStream(index=0), VideoStream(index=1, width=8, height=8, attached_pic=True)],
     "only cover art"),
])
def test_require_video_says_what_the_input_has(streams: list[object], what: str) -> None:
    from shared.errors import PermanentError

    info = MediaInfo(streams=streams)  # type: ignore[arg-type]
    with pytest.raises(PermanentError) as caught:
        info.require_video()
    assert caught.value.code == ErrorCode.NO_VIDEO_STREAM and what in caught.value.message


def test_still_pictures_are_told_from_clips() -> None:
    picture = [VideoStream(index=0, width=8, height=8)]
    assert MediaInfo(format_name="image2", duration_s=0.04, streams=picture).still
    assert MediaInfo(format_name="png_pipe", streams=picture).still
    assert not MediaInfo(format_name="gif", duration_s=2.0, streams=picture).still
    assert not MediaInfo(format_name="mov,mp4,m4a,3gp,3g2,mj2", duration_s=2.0,
                         streams=picture).still
