"""concat — join a rendition's encoded parts and the once-encoded audio, by stream copy.

Consumes: stages.concat  StageTask (uses: an ``encode-part`` step, whose joined outputs are
          ``video.0000``, ``video.0001``, ...; optionally an ``audio-extract`` step)
Does:     the concat demuxer over the parts (a list file of plain relative names inside the
          step's private work dir: no ``-safe 0``, only the ``file`` protocol), each part
          placed at its own start on the source's timeline by a ``duration`` directive, so
          a variable-frame-rate source keeps every frame's time; muxes the audio, no
          re-encode; then checks the result with ffprobe: its video has exactly the sum of
          the parts' frames, and shows pictures (first frame to last frame's end, from the
          presentation times) for their summed duration within one frame, or the step fails
          with ``ffmpeg_failed`` (details say which check). Writes an MP4 with
          ``+faststart``; its HLS ``CODECS`` string goes in the meta for packaging.
Emits:    jobs.stage.complete with outputs {video: .../<name>.mp4} and meta {rendition,
          width, height, fps, frames, duration_s, parts, codecs, av_offset_s, bytes}.
"""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import Any

import msgspec

from shared.errors import ErrorCode, FFmpegError, PermanentError
from shared.events import StageTask
from shared.media import STRIP_METADATA_ARGS, Binaries, run_ffprobe
from shared.params.hls import ConcatParams
from shared.stage import StageContext, StageResult, stage

_PART = re.compile(r"^video\.(\d{4,})$")
_AVC_PROFILES = {
    "Constrained Baseline": (0x42, 0xE0), "Baseline": (0x42, 0x00), "Main": (0x4D, 0x40),
    "Extended": (0x58, 0x00), "High": (0x64, 0x00), "High 10": (0x6E, 0x00),
}
"""profile_idc and constraint flags of the ``avc1.PPCCLL`` codec string (RFC 6381)."""


def avc_codec_string(profile: str | None, level: int | None) -> str:
    """``avc1.64001f`` for High@3.1: what an HLS ``CODECS`` attribute names."""
    idc, flags = _AVC_PROFILES.get(profile or "", (0x64, 0x00))
    return f"avc1.{idc:02x}{flags:02x}{int(level or 40):02x}"


async def describe(binaries: Binaries, path: Path, timeout_s: float) -> dict[str, Any]:
    """ffprobe's streams (packets counted, so frames are exact) and format of ``path``."""
    argv = ["-v", "error", "-protocol_whitelist", "file", "-count_packets",
            "-show_entries",
            "stream=index,codec_type,codec_name,profile,level,width,height,avg_frame_rate,"
            "start_time,duration,nb_read_packets:format=duration,bit_rate",
            "-of", "json", "file:" + str(path)]
    out, tail, code = await run_ffprobe(binaries, argv, timeout_s)
    if code != 0:
        raise FFmpegError(ErrorCode.FFMPEG_FAILED, f"ffprobe of the joined file failed: "
                          f"{tail.strip()}", non_retryable=False, returncode=code,
                          stderr_tail=tail)
    info: dict[str, Any] = msgspec.json.decode(out)
    return info


