"""thumbnail — a poster frame, evenly spaced frames, or a sprite sheet with a WebVTT index.

Consumes: stages.thumbnail  StageTask (uses: the input file and the probe step)
Does:     by ``mode`` (frames drawn as ``shared.media.picture`` says: upright,
          deinterlaced, HDR tone-mapped; never upscaled; a still picture gives its one
          frame wherever asked):
          ``poster``  one JPEG at ``at_fraction`` of the duration, at most max_width wide;
          ``frames``  ``count`` JPEGs (or one per ``interval_s``), each from the middle of its
                      equal slice of the clip, at most max_width wide;
          ``sprite``  those frames as ``columns`` x rows tiles of ``tile_width`` in one JPEG,
                      and a WebVTT file whose cues cover the whole duration without gaps, each
                      naming its tile as ``sprite.jpg#xywh=x,y,w,h`` (a player's scrub bar).
          A clip of one frame (duration ~0) gives that frame; a seek past the last decodable
          frame falls back to the last frame before it.
Emits:    jobs.stage.complete with outputs
          poster: {poster: .../poster.jpg}, meta {mode, width, height, at_s}
          frames: {frame-0000: .../frame-0000.jpg, ...}, meta {mode, count, width, height,
                  times_s}
          sprite: {sprite.jpg, sprite.vtt} (named as files, so the VTT's relative reference
                  resolves both in the store and at /v1/jobs/<id>/outputs/<step>/sprite.jpg),
                  meta {mode, count, columns, rows, tile_width, tile_height, width, height,
                  times_s, cues}
"""

from __future__ import annotations

import asyncio
import itertools
import math
from pathlib import Path
from typing import Any

import ffmpeg

from shared.errors import ErrorCode, PermanentError
from shared.events import StageTask
from shared.geometry import fit
from shared.media import STRIP_METADATA, MediaInfo, VideoStream, picture
from shared.params.images import MAX_FRAMES, MAX_SPRITE_SIDE, ThumbnailParams
from shared.stage import StageContext, StageResult, stage

DEFAULT_FPS = 25.0
"""Assumed frame rate when the probe reports none (still images, odd containers)."""
FALLBACK_WINDOW_S = 5.0
"""How far back a seek that found no frame looks for the last frame before its time."""


async def handle(task: StageTask, ctx: StageContext[ThumbnailParams]) -> StageResult:
    p = ctx.params
    media = ctx.probe()
    video = media.require_video()
    grabber = _Grabber(task, ctx)
    if p.mode == "poster":
        return await _poster(ctx, media, video, grabber)
    return await _spread(ctx, media, video, grabber)


async def _poster(ctx: StageContext[ThumbnailParams], media: MediaInfo,
                  video: VideoStream, grabber: _Grabber) -> StageResult:
    p = ctx.params
    width, height = fit(*video.display_size, p.max_width, 4320)
    duration = media.duration_s
    # Never seek to the very end: the last frame may not decode; stay a frame away.
    at = max(0.0, min(duration * p.at_fraction, duration - 0.1, last_frame_s(media, video)))
    out_path = ctx.workdir / "poster.jpg"
    await grabber.grab(at, width, height, out_path)
    return StageResult(files={"poster": out_path}, meta={
        "mode": "poster", "width": width, "height": height, "at_s": round(at, 3)})


