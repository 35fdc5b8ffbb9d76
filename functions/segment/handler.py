"""segment — split the video into parts at keyframes, without re-encoding.

Consumes: stages.segment  StageTask (uses: the input file and the probe step)
Does:     lists the video stream's packets (ffprobe, no decoding), picks a cut at the first
          keyframe at or after every multiple of ``part_seconds``, and stream-copies the
          video (only the video: audio is encoded once, elsewhere) into Matroska parts cut
          at exactly those packets. Every frame lands in exactly one part, so a step that
          encodes the parts and joins them keeps the source's frame count.
          A still picture fails with ``not_supported`` (there is nothing to split), or
          ``invalid_input`` when not even one frame of it decodes.
Emits:    jobs.stage.complete with outputs {part.0000: .../part_0000.mkv, part.0001, ...}
          (an ``each: segment`` step expands to one task per part), with ``audio: true``
          also {audio.0000: .../audio_0000.mka, ...} (the source's audio, stream-copied,
          cut at each part's start, on the source's timestamps; each task gets its part's)
          and meta {count, part_seconds, frames[], starts[], durations[], total_frames,
          fps, origin, audio, skips?}: per part its frame count, its start on the video's
          timeline (the first frame is 0, at ``origin`` in the source) and its length, in
          seconds; ``skips`` (only when an edit list hides frames): per part the frames the
          copy keeps but the source hides, which the encoder drops first.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ErrorCode, FFmpegError, PermanentError
from shared.events import StageTask
from shared.media import STRIP_METADATA_ARGS, Binaries, Progress, run_ffprobe
from shared.params.hls import SegmentParams
from shared.stage import StageContext, StageResult, stage


@dataclass(frozen=True)
class Packet:
    time: float
    """Presentation time (decode time when the container has none), in seconds."""
    duration: float | None
    key: bool
    discard: bool


@dataclass(frozen=True)
class PartPlan:
    cuts: list[int]
    """Packet indices (decode order) where a new part starts; never 0."""
    frames: list[int]
    skips: list[int]
    """Per part, its packets the source marks discarded (an edit list's head): a stream
    copy keeps them, so whoever decodes the part drops that many first frames."""
    starts: list[float]
    durations: list[float]
    origin: float = 0.0
    """The earliest frame's time in the source (what ``starts`` count from)."""


def plan_parts(packets: list[Packet], part_seconds: float,
               first_part_seconds: float | None = None) -> PartPlan:
    """Where to cut: the first keyframe at or after ``first_part_seconds`` (default
    ``part_seconds``), then at or after each later multiple of ``part_seconds``.

    Times are measured from the earliest frame. A keyframe within half a frame of a
    multiple counts as on it, so float noise never pushes a cut one GOP later.
    """
    if not packets:
        raise PermanentError(ErrorCode.INVALID_INPUT, "the video stream has no packets")
    shown = [p for p in packets if not p.discard] or packets
    t0 = min(p.time for p in shown)
    durations = sorted(p.duration for p in packets if p.duration)
    frame = durations[len(durations) // 2] if durations else 0.04
    half = frame / 2
    cuts: list[int] = []
    target = first_part_seconds or part_seconds
    for index, packet in enumerate(packets):
        at = packet.time - t0
        if index == 0 or not packet.key or at < target - half:
            continue
        cuts.append(index)
        target = (int((at + half) / part_seconds) + 1) * part_seconds
    bounds = [0, *cuts, len(packets)]
    frames, skips, starts, ends = [], [], [], []
    for lo, hi in itertools.pairwise(bounds):
        chunk = [p for p in packets[lo:hi] if not p.discard] or packets[lo:hi]
        frames.append(sum(1 for p in packets[lo:hi] if not p.discard))
        skips.append(hi - lo - frames[-1])
        starts.append(min(p.time for p in chunk) - t0)
        ends.append(max(p.time + (p.duration or frame) for p in chunk) - t0)
    lengths = [b - a for a, b in zip(starts, [*starts[1:], ends[-1]], strict=True)]
    return PartPlan(cuts=cuts, frames=frames, skips=skips, starts=starts, durations=lengths,
                    origin=t0)


async def list_packets(binaries: Binaries, path: Path, stream_index: int,
                       timeout_s: float) -> list[Packet]:
    """The stream's packets in decode order: time, duration, key and discard flags."""
    argv = ["-v", "error", "-protocol_whitelist", "file",
            "-select_streams", str(stream_index),
            "-show_entries", "packet=pts_time,dts_time,duration_time,flags",
            "-of", "compact=p=0:nk=0", "file:" + str(path)]
    out, tail, code = await run_ffprobe(binaries, argv, timeout_s)
    if code != 0:
        raise FFmpegError(ErrorCode.INVALID_INPUT if code > 0 else
                          ErrorCode.FFMPEG_FAILED, f"could not list packets: {tail.strip()}",
                          non_retryable=code > 0, returncode=code,
                          stderr_tail=tail)
    packets: list[Packet] = []
    for line in out.decode("utf-8", "replace").splitlines():
        fields = dict(item.split("=", 1) for item in line.split("|") if "=" in item)
        if not fields:
            continue  # ffprobe separates some packets (MPEG-TS side data) by empty lines
        time = _seconds(fields.get("pts_time"))
        if time is None:
            time = _seconds(fields.get("dts_time"))
        duration = _seconds(fields.get("duration_time"))
        if time is None and packets:
            # A packet without timestamps (MPEG-TS need not stamp every one): the frame
            # after the one before, in decode order.
            last = packets[-1]
            time = last.time + (last.duration or duration or 0.0)
        if time is None:
            raise PermanentError(ErrorCode.INVALID_INPUT,
                                 "the video's first packet has no timestamp; cannot split it")
        flags = fields.get("flags", "")
        packets.append(Packet(time=time, duration=duration, key="K" in flags,
                              discard="D" in flags))
    return packets


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "", "N/A") else None
    except ValueError:
        return None


async def _decodes(ctx: StageContext[SegmentParams], task: StageTask) -> bool:
    """Whether a frame of the input's picture decodes (a picture refused as unfit for a
    ladder must first be a picture at all: one that does not decode is bad input)."""
    _, runner = ctx.services.media()
    frames = 0

    async def on_progress(progress: Progress) -> None:
        nonlocal frames
        frames = max(frames, progress.frame or 0)

    try:
        await runner.run(["-i", str(ctx.input_file()), "-map", "0:v:0", "-frames:v", "1",
                          "-f", "null", "-"], duration_s=None,
                         timeout_s=min(task.timeout_s, 60.0), on_progress=on_progress,
                         cancel=ctx.cancel)
    except FFmpegError as exc:
        if exc.non_retryable:
            return False
        raise
    return frames > 0


async def handle(task: StageTask, ctx: StageContext[SegmentParams]) -> StageResult:
    media = ctx.probe()
    video = media.require_video()
    if media.still:
        if not await _decodes(ctx, task):
            raise PermanentError(ErrorCode.INVALID_INPUT,
                                 f"the input is probed as a picture ({media.format_name}), "
                                 "but no frame of it decodes")
        raise PermanentError(ErrorCode.NOT_SUPPORTED,
                             f"the input is a still picture ({media.format_name}): a "
                             "segmented ladder needs a moving video; use recipe 'web' (a "
                             "clip of the picture) or 'thumbnails'")
    source = ctx.input_file()
    binaries, runner = ctx.services.media()
    packets = await list_packets(binaries, source, video.index, task.timeout_s)
    plan = plan_parts(packets, ctx.params.part_seconds, ctx.params.first_part_seconds)
    await ctx.progress(0.2)

    out_dir = ctx.workdir / "parts"
    out_dir.mkdir()
    audio = media.audio if ctx.params.audio else None
    # -copyts: the audio keeps the source's timestamps, which is what the cut times (and
    # the meta's ``origin``) are on; the video parts reset theirs anyway.
    args = [*(["-copyts"] if audio else []), "-i", str(source), "-map", f"0:{video.index}",
            "-c", "copy", *STRIP_METADATA_ARGS]
    # Matroska holds every codec but GIF, whose frames it cannot hand back (a GIF's
    # packets after the first lack the header): a GIF's part is a GIF. A video in one part
    # whose edit list hides frames goes into MP4, which keeps the edit list (Matroska
    # would show the hidden frames; parts cut from such a video drop them instead, by
    # ``skips``).
    hides = any(plan.skips)
    fmt, ext = (("gif", "gif") if video.codec_name == "gif" else
                ("mp4", "mp4") if hides and not plan.cuts else ("matroska", "mkv"))
    if fmt == "mp4":
        plan = dataclasses.replace(plan, skips=[0])
    if plan.cuts:
        args += ["-f", "segment", "-segment_format", fmt, "-reset_timestamps", "1",
                 "-segment_frames", ",".join(map(str, plan.cuts)),
                 str(out_dir / f"part_%04d.{ext}")]
    else:
        args += ["-f", fmt, str(out_dir / f"part_0000.{ext}")]
    if audio is not None:
        # The audio of each part, cut at the first packet at or after the part's start (a
        # part's head may lack up to one packet, ~20 ms, which encode-part pads).
        args += ["-map", f"0:{audio.index}", "-c", "copy", *STRIP_METADATA_ARGS,
                 "-f", "segment", "-segment_format", "matroska", "-reset_timestamps", "0"]
        if plan.cuts:
            args += ["-segment_times",
                     ",".join(f"{plan.origin + s:.6f}" for s in plan.starts[1:])]
        else:
            args += ["-segment_time", "1000000"]
        args.append(str(out_dir / "audio_%04d.mka"))
    await runner.run(args, duration_s=task.media_duration_s, timeout_s=task.timeout_s,
                     on_progress=lambda pr: ctx.progress(0.2 + 0.8 * (pr.fraction or 0.0)),
                     cancel=ctx.cancel)
    parts = sorted(out_dir.glob(f"part_*.{ext}"))
    if len(parts) != len(plan.frames):
        raise FFmpegError(ErrorCode.FFMPEG_FAILED,
                          f"split made {len(parts)} parts where {len(plan.frames)} were "
                          "planned", non_retryable=True)
    files = {f"part.{i:04d}": path for i, path in enumerate(parts)}
    # Audio that ends before the video leaves the last parts without a file (silent).
    files.update({f"audio.{i:04d}": path for i, path in
                  enumerate(sorted(out_dir.glob("audio_*.mka"))) if i < len(parts)})
    return StageResult(
        files=files,
        meta={
            "count": len(parts), "part_seconds": ctx.params.part_seconds,
            "frames": plan.frames, "total_frames": sum(plan.frames),
            "starts": [round(s, 6) for s in plan.starts],
            "durations": [round(d, 6) for d in plan.durations],
            "fps": video.fps, "stream_index": video.index,
            "origin": round(plan.origin, 6), "audio": audio is not None,
            **({"skips": plan.skips} if any(plan.skips) else {}),
        },
    )


function = stage("segment", handle, doc=__doc__ or "")