async def picture_length(binaries: Binaries, path: Path, timeout_s: float) -> float:
    """How long the first video stream shows pictures: from its first frame to its last
    frame's end (the last frame lasting the median frame interval).

    Read from the packets' presentation times, not the container's duration field: an MP4
    with B-frames and edit lists derives that from decode times and the muxer's guess at
    the last sample, which on variable-frame-rate video is off by more than a frame.
    """
    argv = ["-v", "error", "-protocol_whitelist", "file", "-select_streams", "v:0",
            "-show_entries", "packet=pts_time", "-of", "csv=p=0", "file:" + str(path)]
    out, tail, code = await run_ffprobe(binaries, argv, timeout_s)
    if code != 0:
        raise FFmpegError(ErrorCode.FFMPEG_FAILED, f"ffprobe of the joined file failed: "
                          f"{tail.strip()}", non_retryable=False, returncode=code,
                          stderr_tail=tail)
    times = sorted(float(t) for line in out.decode().splitlines()
                   if (t := line.strip().strip(",")) and t != "N/A")
    if not times:
        return 0.0
    steps = sorted(b - a for a, b in itertools.pairwise(times))
    frame = steps[len(steps) // 2] if steps else 0.0
    return times[-1] - times[0] + frame


def _parts(ctx: StageContext[ConcatParams]) -> tuple[list[Path], list[dict[str, Any]]]:
    for ref, files in ctx.inputs.items():
        names = sorted((int(m.group(1)), name) for name in files if (m := _PART.match(name)))
        if names:
            metas = ctx.meta.get(ref, {}).get("parts") or [{} for _ in names]
            return [files[name] for _, name in names], list(metas)
    raise PermanentError(ErrorCode.INVALID_RECIPE,
                         f"step {ctx.task.step!r} needs an encode-part step in 'uses'")


def _audio(ctx: StageContext[ConcatParams]) -> Path | None:
    return next((files["audio"] for files in ctx.inputs.values() if "audio" in files), None)


def _mismatch(check: str, message: str, **details: Any) -> PermanentError:
    return PermanentError(ErrorCode.FFMPEG_FAILED, f"joined file failed the {check} check: "
                          f"{message}", details={"check": check, **details})


async def handle(task: StageTask, ctx: StageContext[ConcatParams]) -> StageResult:
    parts, metas = _parts(ctx)
    audio = _audio(ctx)
    join = ctx.workdir / "join"
    join.mkdir()
    lines = ["ffconcat version 1.0"]
    for i, (path, meta) in enumerate(zip(parts, metas, strict=True)):
        # Plain relative names in our own directory: the demuxer's safe mode accepts them,
        # so no -safe 0, and nothing in the list can point anywhere else.
        local = join / f"part_{i:04d}.mp4"
        try:
            os.link(path, local)
        except OSError:  # a filesystem without hard links
            local.symlink_to(path)
        lines.append(f"file {local.name}")
        planned = float(meta.get("duration_s") or 0.0)
        if planned > 0:
            # The part's span on the source's timeline (to the next part's first frame):
            # the next part starts exactly there. Without it the demuxer starts it where
            # this MP4's last frame ends, and an MP4 only guesses that frame's duration —
            # on variable-frame-rate video the guesses add up to a drift of whole frames.
            lines.append(f"duration {planned:.6f}")
    listing = join / "parts.ffconcat"
    listing.write_text("\n".join(lines) + "\n")

    expected_frames = sum(int(m.get("frames", 0)) for m in metas)
    expected_s = sum(float(m.get("duration_s", 0.0)) for m in metas)
    out = ctx.workdir / f"{ctx.params.name}.mp4"
    args = ["-f", "concat", "-i", str(listing)]
    args += ["-i", str(audio)] if audio else []
    args += ["-map", "0:v:0", *(["-map", "1:a:0"] if audio else []), "-c", "copy",
             "-movflags", "+faststart", *STRIP_METADATA_ARGS, str(out)]
    _, runner = ctx.services.media()
    await runner.run(args, duration_s=expected_s or None, timeout_s=task.timeout_s,
                     on_progress=lambda pr: ctx.progress(0.9 * (pr.fraction or 0.0)),
                     cancel=ctx.cancel)

    binaries, _ = ctx.services.media()
    info = await describe(binaries, out, min(task.timeout_s, 120.0))
    streams = {s.get("codec_type"): s for s in reversed(info.get("streams", []))}
    video, sound = streams.get("video"), streams.get("audio")
    if video is None:
        raise _mismatch("video", "no video stream in the output")
    frames = int(video.get("nb_read_packets") or 0)
    num, _, den = str(video.get("avg_frame_rate") or "0/1").partition("/")
    fps = float(num) / float(den) if float(den or 0) else 0.0
    duration = await picture_length(binaries, out, min(task.timeout_s, 120.0))
    if expected_frames and frames != expected_frames:
        raise _mismatch("frame count", f"{frames} frames, the parts have {expected_frames}",
                        frames=frames, expected_frames=expected_frames)
    one_frame = 1.0 / fps if fps else 0.05
    if expected_s and abs(duration - expected_s) > one_frame + 1e-3:
        raise _mismatch("duration", f"{duration:.3f}s, the parts add up to {expected_s:.3f}s",
                        duration_s=duration, expected_s=expected_s)
    codecs = [avc_codec_string(video.get("profile"), video.get("level"))]
    offset = None
    if sound is not None:
        codecs.append("mp4a.40.2" if sound.get("profile") in (None, "LC") else "mp4a.40.5")
        offset = round(float(sound.get("start_time") or 0) - float(video.get("start_time")
                                                                      or 0), 6)
    await ctx.progress(1.0)
    return StageResult(
        files={"video": out},
        meta={"rendition": ctx.params.name, "width": video.get("width"),
              "height": video.get("height"), "fps": round(fps, 6), "frames": frames,
              "duration_s": round(duration, 6), "parts": len(parts),
              "codecs": ",".join(codecs), "av_offset_s": offset,
              "bytes": out.stat().st_size},
    )


function = stage("concat", handle, doc=__doc__ or "")
