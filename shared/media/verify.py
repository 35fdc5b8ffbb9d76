"""Output checks: every file a stage writes is verified before the step may finish.

A stage's exit code says ffmpeg stopped without complaint, not that the file is what the user
asked for. After a handler returns, the stage contract (``shared.stage``) calls
:func:`verify_outputs`, which checks each media output against what the stage promises
(:data:`PROMISES`) and against the source it was made from:

* ``decode``: it decodes without errors (whole when short, sampled windows when long);
* ``streams``: it has the video / audio streams the stage promised;
* ``duration``: each stream lasts as long as the source's (one frame for video, 40 ms
  for audio), measured from the packets a player shows;
* ``black`` / ``freeze``: no more black or frozen picture than the source had there
  (``blackdetect`` / ``freezedetect`` on both, same windows);
* ``quality``: for video encodes, VMAF (where the ffmpeg build has libvmaf) or SSIM against
  the source on the same windows, at low resolution, above a configurable floor.

Each result is a :class:`CheckResult` (recorded in the step's manifest and job view under
``checks``). A failed check raises :class:`OutputCheckFailed` (``output_check_failed``,
never retried: the same input makes the same output); a check that could not run at all
(ffmpeg crashed or timed out) raises a transient error, so the step is retried.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec

from shared.errors import ErrorCode, PermanentError, TransientError
from shared.events import CheckResult
from shared.media.binaries import Binaries, child_env
from shared.media.probe import MediaInfo
from shared.media.runner import PROTOCOL_WHITELIST
from shared.settings import Settings

__all__ = ["PROMISES", "OutputCheckFailed", "Promise", "checks_apply", "verify_outputs"]

MEDIA_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".webm", ".mkv", ".ts", ".m4a", ".aac",
                            ".mp3", ".opus", ".ogg", ".oga", ".wav", ".flac", ".jpg", ".jpeg",
                            ".png", ".webp", ".gif"})
"""Outputs that are checked; playlists, captions and JSON are not media."""

AUDIO_TOLERANCE_S = 0.040
EPSILON_S = 0.001
"""Rounding slack on top of a tolerance (container timestamps are whole milliseconds)."""
HDR_TRANSFERS = frozenset({"smpte2084", "arib-std-b67"})
TONEMAP = ("zscale=t=linear:npl=100,format=gbrpf32le,zscale=p=bt709,tonemap=hable:desat=0,"
           "zscale=t=bt709:m=bt709:r=tv")
"""How an HDR source is shown as SDR for the comparison with an SDR output."""
_UNTRUSTED = ("-protocol_whitelist", PROTOCOL_WHITELIST)
"""Sources are uploads: as in every stage, an input may only be a local file."""
COMPARE_WIDTH = 320
"""Quality is scored at this width (or the output's, if smaller): cheap, and enough to see a
wrong frame, a shifted timeline or a broken encode."""


class OutputCheckFailed(PermanentError):
    """An output is not what the stage promised; retrying would make the same file."""

    def __init__(self, failed: list[CheckResult], results: list[CheckResult]) -> None:
        first = failed[0]
        message = "; ".join(
            f"{r.check} check failed on output {r.output!r}: measured {_fmt(r.measured)}, "
            f"expected {_fmt(r.expected)}" + (f" ({r.note})" if r.note else "")
            for r in failed)
        super().__init__(ErrorCode.OUTPUT_CHECK_FAILED, message, details={
            "check": first.check, "output": first.output,
            "checks": msgspec.to_builtins(results)})


@dataclass(frozen=True)
class Promise:
    """What a stage promises about its media outputs.

    Attributes:
        source: which input the outputs are compared with: ``input`` (the job's main input),
            ``part`` (the part an ``encode-part`` task encodes) or None (no comparison).
        audio: ``source`` (audio when the source has it), ``never``, or ``any``.
        duration: every stream lasts as long as the source's.
        picture: no more black / frozen picture than the source.
        quality: score the picture against the source.
        whole: decode the whole output, never sampled windows (an MPEG-TS segment: seeking
            into one lands between a B-frame and its references).
    """

    source: Literal["input", "part"] | None = None
    audio: Literal["source", "never", "any"] = "any"
    duration: bool = False
    picture: bool = False
    quality: bool = False
    whole: bool = False


_WHOLE = Promise(source="input", audio="source", duration=True, picture=True, quality=True)
_OVERLAY = Promise(source="input", audio="source", duration=True, picture=True)
PROMISES: dict[str, Promise] = {
    "transcode": _WHOLE,
    "watermark": _OVERLAY,   # the picture changes on purpose: no quality score
    "subtitles": _OVERLAY,
    "encode-part": Promise(source="part", audio="never", duration=True, picture=True,
                           quality=True),
    "loudnorm": Promise(source="input", duration=True),
    "audio-extract": Promise(),   # trimmed to the video on purpose: concat checks the join
    "concat": Promise(),          # concat checks the join against its parts itself
    "montage": Promise(),
    "preview": Promise(),
    "thumbnail": Promise(),
}
"""Stages whose outputs are checked, and how. Stages not listed (probe, segment, rendition,
package-hls, noop) write no new media or only copies of checked media."""
OUTPUT_PROMISES: dict[tuple[str, str], Promise] = {
    # The part's playable HLS segment: its video is a copy of the checked ``video`` output,
    # its audio the part's own (the part file it is compared with has none): it must hold
    # streams and decode, every frame of it, nothing more to compare.
    ("encode-part", "segment"): Promise(audio="any", whole=True),
}
"""Outputs of a stage that promise something else than the stage's other outputs."""


def _fmt(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "-"


# -- measuring ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Media:
    """The little of ffprobe's view a check needs."""

    path: Path
    video: dict[str, Any] | None
    audio: dict[str, Any] | None
    duration_s: float
    still: bool
    rotation: int = 0
    """Counter-clockwise display rotation a player applies (0, 90, 180, 270)."""

    @property
    def fps(self) -> float:
        for key in ("avg_frame_rate", "r_frame_rate"):
            value = _ratio((self.video or {}).get(key))
            if value and 0 < value < 1000:
                return value
        return 25.0

    @property
    def hdr(self) -> bool:
        return (self.video or {}).get("color_transfer") in HDR_TRANSFERS


def _ratio(text: Any) -> float | None:
    try:
        num, _, den = str(text).partition("/")
        return float(num) / float(den or 1)
    except (ValueError, ZeroDivisionError):
        return None


async def _run(argv: Sequence[str], binaries: Binaries, timeout_s: float) -> tuple[int, str,
                                                                                    str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=child_env(binaries))
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise TransientError(f"output check timed out after {timeout_s:g}s") from None
    except BaseException:  # the step was cancelled: leave no child behind
        if proc.returncode is None:
            proc.kill()
            await asyncio.shield(proc.wait())
        raise
    if proc.returncode is not None and proc.returncode < 0:
        raise TransientError(f"output check: {Path(argv[0]).name} crashed "
                             f"(signal {-proc.returncode})")
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


SPAN_WHOLE_MAX_S = 600.0
"""Files up to this long have every packet listed (demuxing only: cheap); longer ones only
their first and last ``SPAN_TAIL_S``."""
SPAN_TAIL_S = 10.0


@dataclass(frozen=True)
class Span:
    """When a stream's shown frames start and end, and where its keyframes are."""

    first: float
    end: float
    keyframes: tuple[float, ...] = ()
    """Keyframe times from the start of the stream (video, from the packets listed)."""

    @property
    def length(self) -> float:
        return self.end - self.first


async def stream_span(binaries: Binaries, media: Media, kind: str,
                      timeout_s: float = 60.0) -> Span | None:
    """How long the first ``kind`` (``v``/``a``) stream plays, from its first shown frame.

    Video: to the end of its last frame, taken to last as long as the interval before it
    (the duration a muxer writes on a last frame is a guess); from packets, no decoding.
    Audio: to the end of its last decoded frame, so encoder delay and padding the file says
    to skip are skipped (MP3, AAC). Packets an edit list discards (flag ``D``: priming,
    trimmed GOP heads) never count. Container and stream duration fields are not used:
    they count discarded packets, encoder padding or nothing at all (MPEG-TS, WebM).
    """
    entries = ("packet=pts_time,duration_time,flags" if kind == "v"
               else "frame=pts_time,duration_time")
    argv = [binaries.ffprobe, "-v", "error", *_UNTRUSTED, "-select_streams", f"{kind}:0",
            "-show_entries", entries, "-of", "csv=p=0"]
    if media.duration_s > SPAN_WHOLE_MAX_S:
        tail = media.duration_s - SPAN_TAIL_S
        argv += ["-read_intervals", f"%+{SPAN_TAIL_S:g},{tail:.3f}%"]
    code, out, _ = await _run([*argv, str(media.path)], binaries, timeout_s)
    first: float | None = None
    end: float | None = None
    times: list[float] = []
    keys: list[float] = []
    for line in out.splitlines():
        fields = [*line.split(","), "", ""][:3]
        if "D" in fields[2] or fields[0] in ("", "N/A"):
            continue
        pts = float(fields[0])
        length = float(fields[1]) if kind == "a" and fields[1] not in ("", "N/A") else 0.0
        first = pts if first is None else min(first, pts)
        end = pts + length if end is None else max(end, pts + length)
        times.append(pts)
        if "K" in fields[2]:
            keys.append(pts)
    if code != 0 or first is None or end is None:
        return None
    if kind == "v" and len(times) >= 2:
        times.sort()
        end = times[-1] + (times[-1] - times[-2])
    return Span(first, end, tuple(sorted(k - first for k in keys)))


async def probe_media(binaries: Binaries, path: Path, timeout_s: float = 60.0) -> Media:
    code, out, _ = await _run([binaries.ffprobe, "-v", "error", *_UNTRUSTED,
                               "-print_format", "json",
                               "-show_format", "-show_streams", str(path)], binaries, timeout_s)
    info = json.loads(out or "{}") if code == 0 else {}
    streams = info.get("streams", [])
    video = next((s for s in streams if s.get("codec_type") == "video"
                  and not (s.get("disposition") or {}).get("attached_pic")), None)
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)
    duration = _ratio((info.get("format") or {}).get("duration")) or 0.0
    count = (video or {}).get("nb_frames")
    fmt = str((info.get("format") or {}).get("format_name", ""))
    # An image (image2, png_pipe, webp_pipe, ...) or a one-frame video: nothing moves.
    still = video is not None and (str(count) == "1" or fmt == "image2"
                                   or fmt.endswith("_pipe"))
    turns = [int(float(d["rotation"])) for d in (video or {}).get("side_data_list", [])
             if "rotation" in d]
    rotation = round((turns[0] if turns else 0) / 90) * 90 % 360
    return Media(path, video, audio, duration, still, rotation)


def windows(duration_s: float, settings: Settings,
            keyframes: Sequence[float] = ()) -> list[tuple[float, float]]:
    """(start, length) of the stretches that are decoded and compared: the whole file when
    short, otherwise ``output_check_windows`` evenly spread windows, each moved to start on
    a keyframe where one is known nearby (a window that starts mid-GOP makes ffmpeg decode
    from the keyframe before it: up to a whole GOP thrown away per window)."""
    if duration_s <= settings.output_check_whole_max_s:
        return [(0.0, max(duration_s, 0.04) + 1.0)]
    n, length = settings.output_check_windows, settings.output_check_window_s
    spans = []
    for i in range(n):
        start = max((i + 1) * duration_s / (n + 1) - length / 2, 0.0)
        later = [k for k in keyframes if start <= k <= duration_s - length]
        spans.append((round(later[0] if later else start, 3), length))
    return spans


_BLACK = re.compile(r"black_duration:\s*([\d.]+)")
_FREEZE_START = re.compile(r"freeze_start:\s*([\d.]+)")
_FREEZE_DURATION = re.compile(r"freeze_duration:\s*([\d.]+)")
_SSIM = re.compile(r"SSIM .*All:([\d.]+)")
_VMAF = re.compile(r"VMAF score:\s*([\d.]+)")
_ERROR = re.compile(r"^\[[^\]]*\] \[(error|fatal|panic)\]|^\[(error|fatal|panic)\]")


@dataclass
class Picture:
    black_s: float = 0.0
    frozen_s: float = 0.0


def _picture(stderr: str, window_lengths: list[float]) -> Picture:
    pic = Picture(black_s=sum(float(x) for x in _BLACK.findall(stderr)))
    ended = sum(float(x) for x in _FREEZE_DURATION.findall(stderr))
    starts = [float(x) for x in _FREEZE_START.findall(stderr)]
    # A freeze that lasts to the end of a window logs its start only.
    open_freezes = starts[len(_FREEZE_DURATION.findall(stderr)):]
    tail = sum(max(0.0, window_lengths[-1] - s) for s in open_freezes)
    pic.frozen_s = round(ended + tail, 3)
    pic.black_s = round(pic.black_s, 3)
    return pic


def _inputs(path: Path, spans: list[tuple[float, float]], *options: str) -> list[str]:
    argv: list[str] = []
    for start, length in spans:
        argv += [*options, *_UNTRUSTED, "-ss", f"{max(start, 0.0):.3f}",
                 "-t", f"{length:.3f}", "-i", str(path)]
    return argv


_ROTATE = {90: "transpose=cclock,", 180: "hflip,vflip,", 270: "transpose=clock,"}
"""Filters that show a frame as a player would, by counter-clockwise display rotation."""


_DETECT = "blackdetect=d=0.2:pix_th=0.10,freezedetect=n=-50dB:d=1"


async def _decode_output(binaries: Binaries, media: Media, spans: list[tuple[float, float]],
                         timeout_s: float) -> tuple[list[str], Picture]:
    """Decode the output's windows (picture and sound), detecting black and frozen picture."""
    argv = [binaries.ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "level+info",
            *_inputs(media.path, spans)]
    graph, maps = [], []
    for i in range(len(spans)):
        if media.video is not None:
            graph.append(f"[{i}:v:0]{_DETECT}[v{i}]")
            maps += ["-map", f"[v{i}]"]
        if media.audio is not None:
            maps += ["-map", f"{i}:a:0"]
    if graph:
        argv += ["-filter_complex", ";".join(graph)]
    argv += [*maps, "-f", "null", "-"]
    code, _, err = await _run(argv, binaries, timeout_s)
    return _decode_errors(code, err), _picture(err, [s[1] for s in spans])


def _fit(out: Media, src: Media) -> tuple[str, str]:
    """The filters that bring an output window and a source window to the same small
    picture for scoring: at most :data:`COMPARE_WIDTH` wide, square pixels, 8-bit 4:2:0;
    the source turned by its rotation and, when the output is SDR, tone-mapped."""
    width = min(COMPARE_WIDTH, int((out.video or {}).get("width") or COMPARE_WIDTH))
    height = int((out.video or {}).get("height") or 180) * width // max(
        int((out.video or {}).get("width") or width), 1)
    width, height = max(width // 2 * 2, 2), max(height // 2 * 2, 2)
    # Area averaging: the proper filter for a large reduction (no aliasing to score), and
    # a third of bicubic's cost at 720p -> 320 px.
    fit = f"setpts=PTS-STARTPTS,scale={width}:{height}:flags=area,setsar=1,format=yuv420p"
    # The source is turned explicitly (a part may have lost its display matrix; the whole
    # source's rotation is what the output must show).
    src_fit = _ROTATE.get(src.rotation, "") + (
        f"{TONEMAP},{fit}" if src.hdr and not out.hdr else fit)
    return fit, src_fit


def _decode_errors(code: int, stderr: str) -> list[str]:
    """Decoder and demuxer errors only: the null muxer's own timestamp complaints are about
    the check's output, not the file's."""
    errors = [line for line in stderr.splitlines()
              if _ERROR.search(line) and "[null @" not in line]
    if code != 0 and not errors:
        errors = [stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {code}"]
    return errors


@dataclass(frozen=True)
class Measured:
    """What one decode of an output's windows found."""

    errors: list[str]
    picture: Picture
    scores: list[float]


async def _measure(binaries: Binaries, out: Media, src: Media,
                   spans: list[tuple[float, float]], metric: str,
                   timeout_s: float) -> Measured:
    """Every windowed measurement of a video encode in ONE ffmpeg pass: each output window
    is decoded once (picture and sound) and feeds both the black / freeze detection and
    the score against the same source window. Decoding the output twice (once to check
    it, once to score it) was most of what the checks cost.

    Decoder complaints in this pass may come from the source as well as the output (a log
    line does not say which input's decoder wrote it): when there are any, the output is
    decoded again alone (:func:`_decode_output`) and only that counts. A damaged upload
    costs that second pass; a clean one does not.
    """
    fit, src_fit = _fit(out, src)
    n = len(spans)
    argv = [binaries.ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "level+info",
            *_inputs(src.path, spans, "-noautorotate"), *_inputs(out.path, spans)]
    # VMAF on every other frame: half the cost, and a broken encode is broken on both.
    score = "libvmaf=n_threads=2:n_subsample=2" if metric == "vmaf" else "ssim"
    graph, maps = [], []
    for i in range(n):
        graph.append(f"[{i}:v:0]{src_fit}[s{i}]")
        graph.append(f"[{n + i}:v:0]{_DETECT},{fit}[o{i}]")
        graph.append(f"[o{i}][s{i}]{score}[q{i}]")
        maps += ["-map", f"[q{i}]"]
        if out.audio is not None:
            maps += ["-map", f"{n + i}:a:0"]
    argv += ["-filter_complex", ";".join(graph), *maps, "-f", "null", "-"]
    code, _, err = await _run(argv, binaries, timeout_s)
    errors = _decode_errors(code, err)
    picture = _picture(err, [s[1] for s in spans])
    if errors:
        errors, picture = await _decode_output(binaries, out, spans, timeout_s)
        if code != 0 and not errors:
            raise TransientError(f"output check: comparing with the source failed (exit "
                                 f"{code}): " + (err.strip().splitlines() or [""])[-1][:300])
    pattern = _VMAF if metric == "vmaf" else _SSIM
    return Measured(errors, picture, [float(x) for x in pattern.findall(err)])


async def _source_picture(binaries: Binaries, src: Media, spans: list[tuple[float, float]],
                          timeout_s: float) -> Picture:
    """Black and frozen picture in the source's windows: asked only when the output shows
    more than the slack, since only then can the source's own fade or still shot explain
    it."""
    n = len(spans)
    argv = [binaries.ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "info",
            *_inputs(src.path, spans, "-noautorotate")]
    graph = [f"[{i}:v:0]{_DETECT}[p{i}]" for i in range(n)]
    maps = [arg for i in range(n) for arg in ("-map", f"[p{i}]")]
    argv += ["-filter_complex", ";".join(graph), *maps, "-f", "null", "-"]
    code, _, err = await _run(argv, binaries, timeout_s)
    if code != 0:
        raise TransientError(f"output check: measuring the source failed (exit {code}): "
                             + (err.strip().splitlines() or [""])[-1][:300])
    return _picture(err, [s[1] for s in spans])


async def _none() -> None:
    return None


async def _given(value: Span | None) -> Span | None:
    return value


@functools.cache
def has_filter(binaries: Binaries, name: str) -> bool:
    """Whether this ffmpeg build has filter ``name`` (asked once per process and build)."""
    out = subprocess.run([binaries.ffmpeg, "-hide_banner", "-filters"], capture_output=True,
                         timeout=30, env=child_env(binaries), check=False)
    return any(line.split()[1:2] == [name] for line in out.stdout.decode().splitlines())


async def quality_metric(binaries: Binaries, settings: Settings) -> str | None:
    """``vmaf`` or ``ssim`` as configured (``auto``: VMAF where libvmaf is built in)."""
    choice = settings.output_check_metric
    if choice == "off":
        return None
    if choice == "auto":
        found = await asyncio.to_thread(has_filter, binaries, "libvmaf")
        return "vmaf" if found else "ssim"
    return choice


# -- checking -------------------------------------------------------------------------------

def animated_webp_frames(path: Path) -> int | None:
    """Frames of an animated WebP, from its RIFF chunks (None: not one, or malformed).

    ffmpeg has no decoder for animated WebP, so its structure is what can be checked: a RIFF
    container whose size matches the file, an ``ANIM`` chunk and at least one ``ANMF`` frame,
    every chunk inside the file."""
    data = path.read_bytes()
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    if int.from_bytes(data[4:8], "little") + 8 != len(data):
        return None
    at, frames, animated = 12, 0, False
    while at + 8 <= len(data):
        kind, size = data[at:at + 4], int.from_bytes(data[at + 4:at + 8], "little")
        if at + 8 + size > len(data):
            return None
        animated |= kind == b"ANIM"
        frames += kind == b"ANMF"
        at += 8 + size + (size & 1)
    return frames if animated and frames else None


async def verify_output(binaries: Binaries, settings: Settings, stage: str, name: str,
                        path: Path, source: Path | None, *, metric: str | None,
                        rotation: int | None = None) -> list[CheckResult]:
    """Every check of one output of ``stage`` (see the module docstring)."""
    promise = OUTPUT_PROMISES.get((stage, name), PROMISES[stage])
    timeout = settings.output_check_timeout_s
    # Every ffprobe listing the checks need is independent of the others: all at once.
    out, src = await asyncio.gather(
        probe_media(binaries, path),
        probe_media(binaries, source) if source and promise.source else _none())
    results: list[CheckResult] = []

    def add(check: str, passed: bool, measured: dict[str, Any] | None = None,
            expected: dict[str, Any] | None = None, note: str = "") -> None:
        results.append(CheckResult(output=name, check=check, passed=passed,
                                   measured=measured or {}, expected=expected or {}, note=note))

    if out.video is None and out.audio is None and not animated_webp_frames(path):
        add("streams", False, {"video": False, "audio": False}, {"media": True},
            "ffprobe finds no picture or sound")
        return results
    if path.suffix.lower() == ".webp" and (frames := animated_webp_frames(path)):
        add("decode", True, {"frames": frames}, {"frames": ">= 1"},
            "animated WebP: RIFF structure checked (ffmpeg cannot decode it)")
        return results
    out_video = (await stream_span(binaries, out, "v")
                 if out.video is not None and not out.still else None)
    spans = ([(0.0, out.duration_s + 1.0)] if promise.whole else
             windows(out.duration_s, settings, out_video.keyframes if out_video else ()))
    if src is not None and rotation is not None:
        src = dataclasses.replace(src, rotation=rotation)
    real_video = (src is not None and src.video is not None and out.video is not None
                  and not src.still and not out.still)
    metric = metric if promise.quality else None
    slack = max(settings.output_check_picture_slack_s, 0.0)

    async def pictures() -> tuple[Measured, Picture | None]:
        if src is not None and real_video and metric is not None:
            measured = await _measure(binaries, out, src, spans, metric, timeout)
        else:
            errors, picture = await _decode_output(binaries, out, spans, timeout)
            measured = Measured(errors, picture, [])
        seen = measured.picture
        if (src is not None and real_video and promise.picture
                and max(seen.black_s, seen.frozen_s) > slack):
            # Only now does the source's own black or still picture matter.
            return measured, await _source_picture(binaries, src, spans, timeout)
        return measured, None

    timed: list[CheckResult] = []

    def add_timed(check: str, passed: bool, measured: dict[str, Any] | None = None,
                  expected: dict[str, Any] | None = None, note: str = "") -> None:
        timed.append(CheckResult(output=name, check=check, passed=passed,
                                 measured=measured or {}, expected=expected or {}, note=note))

    (measured, src_pic), _ = await asyncio.gather(
        pictures(),
        _durations(binaries, add_timed, out, src, out_video)
        if src is not None and promise.duration else _none())
    errors, picture, scores = measured.errors, measured.picture, measured.scores
    add("decode", not errors, {"errors": len(errors), "windows": len(spans)}, {"errors": 0},
        errors[0][:200] if errors else "")
    if src is not None:
        want_audio = {"source": src.audio is not None, "never": False}.get(promise.audio)
        want_video = src.video is not None and stage not in ("loudnorm",)
        got = {"video": out.video is not None, "audio": out.audio is not None}
        want = {"video": got["video"] if stage == "loudnorm" else want_video}
        if want_audio is not None:
            want["audio"] = want_audio
        add("streams", all(got[k] == v for k, v in want.items()), got, want)
    results += timed
    if not (src is not None and real_video):
        return results
    if promise.picture:
        had = src_pic or Picture()
        for check, got_s, had_s in (("black", picture.black_s, had.black_s),
                                    ("freeze", picture.frozen_s, had.frozen_s)):
            add(check, got_s <= had_s + slack, {"output_s": got_s},
                {"at_most_s": round(had_s + slack, 3)},
                f"the source has {had_s:g}s" if src_pic is not None
                else "within the slack: the source was not measured")
    if metric is not None:
        floor = (settings.output_check_min_vmaf if metric == "vmaf"
                 else settings.output_check_min_ssim)
        if not scores:
            add("quality", False, {"metric": metric}, {"min": floor}, "no score was produced")
        else:
            worst = round(min(scores), 4)
            add("quality", worst >= floor,
                {"metric": metric, "score": round(sum(scores) / len(scores), 4),
                 "worst_window": worst},
                {"min": floor})
    return results


async def _durations(binaries: Binaries, add: Any, out: Media, src: Media,
                     out_video: Span | None) -> None:
    frame = max(1.0 / src.fps, 1.0 / out.fps)  # a rate change moves the last frame by one
    pairs = (("video", "v", out.video, src.video, frame + EPSILON_S),
             ("audio", "a", out.audio, src.audio, AUDIO_TOLERANCE_S + EPSILON_S))
    for kind, letter, o, s, tolerance in pairs:
        if o is None or s is None or (kind == "video" and (src.still or out.still)):
            continue
        got_span, had_span = await asyncio.gather(
            _given(out_video) if kind == "video" else stream_span(binaries, out, letter),
            stream_span(binaries, src, letter))
        got = got_span.length if got_span else None
        had = had_span.length if had_span else None
        if got is None or had is None:
            add("duration", got is not None, {kind + "_s": got}, {kind + "_s": had},
                "no timestamps to measure")
            continue
        add("duration", abs(got - had) <= tolerance, {kind + "_s": round(got, 3)},
            {kind + "_s": round(had, 3), "tolerance_s": round(tolerance, 3)})


def checks_apply(stage: str, settings: Settings) -> bool:
    """Whether ``stage``'s outputs are checked (a stage without media outputs, or checks
    turned off, costs nothing: not even the lease read before them)."""
    return settings.output_checks and stage in PROMISES


async def verify_outputs(binaries: Binaries, settings: Settings, stage: str,
                         files: dict[str, Path], inputs: dict[str, dict[str, Path]],
                         meta: dict[str, dict[str, Any]] | None = None) -> list[CheckResult]:
    """Check every media output of one step; raise :class:`OutputCheckFailed` on a failure.

    Args:
        binaries: the ffmpeg/ffprobe the checks run with.
        settings: ``output_check_*`` settings (floors, windows, metric).
        stage: the stage that wrote ``files`` (see :data:`PROMISES`; others: no checks).
        files: logical output name -> local file.
        inputs: the step's local inputs (ref -> logical name -> file), for the source.
        meta: the used steps' metadata: a part is compared turned by the whole source's
            rotation, from the probe step's.

    Returns:
        Every check's result, all passed.

    Raises:
        OutputCheckFailed: a check failed (permanent: ``output_check_failed``).
        TransientError: a check could not run (crashed, timed out): retried.
    """
    promise = PROMISES.get(stage)
    if promise is None or not checks_apply(stage, settings):
        return []
    source = _source(promise, inputs)
    metric = await quality_metric(binaries, settings) if promise.quality else None
    rotation = _probed_rotation(meta or {}) if promise.source == "part" else None
    results: list[CheckResult] = []
    for name, path in sorted(files.items()):
        if path.suffix.lower() in MEDIA_SUFFIXES:
            results += await verify_output(binaries, settings, stage, name, path, source,
                                           metric=metric, rotation=rotation)
    failed = [r for r in results if not r.passed]
    if failed:
        raise OutputCheckFailed(failed, results)
    return results


def _source(promise: Promise, inputs: dict[str, dict[str, Path]]) -> Path | None:
    if promise.source == "input":
        return inputs.get(":input", {}).get("media")
    if promise.source == "part":
        return next((files["part"] for files in inputs.values() if "part" in files), None)
    return None


def _probed_rotation(meta: dict[str, dict[str, Any]]) -> int:
    """The source's display rotation, from a probe step's media info (0 if none says)."""
    for info in meta.values():
        if isinstance(info, dict) and isinstance(info.get("streams"), list):
            try:
                video = msgspec.convert(info, MediaInfo).video
            except msgspec.ValidationError:
                continue
            return video.rotation % 360 if video is not None else 0
    return 0

