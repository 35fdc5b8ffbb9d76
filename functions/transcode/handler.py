"""transcode — a web-playable MP4.

Consumes: stages.transcode  StageTask (uses: the input file and the probe step)
Does:     H.264 (yuv420p, 8-bit) + AAC, scaled down to fit max_height x max_width keeping
          the displayed aspect ratio with even dimensions, +faststart, metadata stripped
Emits:    jobs.stage.complete with outputs {video: jobs/<id>/<step>/video.mp4}
"""

from __future__ import annotations

import ffmpeg

from shared.events import StageTask
from shared.geometry import display_size, fit, has_audio, video_stream
from shared.params.video import TranscodeParams
from shared.stage import StageContext, StageResult, stage


async def handle(task: StageTask, ctx: StageContext[TranscodeParams]) -> StageResult:
    p = ctx.params
    media = ctx.upstream_meta("probe")
    width, height = fit(*display_size(video_stream(media)), p.max_width, p.max_height)
    _, runner = ctx.services.media()
    source = ffmpeg.input(str(ctx.input_file()))
    out_path = ctx.workdir / "video.mp4"
    video = source.video.filter("scale", width, height).filter("format", "yuv420p")
    streams = [video, source.audio] if has_audio(media) else [video]
    audio_args = {"acodec": "aac", "audio_bitrate": f"{p.audio_bitrate_k}k", "ac": 2} \
        if has_audio(media) else {}
    out = ffmpeg.output(
        *streams, str(out_path), vcodec="libx264", preset=p.preset, crf=p.crf,
        profile="high", movflags="+faststart", map_metadata=-1, **audio_args,
    )
    threads = ctx.services.settings.ffmpeg_threads
    args = out.get_args() + (["-threads", str(threads)] if threads else [])
    await runner.run(args, duration_s=task.media_duration_s, timeout_s=task.timeout_s,
                     on_progress=lambda pr: ctx.progress(pr.fraction or 0.0),
                     cancel=ctx.cancel)
    return StageResult(files={"video": out_path},
                       meta={"width": width, "height": height, "vcodec": "h264",
                             "acodec": "aac" if has_audio(media) else None})


function = stage("transcode", handle, doc=__doc__ or "")
