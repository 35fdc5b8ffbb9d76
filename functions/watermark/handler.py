"""watermark — an image (a logo) over a video, in a corner.

Consumes: stages.watermark  StageTask (uses: the video ``:input``, the image ``:input/1`` (or
          another ``:input/<n>``) and the probe step of the video)
Does:     checks that the image is a PNG or JPEG (magic bytes, then ffprobe must pick the
          png_pipe/jpeg_pipe demuxer and find one picture: a text file named ``logo.png`` is
          refused); scales it to ``scale`` x the video width (default: its own size, shrunk
          to fit inside the margins), applies ``opacity``, and overlays it ``margin`` pixels
          from the chosen corner of the upright video for the whole duration. Video: H.264
          (yuv420p) at the source's displayed size, evened, drawn as ``shared.media.picture``
          says (deinterlaced, HDR tone-mapped, square pixels, tagged BT.709); audio: AAC
          copied untouched, anything else encoded to AAC; +faststart, metadata stripped.
          Every frame keeps its source time (variable frame rate kept). A video whose
          picture never decodes is ``invalid_input`` (``shared.media.web_mp4_args``).
Emits:    jobs.stage.complete with outputs {video: jobs/<id>/<step>/watermarked.mp4},
          meta {width, height, overlay: {x, y, width, height}, audio: copy|aac|null}
"""

from __future__ import annotations

import asyncio
from typing import Any

import ffmpeg

from shared.errors import ErrorCode, FFmpegError, PermanentError
from shared.events import StageTask
from shared.geometry import fit
from shared.media import ProbeLimits, picture, probe
from shared.params.images import WatermarkParams
from shared.stage import StageContext, StageResult, stage

_MAGIC = {b"\x89PNG\r\n\x1a\n": ("png_pipe", "png"), b"\xff\xd8\xff": ("jpeg_pipe", "mjpeg")}


async def check_image(ctx: StageContext[Any], path: str) -> tuple[str, int, int]:
    """The demuxer to force and the size of a PNG/JPEG, or ``invalid_input``."""
    head = await asyncio.to_thread(_head, path)
    kinds = [kind for magic, kind in _MAGIC.items() if head.startswith(magic)]
    if not kinds:
        raise PermanentError(ErrorCode.INVALID_INPUT,
                             "the watermark (the job's second input) is not a PNG or JPEG image")
    demuxer, codec = kinds[0]
    binaries, _ = ctx.services.media()
    try:
        info = await probe(binaries, path, timeout_s=15,
                           limits=ProbeLimits.from_settings(ctx.services.settings))
    except FFmpegError as exc:
        if not exc.non_retryable:
            raise
        raise PermanentError(ErrorCode.INVALID_INPUT,
                             f"the watermark image is unreadable: {exc.message}") from exc
    pictures = info.videos
    if (info.format_name != demuxer or len(info.streams) != 1 or not pictures
            or pictures[0].codec_name != codec or not pictures[0].width
            or not pictures[0].height):
        raise PermanentError(ErrorCode.INVALID_INPUT,
                             f"the watermark is not a single {codec.upper()} picture "
                             f"(ffprobe saw {info.format_name!r})")
    return demuxer, int(pictures[0].width or 0), int(pictures[0].height or 0)


def _head(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(8)


def placement(p: WatermarkParams, video: tuple[int, int],
              image: tuple[int, int]) -> tuple[int, int, int, int]:
    """Where the watermark goes: ``(x, y, width, height)`` in the output frame."""
    vw, vh = video
    iw, ih = image
    room_w, room_h = max(1, vw - 2 * p.margin), max(1, vh - 2 * p.margin)
    width = float(iw) if p.scale is None else p.scale * vw
    height = width * ih / iw
    shrink = min(1.0, room_w / width, room_h / height)
    w, h = max(1, round(width * shrink)), max(1, round(height * shrink))
    x = p.margin if p.position.endswith("left") else vw - w - p.margin
    y = p.margin if p.position.startswith("top") else vh - h - p.margin
    return max(0, x), max(0, y), w, h



async def handle(task: StageTask, ctx: StageContext[WatermarkParams]) -> StageResult:
    p = ctx.params
    media = ctx.probe()
    picture_in = media.require_video()
    width, height = fit(*picture_in.display_size, 7680, 4320)
    image_path = str(ctx.input_file(ctx.second_input("watermark image")))
    demuxer, iw, ih = await check_image(ctx, image_path)
    x, y, w, h = placement(p, (width, height), (iw, ih))

    source = ffmpeg.input(str(ctx.input_file()))
    mark = ffmpeg.input(image_path, f=demuxer).filter("scale", w, h).filter("format", "rgba")
    if p.opacity < 1.0:
        mark = mark.filter("colorchannelmixer", aa=round(p.opacity, 4))
    # One picture, repeated (eof_action) over every frame of the main input.
    main = picture.draw(source[f"v:{media.video_ordinal(picture_in)}"], picture_in, width,
                        height)
    video = ffmpeg.overlay(main, mark, x=x, y=y, eof_action="repeat").filter("format",
                                                                           "yuv420p")
    out_path, audio = await ctx.encode_web_mp4(
        video, source, media, "watermarked.mp4", preset=p.preset, crf=p.crf,
        audio_bitrate_k=p.audio_bitrate_k, tags=picture.SDR_TAGS)
    return StageResult(files={"video": out_path}, meta={
        "width": width, "height": height, "audio": audio,
        "overlay": {"x": x, "y": y, "width": w, "height": h}})


function = stage("watermark", handle, doc=__doc__ or "")
