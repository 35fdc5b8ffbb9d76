"""preview — a short animated preview: GIF, animated WebP or a silent MP4 snippet.

Consumes: stages.preview  StageTask (uses: the input file and the probe step)
Does:     ``duration_s`` seconds from ``start_s`` (default 10% in; moved earlier when the clip
          is too short, and cut to what the clip has), at ``fps`` frames a second (exactly
          ceil(duration x fps) frames, at least one: a one-frame clip or a still picture
          gives one), ``width``
          wide (never upscaled; even height keeping the displayed aspect ratio), drawn as
          ``shared.media.picture`` says (upright, deinterlaced, HDR tone-mapped, square
          pixels; the MP4 tagged BT.709).
          ``gif``: one pass with palettegen (stats over the changing areas) + paletteuse
          (bayer dither, only changed rectangles redrawn); ``webp``: libwebp animation,
          lossy q70; ``mp4``: H.264 yuv420p, no audio, +faststart. GIF and WebP loop forever
          unless ``loop`` is false.
Emits:    jobs.stage.complete with outputs {preview: jobs/<id>/<step>/preview.<format>},
          meta {format, width, height, fps, start_s, duration_s, frames}
"""

from __future__ import annotations

import math
from typing import Any

import ffmpeg

from shared.events import StageTask
from shared.geometry import fit
from shared.media import STRIP_METADATA, picture
from shared.params.images import PreviewParams
from shared.stage import StageContext, StageResult, stage

DEFAULT_START_FRACTION = 0.1


def window(duration: float, start: float | None, length: float) -> tuple[float, float]:
    """Where the preview starts and how long it is, inside ``[0, duration]``.

    The default start is 10% in, moved earlier so the whole ``length`` fits; an explicit
    start is kept unless it lies past the end (then the clip's last ``length`` seconds).
    Without a known duration the request is taken as it is.
    """
    if duration <= 0:
        return (start or 0.0, length)
    if start is None:
        start = min(duration * DEFAULT_START_FRACTION, max(0.0, duration - length))
    elif start >= duration:
        start = max(0.0, duration - length)
    return start, min(length, duration - start)


async def handle(task: StageTask, ctx: StageContext[PreviewParams]) -> StageResult:
    p = ctx.params
    media = ctx.probe()
    video = media.require_video()
    width, height = fit(*video.display_size, p.width, 4320)
    # A still picture has no timeline: its one frame, read without a seek (an image demuxer
    # given -ss drops it).
    start, length = ((0.0, 0.0) if media.still
                     else window(media.duration_s, p.start_s, p.duration_s))
    out_path = ctx.workdir / f"preview.{p.format}"

    count = max(1, math.ceil(length * p.fps - 1e-6))
    source = (ffmpeg.input(str(ctx.input_file())) if media.still else
              ffmpeg.input(str(ctx.input_file()), ss=round(start, 3), t=round(length, 3)))
    # eof_action=pass: a clip shorter than one output frame (a single frame) still gives one;
    # the frame cap keeps longer clips at exactly duration x fps.
    frames = picture.prepare(source[f"v:{media.video_ordinal(video)}"], video).filter(
        "fps", p.fps, eof_action="pass").filter(
        "scale", width, height, flags="lanczos",
        **(picture.scale_options(video) if p.format == "mp4" else {})).filter("setsar", 1)
    options: dict[str, Any] = {"an": None, **STRIP_METADATA, "vframes": count}
    if p.format == "gif":
        split = frames.filter_multi_output("split")
        palette = split[0].filter("palettegen", stats_mode="diff")
        frames = ffmpeg.filter([split[1], palette], "paletteuse", dither="bayer",
                               bayer_scale=5, diff_mode="rectangle")
        options["loop"] = 0 if p.loop else -1
    elif p.format == "webp":
        options.update(vcodec="libwebp_anim", lossless=0, quality=70,
                       loop=0 if p.loop else 1)
    else:
        frames = frames.filter("format", "yuv420p")
        options.update(vcodec="libx264", preset="veryfast", crf=26, movflags="+faststart",
                       **picture.SDR_TAGS)
    out = frames.output(str(out_path), **options)
    _, runner = ctx.services.media()
    await runner.run(out.get_args(), duration_s=length, timeout_s=task.timeout_s,
                     on_progress=lambda pr: ctx.progress(pr.fraction or 0.0),
                     cancel=ctx.cancel)
    return StageResult(files={"preview": out_path}, meta={
        "format": p.format, "width": width, "height": height, "fps": p.fps,
        "start_s": round(start, 3), "duration_s": round(length, 3),
        "frames": count})


function = stage("preview", handle, doc=__doc__ or "")
