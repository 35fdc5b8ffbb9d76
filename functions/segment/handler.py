"""segment — split the video into parts at keyframes, without re-encoding.

Consumes: stages.segment  StageTask (uses: the input file and the probe step)
Does:     lists the video stream's packets (ffprobe, no decoding), picks a cut at the first
          keyframe at or after every multiple of ``part_seconds``, and stream-copies the
          video (only the video: audio is encoded once, elsewhere) into Matroska parts cut
          at exactly those packets. Every frame lands in exactly one part, so a step that
          encodes the parts and joins them keeps the source's frame count.
          A still picture fails with ``not_supported`` (there is nothing to split).
Emits:    jobs.stage.complete with outputs {part.0000: .../part_0000.mkv, part.0001, ...}
          (only parts: an ``each: segment`` step expands to one task per output) and meta
          {count, part_seconds, frames[], starts[], durations[], total_frames, fps}: per part
          its frame count, its start on the video's timeline (the first frame is 0) and its
          length, in seconds.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ErrorCode, FFmpegError, PermanentError
from shared.events import StageTask
from shared.media import STRIP_METADATA_ARGS, Binaries, run_ffprobe
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
    starts: list[float]
    durations: list[float]


def plan_parts(packets: list[Packet], part_seconds: float) -> PartPlan:
    """Where to cut: the first keyframe at or after each multiple of ``part_seconds``.

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
    target = part_seconds
    for index, packet in enumerate(packets):
        at = packet.time - t0
        if index == 0 or not packet.key or at < target - half:
            continue
        cuts.append(index)
        target = (int((at + half) / part_seconds) + 1) * part_seconds
    bounds = [0, *cuts, len(packets)]
    frames, starts, ends = [], [], []
    for lo, hi in itertools.pairwise(bounds):
        chunk = [p for p in packets[lo:hi] if not p.discard] or packets[lo:hi]
        frames.append(sum(1 for p in packets[lo:hi] if not p.discard))
        starts.append(min(p.time for p in chunk) - t0)
        ends.append(max(p.time + (p.duration or frame) for p in chunk) - t0)
    lengths = [b - a for a, b in zip(starts, [*starts[1:], ends[-1]], strict=True)]
    return PartPlan(cuts=cuts, frames=frames, starts=starts, durations=lengths)


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
    packets = []
    for line in out.decode("utf-8", "replace").splitlines():
        fields = dict(item.split("=", 1) for item in line.split("|") if "=" in item)
        time = _seconds(fields.get("pts_time"))
        if time is None:
            time = _seconds(fields.get("dts_time"))
        if time is None:
            raise PermanentError(ErrorCode.INVALID_INPUT,
                                 "the video has packets without timestamps; cannot split it")
        flags = fields.get("flags", "")
        packets.append(Packet(time=time, duration=_seconds(fields.get("duration_time")),
                              key="K" in flags, discard="D" in flags))
    return packets


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "", "N/A") else None
    except ValueError:
        return None


async def handle(task: StageTask, ctx: StageContext[SegmentParams]) -> StageResult:
    media = ctx.probe()
    video = media.require_video()
    if media.still:
        raise PermanentError(ErrorCode.NOT_SUPPORTED,
                             f"the input is a still picture ({media.format_name}): a "
                             "segmented ladder needs a moving video; use recipe 'web' (a "
                             "clip of the picture) or 'thumbnails'")
    source = ctx.input_file()
    binaries, runner = ctx.services.media()
    packets = await list_packets(binaries, source, video.index, task.timeout_s)
    plan = plan_parts(packets, ctx.params.part_seconds)
    await ctx.progress(0.2)

    out_dir = ctx.workdir / "parts"
    out_dir.mkdir()
    args = ["-i", str(source), "-map", f"0:{video.index}", "-c", "copy",
            *STRIP_METADATA_ARGS]
    if plan.cuts:
        args += ["-f", "segment", "-segment_format", "matroska", "-reset_timestamps", "1",
                 "-segment_frames", ",".join(map(str, plan.cuts)),
                 str(out_dir / "part_%04d.mkv")]
    else:
        args += ["-f", "matroska", str(out_dir / "part_0000.mkv")]
    await runner.run(args, duration_s=task.media_duration_s, timeout_s=task.timeout_s,
                     on_progress=lambda pr: ctx.progress(0.2 + 0.8 * (pr.fraction or 0.0)),
                     cancel=ctx.cancel)
    parts = sorted(out_dir.glob("part_*.mkv"))
    if len(parts) != len(plan.frames):
        raise FFmpegError(ErrorCode.FFMPEG_FAILED,
                          f"split made {len(parts)} parts where {len(plan.frames)} were "
                          "planned", non_retryable=True)
    return StageResult(
        files={f"part.{i:04d}": path for i, path in enumerate(parts)},
        meta={
            "count": len(parts), "part_seconds": ctx.params.part_seconds,
            "frames": plan.frames, "total_frames": sum(plan.frames),
            "starts": [round(s, 6) for s in plan.starts],
            "durations": [round(d, 6) for d in plan.durations],
            "fps": video.fps, "stream_index": video.index,
        },
    )


function = stage("segment", handle, doc=__doc__ or "")