async def _spread(ctx: StageContext[ThumbnailParams], media: MediaInfo,
                  video: VideoStream, grabber: _Grabber) -> StageResult:
    p = ctx.params
    span = media.duration_s
    fps = _fps(video)
    if span <= 0:
        span = 1.0 / fps  # one still frame: it is shown for one frame's time
    n_wanted = p.count if p.interval_s is None else math.ceil(span / p.interval_s - 1e-9)
    bounds = slice_bounds_ms(span, min(n_wanted, MAX_FRAMES, frame_count(media, video)),
                             None if p.interval_s is None else p.interval_s)
    last = last_frame_s(media, video)
    times = [min((a + b) / 2000.0, last) for a, b in itertools.pairwise(bounds)]
    n = len(times)

    if p.mode == "frames":
        width, height = fit(*video.display_size, p.max_width, 4320)
        files: dict[str, Path] = {}
        for i, at in enumerate(times):
            path = ctx.workdir / f"frame-{i:04d}.jpg"
            await grabber.grab(at, width, height, path)
            files[path.stem] = path
            await ctx.progress((i + 1) / n)
        return StageResult(files=files, meta={
            "mode": "frames", "count": n, "width": width, "height": height,
            "times_s": [round(t, 3) for t in times]})

    tile_w, tile_h = tile_size(video.display_size, p.tile_width)
    columns = min(p.columns, n)
    rows = math.ceil(n / columns)
    if rows * tile_h > MAX_SPRITE_SIDE:
        raise PermanentError(
            ErrorCode.INVALID_RECIPE,
            f"step {ctx.task.step!r}: a sprite of {n} tiles of {tile_w}x{tile_h} in {columns} "
            f"columns would be {rows * tile_h} px tall (max {MAX_SPRITE_SIDE}); use more "
            "columns, fewer frames or a smaller tile_width")
    tiles = ctx.workdir / "tiles"
    tiles.mkdir()
    for i, at in enumerate(times):
        await grabber.grab(at, tile_w, tile_h, tiles / f"t-{i:04d}.bmp", quality=None)
        await ctx.progress((i + 1) / (n + 1))
    sprite = ctx.workdir / "sprite.jpg"
    # Our own numbered tiles (never user input), read as an image sequence.
    sheet = ffmpeg.input(str(tiles / "t-%04d.bmp"), f="image2", framerate=1, start_number=0)
    await grabber.run(sheet.filter("tile", f"{columns}x{rows}").output(
        str(sprite), vframes=1, **{"q:v": 3}, update=1, **STRIP_METADATA).get_args())
    vtt = ctx.workdir / "sprite.vtt"
    vtt.write_text(sprite_vtt(bounds, sprite.name, columns, tile_w, tile_h), encoding="utf-8")
    return StageResult(files={sprite.name: sprite, vtt.name: vtt}, meta={
        "mode": "sprite", "count": n, "columns": columns, "rows": rows, "tile_width": tile_w,
        "tile_height": tile_h, "width": columns * tile_w, "height": rows * tile_h,
        "times_s": [round(t, 3) for t in times], "cues": n})


def tile_size(display: tuple[int, int], tile_width: int) -> tuple[int, int]:
    """A tile keeps the displayed aspect ratio as closely as whole pixels allow (tiles are
    JPEG regions, not video frames: no need for even sizes); never upscaled."""
    width, height = display
    scale = min(1.0, tile_width / width)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _fps(video: VideoStream) -> float:
    fps = video.fps
    return fps if fps is not None and 0 < fps <= 1000 else DEFAULT_FPS


def last_frame_s(media: MediaInfo, video: VideoStream) -> float:
    """Latest time worth seeking to: one frame before the picture ends.

    The video stream's own duration wins over the container's: audio may run on after the
    picture stopped, and a seek there finds no frame at all.
    """
    ends = [d for d in (media.duration_s, video.duration_s) if d is not None and d > 0]
    return max(0.0, min(ends, default=0.0) - 1.0 / _fps(video))


def frame_count(media: MediaInfo, video: VideoStream) -> int:
    """About how many frames the clip has (at least one)."""
    ends = [d for d in (video.duration_s, media.duration_s) if d is not None and d > 0]
    return max(1, round((ends[0] if ends else 0.0) * _fps(video)))


