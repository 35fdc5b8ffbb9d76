"""montage — several clips into one video.

Consumes: stages.montage  StageTask (uses: the clips, in order — job inputs or steps with
          one media output each; with ``music`` the last of them is the music bed; steps
          without files, such as probe, are ignored)
Does:     probes every clip; draws each as ``shared.media.picture`` says (upright,
          deinterlaced, HDR tone-mapped, BT.709); fits it into width x height keeping its
          displayed aspect ratio, pads with the background colour, square pixels,
          constant fps, yuv420p;
          joins them with ``xfade`` + ``acrossfade`` (clips without audio get silence, so
          every transition has two sides) or cuts when crossfade_s is 0; optionally opens
          with a title card (literal text on a colour, crossfading into the first clip) and
          mixes a looped, faded music bed under the clips' audio; H.264 + AAC MP4.
Emits:    jobs.stage.complete with outputs {video: jobs/<id>/<step>/video.mp4} and meta
          {width, height, fps, duration_s, clips, crossfade_s, title, music, ...}.
          A clip without video fails with ``no_video_stream``, a clip whose picture never
          decodes with ``invalid_input`` (naming the clip), a music bed without audio
          with ``no_audio_stream``; no clip at all is ``invalid_recipe``.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import ffmpeg

from functions.montage import title as titles
from shared.errors import ErrorCode, PermanentError
from shared.events import StageTask
from shared.media import STRIP_METADATA, MediaInfo, ProbeLimits, picture, probe, step_timeout
from shared.params.montage import MAX_CLIPS, STAGES, MontageParams
from shared.stage import StageContext, StageResult, stage

SAMPLE_RATE = 48000
MAX_MUSIC_REPEATS = 50
PROBES_AT_ONCE = 4


@dataclass(frozen=True)
class Segment:
    """One piece of the montage, already normalised: ``frames`` frames of video and the
    same length of stereo 48 kHz audio."""

    video: Any
    audio: Any
    frames: int


async def handle(task: StageTask, ctx: StageContext[MontageParams]) -> StageResult:
    p = ctx.params
    fps = frame_rate(p.fps)
    paths = _media_inputs(ctx)
    music_path = paths.pop() if p.music and paths else None
    if not paths:
        raise PermanentError(ErrorCode.INVALID_RECIPE,
                             f"step {task.step!r}: a montage needs at least one clip")
    if len(paths) > MAX_CLIPS:
        raise PermanentError(ErrorCode.INVALID_RECIPE,
                             f"step {task.step!r}: at most {MAX_CLIPS} clips, got {len(paths)}")
    binaries, runner = ctx.services.media()
    slots = asyncio.Semaphore(PROBES_AT_ONCE)
    limits = ProbeLimits.from_settings(ctx.services.settings)

    async def probe_one(path: Path) -> MediaInfo:
        async with slots:
            return await probe(binaries, str(path), limits=limits)

    infos = await asyncio.gather(*(probe_one(path) for path in paths))
    music_info = await probe_one(music_path) if music_path else None
    for i, info in enumerate(infos):
        if info.video is None:
            raise PermanentError(ErrorCode.NO_VIDEO_STREAM, f"clip {i + 1} has no video stream")
    if music_info is not None and music_info.audio is None:
        raise PermanentError(ErrorCode.NO_AUDIO_STREAM, "the music bed has no audio stream")

    frames = [max(1, _frames(_clip_duration(info), fps)) for info in infos]
    # Each clip is faded into at its start and out of at its end, so no fade may be
    # longer than half the shortest clip.
    fade = _frames(p.crossfade_s, fps) if len(frames) > 1 or p.title else 0
    fade = min(fade, min(frames) // 2)

    segments: list[Segment] = []
    if p.title is not None:
        card_frames = _frames(p.title_s, fps) + fade
        segments.append(_title_card(p, ctx.workdir, fps, card_frames))
    segments += [_clip(p, path, info, fps, n, key=len(segments) + i)
                 for i, (path, info, n) in enumerate(zip(paths, infos, frames, strict=True))]
    video, audio, total = _join(segments, fade, fps, p.transition)
    duration = float(total / fps)
    if music_path is not None and music_info is not None:
        audio = _mix_music(p, audio, music_path, music_info, duration, ctx.workdir)

    out_path = ctx.workdir / "video.mp4"
    threads = ctx.services.settings.ffmpeg_threads
    # -threads as an output option: after the last output it would be a trailing option,
    # which ffmpeg 6 ignores.
    out = ffmpeg.output(
        video, audio, str(out_path), vcodec="libx264", preset=p.preset, crf=p.crf,
        profile="high", pix_fmt="yuv420p", acodec="aac", audio_bitrate=f"{p.audio_bitrate_k}k",
        ar=SAMPLE_RATE, ac=2, movflags="+faststart", **STRIP_METADATA, **picture.SDR_TAGS,
        **({"threads": threads} if threads else {}),
    )
    # verbose: ffmpeg's closing per-input statistics say which clip gave no frame.
    args = ["-loglevel", "verbose", *out.get_args()]
    # The conductor knows no duration for a montage (no probe step precedes it), so the
    # deadline is taken from what the clips add up to, never below what the task allows.
    source_s = sum(info.duration_s for info in infos)
    timeout = max(task.timeout_s,
                  step_timeout(ctx.services.settings, source_s, STAGES["montage"].cost))
    result = await runner.run(args, duration_s=duration, timeout_s=timeout,
                              on_progress=lambda pr: ctx.progress(pr.fraction or 0.0),
                              cancel=ctx.cancel)
    result.require_frames("the clips")
    # ffmpeg exits 0 when one clip's picture never decodes and pads its place in the
    # timeline; its closing statistics (verbose) name the input.
    clip_of = {_input_index(args, path): i for i, path in enumerate(paths)}
    broken = [clip_of[k] + 1 for k in result.undecoded_video_inputs() if k in clip_of]
    if broken:
        raise PermanentError(ErrorCode.INVALID_INPUT,
                             f"no video frame could be decoded from clip {broken[0]}")
    return StageResult(files={"video": out_path}, meta={
        "width": p.width, "height": p.height, "fps": float(fps), "frames": total,
        "duration_s": round(duration, 3), "clips": len(paths),
        "crossfade_s": round(float(fade / fps), 3), "transition": p.transition,
        "title": p.title is not None, "title_s": p.title_s if p.title is not None else 0.0,
        "music": music_path is not None,
    })


def _input_index(args: list[str], path: Path) -> int:
    """Which ``-i`` of ``args`` reads ``path`` (-1: none)."""
    inputs = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "-i"]
    return inputs.index(str(path)) if str(path) in inputs else -1


def frame_rate(fps: float) -> Fraction:
    """``fps`` as an exact rate; 23.976, 29.97, 59.94 (...) mean the NTSC rates (N*1000/1001),
    which is what every camera that shows those numbers records."""
    for base in (24, 30, 48, 60, 120):
        ntsc = Fraction(base * 1000, 1001)
        if abs(fps - float(ntsc)) < 0.01:
            return ntsc
    return Fraction(fps).limit_denominator(1000)


def _media_inputs(ctx: StageContext[MontageParams]) -> list[Path]:
    """The media files among the inputs, in ``uses`` order."""
    paths = []
    for item in ctx.task.inputs:
        files = ctx.inputs.get(item.ref, {})
        if not files:
            continue  # a step with only metadata (probe)
        for name in ("media", "video"):
            if name in files:
                paths.append(files[name])
                break
        else:
            if len(files) != 1:
                raise PermanentError(
                    ErrorCode.INVALID_RECIPE,
                    f"step {ctx.task.step!r}: input {item.ref!r} has several outputs "
                    f"({', '.join(sorted(files))}); a montage clip needs one")
            paths.append(next(iter(files.values())))
    return paths


def _frames(seconds: float, fps: Fraction) -> int:
    """Whole frames in ``seconds``, half up (``round`` would make 0.5 s at 25 fps 12)."""
    return math.floor(Fraction(seconds) * fps + Fraction(1, 2))


def _clip_duration(info: MediaInfo) -> float:
    video = info.video
    if video is not None and video.duration_s:
        return video.duration_s
    return info.duration_s


def _fixed_length(video: Any, frames: int, fps: Fraction) -> Any:
    """Exactly ``frames`` frames: a short stream is padded with its last frame."""
    return (video.filter("tpad", stop_mode="clone", stop_duration=float(frames / fps))
            .filter("trim", end_frame=frames).filter("setpts", "PTS-STARTPTS"))


def _audio_format(audio: Any) -> Any:
    return audio.filter("aresample", SAMPLE_RATE).filter(
        "aformat", sample_fmts="fltp", sample_rates=SAMPLE_RATE, channel_layouts="stereo")


def _silence(seconds: float, key: int) -> Any:
    """``seconds`` of stereo silence, from its own source.

    ffmpeg-python merges inputs with identical arguments into one node, and one node's
    output can feed only one filter; ``key`` (the segment's position, used as the frame
    size in samples) keeps two equally long silences apart.
    """
    source = f"anullsrc=r={SAMPLE_RATE}:cl=stereo:n={1024 + key}"
    return _audio_format(ffmpeg.input(source, f="lavfi", t=f"{seconds:.6f}").audio)


def _clip(p: MontageParams, path: Path, info: MediaInfo, fps: Fraction, frames: int,
          key: int) -> Segment:
    seconds = float(frames / fps)
    source = ffmpeg.input(str(path))
    assert info.video is not None
    video = (
        picture.prepare(source[str(info.video.index)], info.video)
        .filter("setpts", "PTS-STARTPTS")
        # Square pixels first (a no-op for most clips), so fitting sees the displayed
        # aspect ratio; ffmpeg has already turned rotated clips upright.
        .filter("scale", "iw*sar", "ih").filter("setsar", 1)
        .filter("scale", p.width, p.height, force_original_aspect_ratio="decrease",
                force_divisible_by=2, **picture.scale_options(info.video))
        .filter("pad", p.width, p.height, "(ow-iw)/2", "(oh-ih)/2", color=p.background)
        .filter("setsar", 1)
        .filter("fps", str(fps))
        .filter("format", "yuv420p")
    )
    if info.audio is not None:
        audio = (_audio_format(source[str(info.audio.index)].filter("asetpts", "PTS-STARTPTS"))
                 .filter("apad", whole_dur=f"{seconds:.6f}"))
    else:
        audio = _silence(seconds, key)
    audio = audio.filter("atrim", end=f"{seconds:.6f}").filter("asetpts", "PTS-STARTPTS")
    return Segment(video=_fixed_length(video, frames, fps), audio=audio, frames=frames)


def _title_card(p: MontageParams, workdir: Path, fps: Fraction, frames: int) -> Segment:
    assert p.title is not None
    seconds = float(frames / fps)
    font = titles.stage_font(titles.find_font(), workdir)
    lay = titles.layout(p.title, p.width, p.height, p.title_size)
    video = ffmpeg.input(f"color=c={p.background}:s={p.width}x{p.height}:r={fps}",
                         f="lavfi", t=f"{seconds:.6f}").video.filter("format", "yuv420p")
    for line, textfile, baseline in zip(lay.lines, titles.write_lines(lay.lines, workdir),
                                        lay.baselines, strict=True):
        if not line:
            continue  # a blank line only spaces the others
        video = video.filter(
            "drawtext", fontfile=str(font), textfile=str(textfile), expansion="none",
            fontsize=lay.font_size, fontcolor=p.title_color,
            x="(w-text_w)/2", y=f"{baseline}-ascent",
        )
    video = video.filter("setsar", 1)
    return Segment(video=_fixed_length(video, frames, fps), audio=_silence(seconds, key=0),
                   frames=frames)


def _join(segments: list[Segment], fade: int, fps: Fraction,
          transition: str) -> tuple[Any, Any, int]:
    """Crossfade (or cut) the segments in order; returns video, audio and frame count."""
    if len(segments) == 1:
        return segments[0].video, segments[0].audio, segments[0].frames
    if fade == 0:
        joined = ffmpeg.concat(*[s for seg in segments for s in (seg.video, seg.audio)],
                               v=1, a=1).node
        return joined[0], joined[1], sum(seg.frames for seg in segments)
    seconds = float(fade / fps)
    video, audio, length = segments[0].video, segments[0].audio, segments[0].frames
    for seg in segments[1:]:
        offset = length - fade
        video = ffmpeg.filter([video, seg.video], "xfade", transition=transition,
                              duration=f"{seconds:.6f}", offset=f"{float(offset / fps):.6f}")
        audio = ffmpeg.filter([audio, seg.audio], "acrossfade", d=f"{seconds:.6f}",
                              c1="tri", c2="tri")
        length = offset + seg.frames
    return video, audio, length


def _mix_music(p: MontageParams, audio: Any, path: Path, info: MediaInfo,
               duration: float, workdir: Path) -> Any:
    """The bed repeated to the montage's length, faded, lowered and mixed under ``audio``."""
    fade = min(p.music_fade_s, duration / 2)
    # Repeated as separate inputs, not with -stream_loop: ffmpeg 6.0's threaded demuxer
    # can deadlock when a looping input rewinds while others have ended (seen here).
    length = (info.audio.duration_s if info.audio else None) or info.duration_s
    if length <= 0:
        raise PermanentError(ErrorCode.INVALID_INPUT, "the music bed's duration is unknown")
    repeats = math.ceil(duration / length)
    if repeats > MAX_MUSIC_REPEATS:
        raise PermanentError(
            ErrorCode.INVALID_INPUT,
            f"the music bed ({length:.2f} s) would have to repeat {repeats} times to cover "
            f"the montage; at most {MAX_MUSIC_REPEATS} repeats")
    parts = [_audio_format(ffmpeg.input(str(_alias(path, workdir, i)))["a:0"])
             for i in range(repeats)]
    bed = parts[0] if repeats == 1 else ffmpeg.concat(*parts, v=0, a=1)
    bed = bed.filter("atrim", end=f"{duration:.6f}").filter("asetpts", "PTS-STARTPTS")
    bed = bed.filter("volume", f"{p.music_volume_db}dB")
    if fade > 0:
        bed = bed.filter("afade", t="in", d=f"{fade:.6f}").filter(
            "afade", t="out", st=f"{duration - fade:.6f}", d=f"{fade:.6f}")
    # normalize=0: amix would otherwise halve both inputs, making the clips quieter
    # than they were; the bed is already lowered by music_volume_db.
    return ffmpeg.filter([audio, bed], "amix", inputs=2, duration="first", normalize=0,
                         dropout_transition=0)


def _alias(path: Path, workdir: Path, i: int) -> Path:
    """A distinct name for the i-th repeat of one file (ffmpeg-python merges inputs with
    identical arguments, and each repeat must be an input of its own)."""
    if i == 0:
        return path
    alias = workdir / f"music-{i}{path.suffix}"
    if not alias.exists():
        alias.symlink_to(path)
    return alias


function = stage("montage", handle, doc=__doc__ or "")
