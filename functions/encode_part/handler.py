"""encode-part — encode one part of a split video to one rung of a ladder.

Consumes: stages.encode-part  StageTask, one per part (``each: segment``; uses: the segment
          step, the probe step, and the rung's ``rendition`` step so that a skipped rung
          skips this step too)
Does:     H.264 (libx264, High, 8-bit yuv420p), no audio, at the rung's size (short side
          ``height``, aspect kept, never upscaled), drawn as ``shared.media.picture`` says:
          upright, deinterlaced, HDR tone-mapped, square pixels, tagged BT.709. Every
          source frame is kept at its own time (``-fps_mode passthrough`` in the input's time base,
          timestamps from 0), so variable-frame-rate sources stay exact. GOPs are closed
          and keyframes are IDR frames forced at every multiple of ``keyframe_seconds`` on
          the *whole* video's timeline (scene-cut keyframes off), plus the part's first
          frame, so each rung cuts into identical HLS segments and parts join by stream
          copy. Fails with ``ffmpeg_failed`` when the encode has a different frame count
          from the source part (a frame lost mid-video would put every later frame out of
          sync with audio).
          With ``segment: true`` it also writes the part as a playable MPEG-TS segment
          (``segment_args``): what the gateway's growing playlists list while the job runs.
Emits:    jobs.stage.complete with outputs {video: .../p<NNNN>/video.mp4, and with
          ``segment``: segment: .../p<NNNN>/segment.ts} and meta
          {frames, duration_s} (what ``concat`` checks the join against).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from shared.errors import ErrorCode, PermanentError
from shared.events import StageTask
from shared.media import STRIP_METADATA_ARGS, Progress, VideoStream, picture, step_timeout
from shared.params.hls import STAGES, EncodePartParams, rung_size
from shared.stage import StageContext, StageResult, stage

KEYFRAME_SLACK_S = 0.002
"""Forced keyframe times sit this much early: Matroska parts carry millisecond timestamps,
so the frame on a segment boundary may read up to 0.5 ms early; frames are >= 4 ms apart."""



def keyframe_times(start_s: float, duration_s: float, every_s: float) -> list[float]:
    """Part-relative times of the keyframes: 0, and every multiple of ``every_s`` on the
    whole video's timeline that falls inside the part."""
    times = [0.0]
    k = math.floor(start_s / every_s + 1e-9) + 1
    while (at := k * every_s - start_s) < duration_s:
        if at - KEYFRAME_SLACK_S > 0:
            times.append(round(at - KEYFRAME_SLACK_S, 6))
        k += 1
    return times


def find_part(ctx: StageContext[Any]) -> tuple[Path, dict[str, Any]]:
    """The part this task encodes, and the segment step's meta (with this part's index)."""
    for ref, files in ctx.inputs.items():
        if "part" in files:
            return files["part"], ctx.meta.get(ref, {})
    raise PermanentError(ErrorCode.INVALID_RECIPE,
                         f"step {ctx.task.step!r} must expand over a segment step "
                         "('each': '<segment step>')")


def encode_args(source: Path, out: Path, p: EncodePartParams, video: VideoStream,
                size: tuple[int, int], start_s: float, duration_s: float, *,
                threads: int = 0, skip_frames: int = 0) -> list[str]:
    """The ffmpeg arguments that encode ``source`` (a part starting ``start_s`` into the
    video, or the whole video with 0) to ``out``; ``video`` is the probed source stream.
    ``skip_frames``: the part's first frames (in presentation order) that the source's
    edit list hides, dropped."""
    fps = video.fps or 25.0
    # Upright, progressive, SDR BT.709, square pixels: the picture every stage draws.
    chain = [*([f"trim=start_frame={skip_frames}"] if skip_frames else []),
             "setpts=PTS-STARTPTS", *picture.filter_chain(video, rotate=True),
             picture.scale_filter(size[0], size[1], video), "setsar=1", "format=yuv420p"]
    keys = keyframe_times(start_s, duration_s, p.keyframe_seconds)
    args = ["-noautorotate", "-i", str(source), "-map", "0:v:0", "-vf", ",".join(chain),
            # Every frame at its own source time: no frame dropped or duplicated, and the
            # encoder counts time in the input's time base, not 1/fps (its default, which
            # would round a VFR upload's jittery timestamps onto a 30 fps grid).
            "-fps_mode", "passthrough", "-enc_time_base:v", "-1",
            "-c:v", "libx264", "-preset", p.preset, "-crf", str(p.crf), "-profile:v", "high",
            "-g", str(max(1, round(2 * p.keyframe_seconds * fps))), "-sc_threshold", "0",
            "-flags", "+cgop", "-forced-idr", "1",
            "-force_key_frames", ",".join(f"{t:g}" for t in keys)]
    if p.maxrate_k:
        args += ["-maxrate", f"{p.maxrate_k}k", "-bufsize", f"{p.bufsize_k or 2 * p.maxrate_k}k"]
    if threads:
        args += ["-threads", str(threads)]
    tags = [arg for key, value in picture.SDR_TAGS.items() for arg in (f"-{key}", value)]
    return [*args, *tags, "-an", "-sn", "-dn", *STRIP_METADATA_ARGS, str(out)]