def slice_bounds_ms(span_s: float, n: int, interval_s: float | None) -> list[int]:
    """``n + 1`` strictly increasing boundaries in whole milliseconds, from 0 to the span.

    Equal slices, or ``interval_s`` long ones (the last one shorter) when that gives ``n``
    slices. Integers, so that cue ``i`` ends exactly where cue ``i + 1`` starts.
    """
    total = max(1, round(span_s * 1000))
    n = max(1, min(n, total))
    if interval_s is not None and math.ceil(span_s / interval_s - 1e-9) == n:
        step = round(interval_s * 1000)
        bounds = [min(i * step, total) for i in range(n)] + [total]
        if all(a < b for a, b in itertools.pairwise(bounds)):
            return bounds
    return [round(i * total / n) for i in range(n + 1)]


def vtt_time(ms: int) -> str:
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}.{millis:03d}"


def sprite_vtt(bounds_ms: list[int], image: str, columns: int, tile_w: int, tile_h: int) -> str:
    """WebVTT thumbnails: cue ``i`` spans slice ``i`` and names tile ``i`` of the sheet."""
    lines = ["WEBVTT", ""]
    for i, (start, end) in enumerate(itertools.pairwise(bounds_ms)):
        x, y = (i % columns) * tile_w, (i // columns) * tile_h
        lines += [f"{vtt_time(start)} --> {vtt_time(end)}",
                  f"{image}#xywh={x},{y},{tile_w},{tile_h}", ""]
    return "\n".join(lines)


class _Grabber:
    """Single-frame grabs from the input, all under the step's one deadline."""

    def __init__(self, task: StageTask, ctx: StageContext[ThumbnailParams]) -> None:
        self._task = task
        self._ctx = ctx
        self._source = str(ctx.input_file())
        media = ctx.probe()
        self._video = media.require_video()
        self._pick = f"v:{media.video_ordinal(self._video)}"  # the picture, not cover art
        self._still = media.still
        _, self._runner = ctx.services.media()
        self._deadline = asyncio.get_running_loop().time() + task.timeout_s

    async def run(self, args: list[str]) -> None:
        remaining = max(1.0, self._deadline - asyncio.get_running_loop().time())
        await self._runner.run(args, duration_s=None, timeout_s=remaining,
                               cancel=self._ctx.cancel)

    async def grab(self, at: float, width: int, height: int, out: Path,
                   quality: int | None = 3) -> None:
        """The frame shown at ``at`` seconds, drawn as ``shared.media.picture`` says
        (deinterlaced, HDR tone-mapped) and scaled to ``width`` x ``height``.

        An accurate seek past the last decodable frame makes ffmpeg write nothing and still
        exit 0 (durations lie: audio outlasting the picture, a one-frame clip reported as
        0.04 s); then take the last frame before ``at``, and at worst the first one. A
        still picture, or time 0, is read without a seek: an image demuxer given ``-ss``
        drops its only frame.
        """
        options: dict[str, Any] = {"update": 1, **STRIP_METADATA}
        if quality is not None:
            options["q:v"] = quality

        def frames(**seek: float) -> Any:
            source = ffmpeg.input(self._source, **seek)
            stream = picture.prepare(source[self._pick], self._video)
            # Square pixels: the size was fitted to the displayed shape.
            return stream.filter("scale", width, height).filter("setsar", 1)

        if at <= 0 or self._still:
            attempts = [frames().output(str(out), vframes=1, **options)]
        else:
            lo = max(0.0, at - FALLBACK_WINDOW_S)
            attempts = [
                frames(ss=at).output(str(out), vframes=1, **options),
                # every frame of the window overwrites the file: the last stays
                frames(ss=lo, t=at - lo + 0.001).output(str(out), **options),
                frames().output(str(out), vframes=1, **options),
            ]
        for attempt in attempts:
            await self.run(attempt.get_args())
            if await asyncio.to_thread(_written, out):
                return
        raise PermanentError(ErrorCode.INVALID_INPUT,
                             f"no video frame could be decoded from the input near {at:.3f}s")


def _written(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


function = stage("thumbnail", handle, doc=__doc__ or "")
