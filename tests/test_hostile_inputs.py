"""Hostile uploads, through the real bus, conductor, probe and stage functions and ffmpeg.

Each file here is a real attack on a media pipeline: a playlist or file list disguised as
``.mp4`` that would make ffmpeg read files outside the job or call a URL, an SDP file, a
``concat:`` name, a tiny file that declares an enormous picture or duration. Each must fail
its job with its own code, without a retry, and without anything outside the job's own
files being touched: a real HTTP listener must see no connection, a FIFO no reader, a canary
file no read (its access time, set behind its modification time so that even a ``relatime``
mount records the next read, stays put). Outputs must carry none of the source's metadata.
"""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from functions.conductor import function as conductor
from functions.probe import function as probe
from functions.thumbnail import function as thumbnail
from functions.transcode import function as transcode
from shared.errors import ErrorCode, FFmpegError
from shared.jobstate import JobRecord
from shared.media import Binaries, FFmpegRunner
from shared.runtime import Runtime
from shared.settings import Settings
from tests.support.media import ffprobe_json
from tests.support.nats import fetch_output, running, submit_job, wait_for_job

pytestmark = pytest.mark.timeout(120)
FUNCTIONS = [conductor, probe, transcode, thumbnail]


@pytest.fixture
async def runtime(make_settings: Callable[..., Settings]) -> AsyncIterator[Runtime]:
    async with running(make_settings(), FUNCTIONS) as rt:
        yield rt