async def handle(task: StageTask, ctx: StageContext[EncodePartParams]) -> StageResult:
    p = ctx.params
    part, segment = find_part(ctx)
    index = int(segment.get("index", task.part or 0))
    try:
        start = float(segment["starts"][index])
        duration = float(segment["durations"][index])
        expected = int(segment["frames"][index])
        skip = int((segment.get("skips") or [0] * (index + 1))[index])
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise PermanentError(ErrorCode.INVALID_RECIPE,
                             f"step {task.step!r}: the segment step's meta lacks part "
                             f"{index}: {exc!r}") from None
    video = ctx.probe().require_video()
    width, height = rung_size(*video.display_size, p.height)

    out = ctx.workdir / "video.mp4"
    args = encode_args(part, out, p, video, (width, height), start, duration,
                       threads=ctx.services.settings.ffmpeg_threads, skip_frames=skip)

    written = 0

    async def on_progress(progress: Progress) -> None:
        nonlocal written
        written = progress.frame if progress.frame is not None else written
        await ctx.progress(progress.fraction or 0.0)

    # The task's deadline is sized for the whole video; a part gets one sized for itself,
    # so a stuck encode is retried after minutes, not hours.
    timeout = min(task.timeout_s, step_timeout(ctx.services.settings, duration,
                                               STAGES["encode-part"].cost))
    _, runner = ctx.services.media()
    await runner.run(args, duration_s=duration, timeout_s=timeout,
                     on_progress=on_progress, cancel=ctx.cancel)
    if written != expected:
        raise PermanentError(
            ErrorCode.FFMPEG_FAILED,
            f"part {index} encoded to {written} frames, but the source part has {expected}: "
            "the source is damaged there (or has open GOPs); joining would drift out of sync",
            details={"part": index, "expected_frames": expected, "frames": written})
    files = {"video": out}
    if p.segment:
        files["segment"] = ctx.workdir / "segment.ts"
        await runner.run(
            segment_args(out, ctx.inputs.get(_segment_ref(ctx), {}).get("audio"),
                         files["segment"], p, segment, start, duration),
            duration_s=duration, timeout_s=timeout, cancel=ctx.cancel)
    # Small on purpose: the job record keeps every part's meta (twice), and a long video at
    # four renditions has thousands of parts.
    return StageResult(files=files, meta={"frames": written, "duration_s": duration})


def _segment_ref(ctx: StageContext[Any]) -> str:
    return next(ref for ref, files in ctx.inputs.items() if "part" in files)


def segment_args(video: Path, audio: Path | None, out: Path, p: EncodePartParams,
                 segment: dict[str, Any], start_s: float, duration_s: float) -> list[str]:
    """The ffmpeg arguments that make ``out``, the part as an MPEG-TS HLS segment.

    The encoded video (timestamps from 0) is copied and the part's audio (source
    timestamps, cut at or after the part's start) is shifted to the part's start, its
    head padded with silence and its tail trimmed to the part's length; then
    ``-output_ts_offset`` puts both at the part's start on the whole video's timeline,
    so consecutive segments continue each other and audio stays in step with video.
    A source with audio but none left for this part gets silence, so every segment of
    a rung has the same streams.
    """
    args = ["-copyts", "-i", str(video)]
    chain = [f"atrim=end={duration_s:.6f}"]
    if audio is not None:
        origin = float(segment.get("origin") or 0.0)
        args += ["-i", str(audio)]
        chain = [f"asetpts=PTS-{origin + start_s:.6f}/TB", "aresample=async=1:first_pts=0",
                 *chain]
    elif segment.get("audio"):
        args += ["-f", "lavfi", "-i", "anullsrc=r=48000:cl=stereo"]
    else:
        chain = []
    args += ["-map", "0:v:0", "-c:v", "copy"]
    if chain:
        args += ["-map", "1:a:0", "-af", ",".join(chain), "-c:a", "aac",
                 "-b:a", f"{p.audio_bitrate_k}k", "-ac", "2", "-ar", "48000"]
    # No shifting of negative timestamps (a B-frame delay, the AAC priming): a shift only
    # where they are negative, the first part, would put it out of step with the others.
    return [*args, "-output_ts_offset", f"{start_s:.6f}", "-avoid_negative_ts", "disabled",
            *STRIP_METADATA_ARGS, "-f", "mpegts", str(out)]


function = stage("encode-part", handle, doc=__doc__ or "")
