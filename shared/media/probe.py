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
import re
import signal
import stat
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import msgspec

from shared.children import die_with_parent_hook
from shared.errors import ErrorCode, FFmpegError, PermanentError
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

__all__ = [
    "HDR_TRANSFERS",
    "IMAGE_FORMATS",
    "REFUSED_FORMATS",
    "AudioStream",
    "MediaInfo",
    "ProbeLimits",
    "Stream",
    "StreamInfo",
    "VideoStream",
    "probe",
    "run_ffprobe",
]

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

IMAGE_FORMATS = frozenset({"image2", "png_pipe", "jpeg_pipe", "bmp_pipe", "webp_pipe",
                           "tiff_pipe", "gif"})
"""Demuxers of single pictures (and GIF, which may be animated)."""

INTERLACED_FIELD_ORDERS = frozenset({"tt", "bb", "tb", "bt"})
"""ffprobe ``field_order`` values of interlaced video (``tt``/``tb``: top field first)."""

HDR_TRANSFERS = frozenset({"smpte2084", "arib-std-b67"})
"""Transfer characteristics of HDR video: PQ (HDR10, Dolby Vision base) and HLG."""

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


class Stream(msgspec.Struct, frozen=True, kw_only=True, tag_field="codec_type"):
    """What every stream has, whatever its kind. ``codec_type`` (ffprobe's word for the
    kind: ``video``, ``audio``, ...) is the tag that picks the subclass when decoding."""

    index: int = 0
    codec_name: str | None = None
    profile: str | None = None
    duration_s: float | None = None
    start_time_s: float | None = None
    bit_rate: int | None = None

    @property
    def codec_type(self) -> str:
        return str(self.__struct_config__.tag)


class VideoStream(Stream, frozen=True, kw_only=True, tag="video"):
    """A picture stream, with what a stage needs to draw it right.

    ``rotation`` is the counter-clockwise rotation, in degrees, that a player applies to the
    decoded frames for display: always one of 0, 90, 180, 270. That is the sign convention of
    ffmpeg 6's display matrix (``ffprobe``'s ``side_data_list[].rotation``, and
    ``ffmpeg -display_rotation``); the legacy clockwise ``rotate`` tag of older muxers is
    converted, and odd angles are rounded to the nearest quarter turn. ``width``/``height``
    are the coded size; :attr:`display_size` is the one a viewer sees.
    """

    width: int | None = None
    height: int | None = None
    sar: str | None = None
    """Sample (pixel) aspect ratio as ffprobe prints it (``"64:45"``); None when unset."""
    pix_fmt: str | None = None
    fps: float | None = None
    """Average frame rate (``avg_frame_rate``, else ``r_frame_rate``); None for cover art."""
    avg_frame_rate: str | None = None
    r_frame_rate: str | None = None
    nb_frames: int | None = None
    time_base: str | None = None
    """The stream's time base (``"1/1000"``): the grid its timestamps are exact on."""
    rotation: int = 0
    field_order: str | None = None
    """``progressive``, ``tt``/``tb`` (top field first), ``bb``/``bt``, or None (unknown)."""
    color_range: str | None = None
    color_space: str | None = None
    color_transfer: str | None = None
    color_primaries: str | None = None
    attached_pic: bool = False
    """Cover art stored as a one-frame video stream (not the picture you render)."""

    @property
    def sar_ratio(self) -> Fraction:
        """The pixel aspect ratio as a number; square (1) when unset or nonsense."""
        num, _, den = str(self.sar or "").partition(":")
        try:
            value = Fraction(int(num), int(den))
        except (ValueError, ZeroDivisionError):
            return Fraction(1)
        return value if value > 0 else Fraction(1)

    @property
    def quarter_turned(self) -> bool:
        return self.rotation % 180 == 90

    @property
    def display_size(self) -> tuple[int, int]:
        """Width and height as a viewer sees the picture, in square pixels: the coded width
        stretched by the pixel aspect ratio, then swapped for a quarter turn."""
        width = max(1, round((self.width or 0) * self.sar_ratio)) if self.width else 0
        height = self.height or 0
        return (height, width) if self.quarter_turned else (width, height)

    @property
    def interlaced(self) -> bool:
        """Whether the stream says its frames are two fields (``tt``, ``bb``, ``tb``, ``bt``)."""
        return self.field_order in INTERLACED_FIELD_ORDERS

    @property
    def hdr(self) -> bool:
        """High dynamic range: a PQ (``smpte2084``) or HLG (``arib-std-b67``) transfer."""
        return self.color_transfer in HDR_TRANSFERS

    @property
    def bit_depth(self) -> int:
        """Bits per sample of the pixel format (8 unless its name says 10, 12 or 16)."""
        match = re.search(r"p(9|10|12|14|16)(le|be)?$", self.pix_fmt or "")
        return int(match.group(1)) if match else 8


