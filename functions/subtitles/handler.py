"""subtitles — SRT or WebVTT captions burnt into the picture.

Consumes: stages.subtitles  StageTask (uses: the video ``:input``, the subtitle file
          ``:input/1`` (or another ``:input/<n>``) and the probe step of the video)
Does:     parses the subtitle file itself (UTF-8 by default, ``encoding`` otherwise; binary
          files, files over 5 MiB and files without a single ``start --> end`` cue are
          refused with ``invalid_input``), keeps only the text with italic/bold/underline/
          strike-out, and writes its own ASS script sized to the video; ffmpeg's ``ass``
          filter (libass) draws it with a font this stage supplies (see fonts.py), reading
          only that script and that font folder, by fixed relative names in the step's
          private work dir — nothing from the user ever lands in the filter graph.
          Video: H.264 (yuv420p) at the source's displayed size, evened, drawn as
          ``shared.media.picture`` says (deinterlaced, HDR tone-mapped, square pixels,
          tagged BT.709); audio: AAC copied, anything else encoded to AAC; +faststart,
          metadata stripped. Every frame keeps its source time (variable frame rate kept);
          a video whose picture never decodes is ``invalid_input``.
Emits:    jobs.stage.complete with outputs {video: jobs/<id>/<step>/subtitled.mp4},
          meta {width, height, cues, font, audio: copy|aac|null, first_cue_s, last_cue_s}
"""

from __future__ import annotations

import asyncio

import ffmpeg

from functions.subtitles.cues import SubtitleError, parse, to_ass
from functions.subtitles.fonts import find_font, stage_fonts
from shared.errors import ErrorCode, PermanentError
from shared.events import StageTask
from shared.geometry import fit
from shared.media import picture
from shared.params.images import SubtitlesParams
from shared.stage import StageContext, StageResult, stage

SCRIPT_NAME = "subs.ass"
FONTS_DIR = "fonts"


async def handle(task: StageTask, ctx: StageContext[SubtitlesParams]) -> StageResult:
    p = ctx.params
    media = ctx.probe()
    picture_in = media.require_video()
    width, height = fit(*picture_in.display_size, 7680, 4320)
    data = await asyncio.to_thread(ctx.input_file(ctx.second_input("subtitle file")).read_bytes)
    try:
        cues = parse(data, p.encoding)
    except SubtitleError as exc:
        raise PermanentError(ErrorCode.INVALID_INPUT,
                             f"the subtitles (the job's second input): {exc}") from exc
    font = find_font()
    stage_fonts(font, ctx.workdir / FONTS_DIR)
    (ctx.workdir / SCRIPT_NAME).write_text(
        to_ass(cues, width=width, height=height, font=font.family, font_size=p.font_size,
               color=p.color, top=p.position == "top", margin=p.margin),
        encoding="utf-8")

    source = ffmpeg.input(str(ctx.input_file()))
    # Relative names, resolved against cwd=workdir: fixed, so nothing needs escaping.
    video = (picture.draw(source[f"v:{media.video_ordinal(picture_in)}"], picture_in, width,
                          height)
             .filter("ass", filename=SCRIPT_NAME, fontsdir=FONTS_DIR)
             .filter("format", "yuv420p"))
    out_path, audio = await ctx.encode_web_mp4(
        video, source, media, "subtitled.mp4", preset=p.preset, crf=p.crf,
        audio_bitrate_k=p.audio_bitrate_k, tags=picture.SDR_TAGS, cwd=ctx.workdir)
    return StageResult(files={"video": out_path}, meta={
        "width": width, "height": height, "cues": len(cues), "font": font.family,
        "audio": audio, "first_cue_s": cues[0].start_ms / 1000,
        "last_cue_s": max(c.end_ms for c in cues) / 1000})



function = stage("subtitles", handle, doc=__doc__ or "")
