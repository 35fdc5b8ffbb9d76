"""ffprobe an untrusted file into a typed :class:`MediaInfo`, refusing what we will not render.

Every input a user hands us is probed before any stage decodes it, so this is where hostile
files are turned away:

* only demuxers on the allowlist (:mod:`shared.media.allowlist`) may read it: ffprobe
  enforces that itself (``-format_whitelist``), so formats that make the demuxer open
  *other* files (HLS and DASH playlists, ``ffconcat`` lists, SDP, image sequences) are
  refused with ``unsupported_format`` before they read anything; the first bytes are also
  sniffed for playlists before ffprobe sees them, and the demuxer it picked is checked again;
* video and audio streams must use allowlisted codecs (``unsupported_codec``);
* ffprobe may only use the ``file`` protocol, and reads a bounded amount of data;
* a probe that hangs is killed; a file is then treated as bad, not the run as unlucky;
* sizes beyond :class:`ProbeLimits` (the ``JETCUT_INPUT_MAX_*`` settings) are refused with
  ``input_too_large`` before a decoder is pointed at them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import stat
from typing import TYPE_CHECKING, Any

import msgspec

from shared.children import die_with_parent_hook
from shared.errors import ErrorCode, FFmpegError
from shared.media.allowlist import (
    FORMAT_WHITELIST,
    codec_allowed,
    format_allowed,
    refused_format,
)
from shared.media.binaries import Binaries, child_env
from shared.media.runner import CRASH_SIGNALS

if TYPE_CHECKING:
    from shared.settings import Settings

__all__ = ["REFUSED_FORMATS", "MediaInfo", "ProbeLimits", "StreamInfo", "probe", "run_ffprobe"]

REFUSED_FORMATS = frozenset(
    {
        "hls",
        "applehttp",
        "dash",
        "webm_dash_manifest",
        "concat",
        "ffconcat",
        "lavfi",
        "tee",
        "sdp",
        "rtsp",
        "rtp",
    }
)
"""Demuxers that read other files or URLs named inside the input."""

_SNIFF_BYTES = 4096
# Playlists and lists are text; a leading BOM or blank lines do not stop ffmpeg's probes.
_REFERENCE_MAGIC = (b"#EXTM3U", b"ffconcat", b"<?xml", b"<MPD", b"v=0")


class ProbeLimits(msgspec.Struct, frozen=True, kw_only=True):
    """Largest input jetcut agrees to process. Anything above is refused as invalid input.

    Attributes:
        max_pixels: width x height of any video stream (default 8192 x 8192).
        max_duration_s: container duration (default 4 hours).
        max_streams: streams of any kind (default 16).
        max_fps: average frame rate of any video stream (default 240).
    """

    max_pixels: int = 8192 * 8192
    max_duration_s: float = 4 * 3600.0
    max_streams: int = 16
    max_fps: float = 240.0

    @classmethod
    def from_settings(cls, settings: Settings) -> ProbeLimits:
        """The limits an operator set with ``JETCUT_INPUT_MAX_*``."""
        return cls(max_pixels=settings.input_max_pixels,
                   max_duration_s=settings.input_max_duration_s,
                   max_streams=settings.input_max_streams, max_fps=settings.input_max_fps)


class StreamInfo(msgspec.Struct, frozen=True):
    """One stream as ffprobe reported it.

    ``rotation`` is the counter-clockwise rotation, in degrees, that a player applies to the
    decoded frames for display: always one of 0, 90, 180, 270. That is the sign convention of
    ffmpeg 6's display matrix (``ffprobe``'s ``side_data_list[].rotation``, and
    ``ffmpeg -display_rotation``); the legacy clockwise ``rotate`` tag of older muxers is
    converted, and odd angles are rounded to the nearest quarter turn. ``width``/``height``
    are the coded size; use :attr:`MediaInfo.display_width`/``display_height`` for the
    displayed one.
    """

    index: int
    codec_type: str
    codec_name: str | None
    width: int | None = None
    height: int | None = None
    pix_fmt: str | None = None
    fps: float | None = None
    rotation: int = 0
    sample_rate: int | None = None
    channels: int | None = None
    duration_s: float | None = None
    bit_rate: int | None = None
    attached_pic: bool = False
    """Cover art stored as a one-frame video stream (not the picture you render)."""


class MediaInfo(msgspec.Struct, frozen=True):
    """What a stage needs to know about an input before touching it."""

    format_name: str
    duration_s: float
    size_bytes: int
    bit_rate: int | None
    streams: list[StreamInfo]

    @property
    def video(self) -> StreamInfo | None:
        """The first real video stream (cover art is skipped), or ``None``."""
        for stream in self.streams:
            if stream.codec_type == "video" and not stream.attached_pic:
                return stream
        return None

    @property
    def audio(self) -> StreamInfo | None:
        """The first audio stream, or ``None``."""
        for stream in self.streams:
            if stream.codec_type == "audio":
                return stream
        return None

    @property
    def has_video(self) -> bool:
        return self.video is not None

    @property
    def has_audio(self) -> bool:
        return self.audio is not None

    @property
    def display_width(self) -> int | None:
        """Width as displayed: coded height when the video is turned a quarter."""
        video = self.video
        if video is None:
            return None
        return video.height if video.rotation in (90, 270) else video.width

    @property
    def display_height(self) -> int | None:
        """Height as displayed: coded width when the video is turned a quarter."""
        video = self.video
        if video is None:
            return None
        return video.width if video.rotation in (90, 270) else video.height


async def probe(
    binaries: Binaries,
    path: str,
    *,
    timeout_s: float = 30.0,
    limits: ProbeLimits | None = None,
) -> MediaInfo:
    """Probe a local file that nobody vouches for.

    Args:
        binaries: where ffprobe lives.
        path: a local file (never a URL: only the ``file`` protocol is allowed).
        timeout_s: the probe is killed after this long.
        limits: size limits; ``None`` uses :class:`ProbeLimits` defaults.

    Returns:
        Format and streams of the file.

    Raises:
        FFmpegError: ``input_not_found`` when there is no such file; not retryable:
            ``unsupported_format`` for a demuxer off the allowlist (playlists and other
            reference formats included), ``unsupported_codec`` for a video or audio codec
            off it, ``input_too_large`` beyond ``limits``, ``invalid_input`` when it is not
            media ffprobe can parse or has neither audio nor video, ``timeout`` when
            ffprobe runs past ``timeout_s``; ``ffmpeg_failed`` (retryable) when ffprobe was
            killed by a signal or could not be started.
    """
    limits = limits or ProbeLimits()
    path, size = await asyncio.to_thread(_check_file, path)

    stdout, stderr, returncode = await _run_ffprobe(binaries, path, timeout_s)
    reason = _last_line(stderr)
    if returncode < 0:
        crashed = -returncode in CRASH_SIGNALS  # deterministic on this file: never retry
        raise FFmpegError(
            ErrorCode.INVALID_INPUT if crashed else ErrorCode.FFMPEG_FAILED,
            f"ffprobe {'crashed on this input' if crashed else 'was killed'} "
            f"(signal {-returncode})",
            non_retryable=crashed,
            returncode=returncode,
            stderr_tail=stderr,
        )
    if returncode != 0:
        detected = refused_format(stderr)
        if detected is not None:
            raise _unsupported(f"refusing input format {detected!r}: jetcut reads media "
                               "containers only, never playlists or lists that name other "
                               "files", returncode, stderr)
        raise _invalid(f"not a media file ffprobe can read: {reason}", returncode, stderr)
    try:
        raw = msgspec.json.decode(stdout)
    except msgspec.DecodeError as exc:
        raise _invalid(f"ffprobe output unreadable: {exc}", returncode, stderr) from exc

    info = _media_info(raw if isinstance(raw, dict) else {}, size)
    refused = REFUSED_FORMATS.intersection(info.format_name.split(","))
    if refused or (info.format_name.startswith("image2") and "%" in os.path.basename(path)):
        raise _unsupported(
            f"refusing playlist/reference format {info.format_name!r}: it names other files",
            returncode,
            stderr,
        )
    if not format_allowed(info.format_name):
        raise _unsupported(f"refusing input format {info.format_name!r}: not a media "
                           "container jetcut reads", returncode, stderr)
    if not (info.has_video or info.has_audio):
        raise _invalid("no audio or video stream in the input", returncode, stderr)
    _check_codecs(info)
    _check_limits(info, limits)
    return info


def _check_file(path: str) -> tuple[str, int]:
    path = os.path.abspath(path)
    try:
        # O_NONBLOCK: opening a FIFO must not hang us; only regular files pass anyway.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError as exc:
        raise FFmpegError(
            ErrorCode.INPUT_NOT_FOUND, f"no input file at {path}", non_retryable=True
        ) from exc
    except OSError as exc:
        raise _invalid(f"input is not a readable file: {exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _invalid(f"input is not a regular file: {path}")
        head = os.read(fd, _SNIFF_BYTES)
    finally:
        os.close(fd)
    if st.st_size == 0:
        raise _invalid("input file is empty")
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if start.startswith(_REFERENCE_MAGIC):
        raise _unsupported(
            "refusing playlist/reference format: the input is a playlist, manifest or "
            "file list that names other files"
        )
    return path, st.st_size


async def run_ffprobe(
    binaries: Binaries, args: list[str], timeout_s: float
) -> tuple[bytes, str, int]:
    """Run ffprobe with ``args`` (without the binary): (stdout, stderr tail, exit status).

    The one place ffprobe is spawned: its own process group, killed and reaped on timeout
    or cancellation, the environment the bundled build needs.

    Raises:
        FFmpegError: ``timeout`` (a probe that hangs on a file: the file is treated as bad)
            or ``ffmpeg_failed`` when ffprobe cannot be started.
    """
    if "-f" not in args and "-format_whitelist" not in args:
        # Every probe of a file is a probe of untrusted bytes: never let a playlist in it
        # make ffprobe open other files (the caller chose the demuxer when it passes -f).
        args = ["-format_whitelist", FORMAT_WHITELIST, *args]
    try:
        proc = await asyncio.create_subprocess_exec(
            binaries.ffprobe, *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            preexec_fn=die_with_parent_hook(),  # a killed worker leaves no ffprobe behind
            env=child_env(binaries),
        )
    except OSError as exc:
        raise FFmpegError(
            ErrorCode.FFMPEG_FAILED, f"could not start ffprobe: {exc}", non_retryable=False
        ) from exc
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout_s)
    except BaseException as exc:
        # Timeout or our task cancelled: a probe has nothing to flush, kill it outright,
        # and reap it so no zombie is left behind.
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.shield(proc.wait())
        if isinstance(exc, TimeoutError):
            raise FFmpegError(
                ErrorCode.TIMEOUT,
                f"ffprobe did not finish within {timeout_s:g}s; the file is treated as bad",
                non_retryable=True,
            ) from None
        raise
    assert proc.returncode is not None
    return stdout, stderr.decode("utf-8", "replace")[-8192:], proc.returncode


async def _run_ffprobe(binaries: Binaries, path: str, timeout_s: float) -> tuple[bytes, str, int]:
    return await run_ffprobe(binaries, [
        "-v", "error",
        "-print_format", "json",
        "-show_format",
        "-show_streams",
        "-protocol_whitelist", "file",
        "-probesize", "50M",
        "-analyzeduration", "100M",
        # "file:" so a name like "concat:x" or "http:x" is a file name, not a protocol.
        "file:" + path,
    ], timeout_s)  # fmt: skip


def _media_info(raw: dict[str, Any], size: int) -> MediaInfo:
    fmt = raw.get("format") or {}
    streams = [_stream_info(s) for s in raw.get("streams") or [] if isinstance(s, dict)]
    duration = _float(fmt.get("duration"))
    if duration is None:
        durations = [s.duration_s for s in streams if s.duration_s is not None]
        duration = max(durations, default=0.0)
    return MediaInfo(
        format_name=str(fmt.get("format_name") or ""),
        duration_s=duration,
        size_bytes=_int(fmt.get("size")) or size,
        bit_rate=_int(fmt.get("bit_rate")),
        streams=streams,
    )


def _stream_info(raw: dict[str, Any]) -> StreamInfo:
    codec_type = str(raw.get("codec_type") or "unknown")
    disposition = raw.get("disposition") or {}
    attached_pic = bool(disposition.get("attached_pic")) if isinstance(disposition, dict) else False
    video = codec_type == "video"
    return StreamInfo(
        index=_int(raw.get("index")) or 0,
        codec_type=codec_type,
        codec_name=raw.get("codec_name"),
        width=_int(raw.get("width")) if video else None,
        height=_int(raw.get("height")) if video else None,
        pix_fmt=raw.get("pix_fmt") if video else None,
        # Cover art reports a 90000/1 "rate"; it has no frame rate worth the name.
        fps=_fps(raw) if video and not attached_pic else None,
        rotation=_rotation(raw) if video else 0,
        sample_rate=_int(raw.get("sample_rate")),
        channels=_int(raw.get("channels")),
        duration_s=_float(raw.get("duration")),
        bit_rate=_int(raw.get("bit_rate")),
        attached_pic=attached_pic,
    )


def _fps(raw: dict[str, Any]) -> float | None:
    for key in ("avg_frame_rate", "r_frame_rate"):
        num, _, den = str(raw.get(key) or "").partition("/")
        try:
            value = float(num) / float(den or 1)
        except (ValueError, ZeroDivisionError):
            continue
        if value > 0 and math.isfinite(value):
            return value
    return None


def _rotation(raw: dict[str, Any]) -> int:
    degrees: float | None = None
    for side in raw.get("side_data_list") or []:
        if isinstance(side, dict) and "rotation" in side:
            degrees = _float(side["rotation"])
            break
    if degrees is None:
        legacy = _float((raw.get("tags") or {}).get("rotate"))
        # The old tag is clockwise; the display matrix angle is counter-clockwise.
        degrees = -legacy if legacy is not None else 0.0
    return (round(degrees / 90) * 90) % 360


def _check_codecs(info: MediaInfo) -> None:
    refused = [f"stream {s.index} ({s.codec_type}: {s.codec_name or 'unknown'})"
               for s in info.streams if not codec_allowed(s.codec_type, s.codec_name)]
    if refused:
        raise FFmpegError(ErrorCode.UNSUPPORTED_CODEC,
                          "refusing codecs jetcut does not decode: " + ", ".join(refused),
                          non_retryable=True)


def _check_limits(info: MediaInfo, limits: ProbeLimits) -> None:
    problems: list[str] = []
    if len(info.streams) > limits.max_streams:
        problems.append(f"{len(info.streams)} streams > max_streams {limits.max_streams}")
    if info.duration_s > limits.max_duration_s:
        problems.append(f"duration {info.duration_s:g}s > max_duration_s {limits.max_duration_s:g}")
    for s in info.streams:
        if s.codec_type != "video" or s.attached_pic:
            continue
        if not s.width or not s.height:
            # What ffprobe reports for a text file named like an image (image2 by extension).
            raise _invalid(f"stream {s.index} has no picture size")
        if s.width * s.height > limits.max_pixels:
            problems.append(
                f"stream {s.index} is {s.width}x{s.height} > max_pixels {limits.max_pixels}"
            )
        if s.fps is not None and s.fps > limits.max_fps:
            problems.append(f"stream {s.index} at {s.fps:g} fps > max_fps {limits.max_fps:g}")
    if problems:
        raise FFmpegError(ErrorCode.INPUT_TOO_LARGE,
                          "input exceeds probe limits: " + "; ".join(problems),
                          non_retryable=True)


def _invalid(message: str, returncode: int | None = None, stderr: str = "") -> FFmpegError:
    return FFmpegError(
        ErrorCode.INVALID_INPUT,
        message,
        non_retryable=True,
        returncode=returncode,
        stderr_tail=stderr,
    )


def _unsupported(message: str, returncode: int | None = None, stderr: str = "") -> FFmpegError:
    return FFmpegError(
        ErrorCode.UNSUPPORTED_FORMAT,
        message,
        non_retryable=True,
        returncode=returncode,
        stderr_tail=stderr,
    )


def _float(value: object) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _int(value: object) -> int | None:
    number = _float(value)
    return int(number) if number is not None else None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no stderr)"