class Listener:
    """A real TCP server on loopback that records every connection it accepts."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def _on_connect(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    spy = Listener()
    spy.server = await asyncio.start_server(spy._on_connect, "127.0.0.1", 0)
    async with spy.server:
        yield spy


class Canary:
    """A file outside the job that nothing may read."""

    def __init__(self, path: Path, source: Path) -> None:
        self.path = path
        path.write_bytes(source.read_bytes())
        st = path.stat()
        # atime well behind mtime: relatime (and strictatime) update it on the next read.
        os.utime(path, ns=(st.st_mtime_ns - 3600 * 10**9, st.st_mtime_ns))
        self.atime_ns = path.stat().st_atime_ns
        assert self.atime_ns < st.st_mtime_ns

    def untouched(self) -> bool:
        return self.path.stat().st_atime_ns == self.atime_ns


class Fifo:
    """A FIFO outside the job, with a writer thread that gets through ``open()`` only once
    some process opens the FIFO for reading."""

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)
        self.opened = threading.Event()
        self.thread = threading.Thread(target=self._write, daemon=True)
        self.thread.start()

    def _write(self) -> None:
        with open(self.path, "wb"):
            self.opened.set()

    def release(self) -> None:
        """Let the writer finish: open the read end ourselves."""
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        self.thread.join(5)
        os.close(fd)


def refused_once(record: JobRecord, code: str) -> None:
    """Failed with ``code``, every step run at most once, none of them retried."""
    assert record.status == "failed", record
    assert record.error is not None and record.error.code == code, record.error
    for name, step in record.steps.items():
        assert step.attempt <= 1 and step.lease <= 1, (name, step.attempt, step.lease)
        assert step.last_error is None, (name, step.last_error)


def playlist(*segments: str) -> str:
    body = "".join(f"#EXTINF:3.0,\n{s}\n" for s in segments)
    return f"#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:3\n{body}#EXT-X-ENDLIST\n"


async def test_hls_playlist_disguised_as_mp4_reads_nothing_and_calls_nobody(
    runtime: Runtime, listener: Listener, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    fifo = Fifo(outside / "canary.ts")
    evil = tmp_path / "evil.mp4"
    evil.write_text(playlist(str(fifo.path), f"http://127.0.0.1:{listener.port}/seg.ts"))
    try:
        record = await wait_for_job(runtime.services, await submit_job(runtime, [evil],
                                                                       recipe="web"))
        refused_once(record, "unsupported_format")
        assert "playlist" in record.error.message  # type: ignore[union-attr]
        assert not fifo.opened.is_set(), "something opened the FIFO outside the job"
        assert listener.connections == 0, "the listener was called"
    finally:
        fifo.release()


async def test_every_ffmpeg_run_refuses_a_playlist_even_without_a_probe(
    binaries: Binaries, listener: Listener, clip_3s: Path, tmp_path: Path
) -> None:
    # Defence in depth below the probe gate: a stage that ran ffmpeg on an input nobody
    # probed would still not follow it. The file protocol is allowed (the playlist names a
    # local file), so only the runner's demuxer allowlist stands between ffmpeg and the
    # canary: without it, this very command reads it (checked below).
    canary = Canary(tmp_path / "outside.mp4", clip_3s)
    evil = tmp_path / "evil.mp4"
    evil.write_text(playlist(str(canary.path), f"http://127.0.0.1:{listener.port}/seg.ts"))
    runner = FFmpegRunner(binaries)
    args = ["-i", str(evil), "-f", "null", "-"]
    with pytest.raises(FFmpegError) as caught:
        await runner.run(args, timeout_s=30)
    assert caught.value.code == ErrorCode.UNSUPPORTED_FORMAT and caught.value.non_retryable
    assert "'hls'" in caught.value.message
    assert canary.untouched(), "ffmpeg read the canary file outside the job"
    assert listener.connections == 0

    # The control: the same command without the allowlist follows the playlist (it then
    # fails on the http segment, but it has read the canary by then).
    await asyncio.to_thread(subprocess.run, [binaries.ffmpeg, "-v", "error",
                            "-protocol_whitelist", "file", "-i", str(evil), "-f", "null", "-"],
                            capture_output=True, timeout=60)
    assert not canary.untouched(), "the control did not read the canary: test proves nothing"


async def test_ffconcat_list_disguised_as_mp4(
    runtime: Runtime, clip_3s: Path, tmp_path: Path
) -> None:
    canary = Canary(tmp_path / "outside.mp4", clip_3s)
    evil = tmp_path / "list.mp4"
    evil.write_text(f"ffconcat version 1.0\nfile '{canary.path}'\nfile '{canary.path}'\n")
    record = await wait_for_job(runtime.services, await submit_job(runtime, [evil],
                                                                   recipe="web"))
    refused_once(record, "unsupported_format")
    assert canary.untouched()


async def test_concat_protocol_name_is_just_a_file_name(
    runtime: Runtime, clip_3s: Path, tmp_path: Path
) -> None:
    # A file *named* like ffmpeg's concat: protocol, whose bytes spell the trick too: jetcut
    # never hands ffmpeg a user's name, and reads the bytes as a file, which is not media.
    canary = Canary(tmp_path / "outside.mp4", clip_3s)
    evil = tmp_path / f"concat:{canary.path.name}|{canary.path.name}"
    evil.write_text(f"concat:{canary.path}|{canary.path}\n")
    record = await wait_for_job(runtime.services, await submit_job(runtime, [evil],
                                                                   recipe="web"))
    refused_once(record, "invalid_input")
    assert canary.untouched()


@pytest.mark.parametrize("first_line", ["v=0\n", ""], ids=["sniffed", "probed"])
async def test_sdp_file_disguised_as_mp4(
    runtime: Runtime, listener: Listener, tmp_path: Path, first_line: str
) -> None:
    # Without its "v=0" line no sniffing sees an SDP file; ffprobe's demuxer allowlist must.
    evil = tmp_path / "stream.mp4"
    evil.write_text(f"{first_line}o=- 0 0 IN IP4 127.0.0.1\ns=evil\nc=IN IP4 127.0.0.1\nt=0 0\n"
                    f"m=video {listener.port} RTP/AVP 96\na=rtpmap:96 H264/90000\n")
    record = await wait_for_job(runtime.services, await submit_job(runtime, [evil],
                                                                   recipe="web"))
    refused_once(record, "unsupported_format")
    if not first_line:
        assert "'sdp'" in record.error.message  # type: ignore[union-attr]
    assert listener.connections == 0


def _gif_declaring(width: int, height: int) -> bytes:
    """A valid 1x1 GIF whose logical screen claims ``width`` x ``height``: 40 bytes that
    would make a decoder allocate width*height*4."""
    return (b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00"
            + b"\x2c" + struct.pack("<HHHH", 0, 0, 1, 1) + b"\x00"
            + b"\x02\x02\x44\x01\x00" + b"\x3b")


def _mp3_declaring_frames(binaries: Binaries, path: Path, frames: int) -> Path:
    """A one-second MP3 whose Xing header claims ``frames`` frames (a duration of days)."""
    subprocess.run([binaries.ffmpeg, "-v", "error", "-y", "-f", "lavfi", "-i", "sine=d=1",
                    "-c:a", "libmp3lame", str(path)], check=True, timeout=60)
    data = bytearray(path.read_bytes())
    at = max(data.find(b"Xing"), data.find(b"Info"))
    assert at > 0 and struct.unpack(">I", data[at + 4:at + 8])[0] & 1  # frames field present
    struct.pack_into(">I", data, at + 8, frames)
    path.write_bytes(bytes(data))
    return path


async def test_declared_picture_bomb_is_too_large(runtime: Runtime, tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.gif"
    bomb.write_bytes(_gif_declaring(12000, 12000))
    record = await wait_for_job(runtime.services, await submit_job(runtime, [bomb],
                                                                   recipe="web"))
    refused_once(record, "input_too_large")
    assert "12000x12000 > max_pixels" in record.error.message  # type: ignore[union-attr]


async def test_declared_duration_of_days_is_too_large(
    runtime: Runtime, binaries: Binaries, tmp_path: Path
) -> None:
    liar = _mp3_declaring_frames(binaries, tmp_path / "liar.mp3", 0x7FFFFF00)
    assert liar.stat().st_size < 100_000
    record = await wait_for_job(runtime.services, await submit_job(runtime, [liar],
                                                                   recipe="audio"))
    refused_once(record, "input_too_large")
    assert "max_duration_s" in record.error.message  # type: ignore[union-attr]


@pytest.mark.parametrize(("setting", "named"), [
    ({"input_max_fps": 10.0}, "max_fps"),
    ({"input_max_streams": 1}, "max_streams"),
    ({"input_max_duration_s": 1.0}, "max_duration_s"),
])
async def test_probe_gate_caps_come_from_settings(
    make_settings: Callable[..., Settings], clip_3s: Path, setting: dict[str, Any], named: str
) -> None:
    async with running(make_settings(**setting), FUNCTIONS) as rt:
        record = await wait_for_job(rt.services, await submit_job(rt, [clip_3s], recipe="web"))
    refused_once(record, "input_too_large")
    assert named in record.error.message  # type: ignore[union-attr]


async def test_codec_off_the_allowlist_is_refused(
    runtime: Runtime, binaries: Binaries, tmp_path: Path
) -> None:
    # Real media in an allowed container, with a decoder jetcut does not expose (Cinepak).
    odd = tmp_path / "odd.avi"
    await asyncio.to_thread(subprocess.run, [binaries.ffmpeg, "-v", "error", "-y", "-f",
                            "lavfi", "-i", "testsrc2=size=64x64:rate=5", "-t", "0.4",
                            "-c:v", "cinepak", str(odd)], check=True, timeout=60)
    record = await wait_for_job(runtime.services, await submit_job(runtime, [odd],
                                                                   recipe="web"))
    refused_once(record, "unsupported_codec")
    assert "cinepak" in record.error.message  # type: ignore[union-attr]


SECRETS = ("SECRET-TITLE", "SECRET-COMMENT", "SECRET-CHAPTER", "SECRET-HANDLER",
           "+48.8583+002.2945")


def _tagged_clip(binaries: Binaries, tmp_path: Path) -> Path:
    """A clip full of metadata a user may not mean to publish: title, comment, GPS location,
    a stream handler name and language, a chapter title."""
    meta = tmp_path / "meta.txt"
    meta.write_text(";FFMETADATA1\ntitle=SECRET-TITLE\ncomment=SECRET-COMMENT\n"
                    "location=+48.8583+002.2945/\n[CHAPTER]\nTIMEBASE=1/1000\nSTART=0\n"
                    "END=500\ntitle=SECRET-CHAPTER\n")
    clip = tmp_path / "tagged.mp4"
    subprocess.run([binaries.ffmpeg, "-v", "error", "-y",
                    "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25",
                    "-f", "lavfi", "-i", "sine=sample_rate=48000", "-i", str(meta),
                    "-map", "0:v", "-map", "1:a", "-map_metadata", "2", "-map_chapters", "2",
                    "-metadata:s:v:0", "handler_name=SECRET-HANDLER",
                    "-metadata:s:a:0", "language=fra", "-t", "1",
                    "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", str(clip)],
                   check=True, timeout=60)
    source = ffprobe_json(binaries, clip)
    assert source["format"]["tags"]["title"] == "SECRET-TITLE"  # the source really has them
    return clip


def _all_tags(binaries: Binaries, path: Path) -> tuple[str, int]:
    out = subprocess.run([binaries.ffprobe, "-v", "error", "-show_entries",
                          "format_tags:stream_tags:chapter_tags", "-show_chapters",
                          "-of", "json", str(path)], capture_output=True, check=True, timeout=60)
    text = out.stdout.decode()
    return text, text.count('"start_time"')


async def test_outputs_carry_no_source_metadata(
    runtime: Runtime, binaries: Binaries, tmp_path: Path
) -> None:
    source = _tagged_clip(binaries, tmp_path)
    record = await wait_for_job(runtime.services, await submit_job(runtime, [source],
                                                                   recipe="web"))
    assert record.status == "succeeded", record.error
    video = await fetch_output(runtime, record, "transcode", "video", tmp_path / "out.mp4")
    poster = await fetch_output(runtime, record, "poster", "poster", tmp_path / "poster.jpg")
    for output in (video, poster):
        tags, chapters = _all_tags(binaries, output)
        assert chapters == 0, tags
        leaked = [s for s in (*SECRETS, '"fra"') if s in tags]
        assert not leaked, (output.name, leaked, tags)
        raw = output.read_bytes()
        assert not [s for s in SECRETS if s.encode() in raw], output.name