class AudioStream(Stream, frozen=True, kw_only=True, tag="audio"):
    """A sound stream."""

    sample_rate: int | None = None
    channels: int | None = None
    channel_layout: str | None = None


class SubtitleStream(Stream, frozen=True, kw_only=True, tag="subtitle"):
    """Text or bitmap captions (never rendered unless a stage asks for them)."""


class DataStream(Stream, frozen=True, kw_only=True, tag="data"):
    """Timecode, GPS and other data tracks."""


class AttachmentStream(Stream, frozen=True, kw_only=True, tag="attachment"):
    """A file attached to the container (Matroska fonts)."""


class UnknownStream(Stream, frozen=True, kw_only=True, tag="unknown"):
    """A stream ffprobe could not classify."""


StreamInfo = (VideoStream | AudioStream | SubtitleStream | DataStream | AttachmentStream
              | UnknownStream)
"""Any stream, told apart by ``codec_type``."""

_STREAM_TYPES: dict[str, type[Stream]] = {
    "video": VideoStream, "audio": AudioStream, "subtitle": SubtitleStream,
    "data": DataStream, "attachment": AttachmentStream}


class MediaInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What a stage needs to know about an input before touching it: decoded once from
    ffprobe's JSON (:func:`probe`), carried as the probe step's meta, and turned back into
    this type by ``StageContext.probe()`` (``msgspec.convert``), so no stage walks dicts."""

    format_name: str = ""
    duration_s: float = 0.0
    start_time_s: float | None = None
    size_bytes: int = 0
    bit_rate: int | None = None
    streams: list[StreamInfo] = []

    @property
    def videos(self) -> list[VideoStream]:
        """Every video stream, cover art included, in file order (what ``v:<n>`` counts)."""
        return [s for s in self.streams if isinstance(s, VideoStream)]

    @property
    def audios(self) -> list[AudioStream]:
        """Every audio stream in file order (what ``a:<n>`` counts)."""
        return [s for s in self.streams if isinstance(s, AudioStream)]

    @property
    def video(self) -> VideoStream | None:
        """The first real video stream (cover art is skipped), or ``None``: the one place
        "which picture do we render" is decided."""
        return next((s for s in self.videos if not s.attached_pic), None)

    @property
    def audio(self) -> AudioStream | None:
        """The first audio stream, or ``None``."""
        audios = self.audios
        return audios[0] if audios else None

    @property
    def has_video(self) -> bool:
        return self.video is not None

    @property
    def has_audio(self) -> bool:
        return self.audio is not None

    @property
    def still(self) -> bool:
        """A single picture (JPEG, PNG, WebP, BMP, TIFF, a one-frame GIF): it has no
        timeline, so stages take its one frame instead of seeking, and clips made from it
        get their length from a param."""
        video = self.video
        if video is None or self.format_name not in IMAGE_FORMATS:
            return False
        if self.format_name != "gif":
            return True
        return video.nb_frames == 1 or self.duration_s <= 0

    def require_video(self, why: str = "") -> VideoStream:
        """The picture to render, or ``no_video_stream`` saying what the input has instead.

        Raises:
            PermanentError: ``no_video_stream`` (audio only, only cover art, no picture);
                ``invalid_input`` when the video stream has no size.
        """
        video = self.video
        if video is None:
            what = ("only cover art" if self.videos else "audio only" if self.has_audio
                    else "no picture")
            raise PermanentError(ErrorCode.NO_VIDEO_STREAM,
                                 f"the input has no video stream ({what})"
                                 + (f"; {why}" if why else ""))
        if not video.width or not video.height:
            raise PermanentError(ErrorCode.INVALID_INPUT, "the video stream has no size")
        return video

    def video_ordinal(self, stream: VideoStream) -> int:
        """``stream``'s position among the video streams: the ``n`` of ffmpeg's ``v:n``."""
        return next(i for i, s in enumerate(self.videos) if s.index == stream.index)

    def audio_ordinal(self, stream: AudioStream) -> int:
        """``stream``'s position among the audio streams: the ``n`` of ffmpeg's ``a:n``."""
        return next(i for i, s in enumerate(self.audios) if s.index == stream.index)

    @property
    def display_width(self) -> int | None:
        """Width as displayed (square pixels, rotation applied), or None without video."""
        video = self.video
        return video.display_size[0] if video is not None else None

    @property
    def display_height(self) -> int | None:
        """Height as displayed (square pixels, rotation applied), or None without video."""
        video = self.video
        return video.display_size[1] if video is not None else None


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
        start_time_s=_float(fmt.get("start_time")),
        size_bytes=_int(fmt.get("size")) or size,
        bit_rate=_int(fmt.get("bit_rate")),
        streams=streams,
    )


def _stream_info(raw: dict[str, Any]) -> StreamInfo:
    codec_type = str(raw.get("codec_type") or "unknown")
    common: dict[str, Any] = {
        "index": _int(raw.get("index")) or 0,
        "codec_name": raw.get("codec_name"),
        "profile": _str(raw.get("profile")),
        "duration_s": _float(raw.get("duration")),
        "start_time_s": _float(raw.get("start_time")),
        "bit_rate": _int(raw.get("bit_rate")),
    }
    if codec_type == "video":
        disposition = raw.get("disposition") or {}
        attached_pic = (bool(disposition.get("attached_pic"))
                        if isinstance(disposition, dict) else False)
        sar = _str(raw.get("sample_aspect_ratio"))
        return VideoStream(
            **common,
            width=_int(raw.get("width")),
            height=_int(raw.get("height")),
            sar=None if sar in (None, "0:1", "N/A") else sar,
            pix_fmt=_str(raw.get("pix_fmt")),
            # Cover art reports a 90000/1 "rate"; it has no frame rate worth the name.
            fps=None if attached_pic else _fps(raw),
            avg_frame_rate=_str(raw.get("avg_frame_rate")),
            r_frame_rate=_str(raw.get("r_frame_rate")),
            nb_frames=_int(raw.get("nb_frames")),
            time_base=_str(raw.get("time_base")),
            rotation=_rotation(raw),
            field_order=_str(raw.get("field_order")),
            color_range=_str(raw.get("color_range")),
            color_space=_str(raw.get("color_space")),
            color_transfer=_str(raw.get("color_transfer")),
            color_primaries=_str(raw.get("color_primaries")),
            attached_pic=attached_pic,
        )
    if codec_type == "audio":
        return AudioStream(**common, sample_rate=_int(raw.get("sample_rate")),
                           channels=_int(raw.get("channels")),
                           channel_layout=_str(raw.get("channel_layout")))
    kind = _STREAM_TYPES.get(codec_type, UnknownStream)
    return kind(**common)  # type: ignore[return-value]


def _str(value: object) -> str | None:
    """ffprobe's text field, or None for a missing or ``unknown`` value."""
    if value is None:
        return None
    text = str(value)
    return None if text in ("", "unknown", "N/A") else text


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
    for s in info.videos:
        if s.attached_pic:
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
