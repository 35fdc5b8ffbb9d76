"""thumbnail — a poster frame.

Consumes: stages.thumbnail  StageTask (uses: the input file and the probe step)
Does:     one JPEG frame at ``at_fraction`` of the duration, upright, at most max_width wide
Emits:    jobs.stage.complete with outputs {poster: jobs/<id>/<step>/poster.jpg}
"""

from __future__ import annotations

import ffmpeg

from shared.events import StageTask
from shared.geometry import display_size, fit, video_stream
from shared.params.images import ThumbnailParams
from shared.stage import StageContext, StageResult, stage


async def handle(task: StageTask, ctx: StageContext[ThumbnailParams]) -> StageResult:
    p = ctx.params
    media = ctx.upstream_meta("probe")
    width, height = fit(*display_size(video_stream(media)), p.max_width, 4320)
    duration = float(media.get("duration_s") or 0.0)
    # Never seek to the very end: the last frame may not decode; stay a frame away.
    at = max(0.0, min(duration * p.at_fraction, duration - 0.1))
    out_path = ctx.workdir / "poster.jpg"
    out = ffmpeg.input(str(ctx.input_file()), ss=at).filter("scale", width, height).output(
        str(out_path), vframes=1, **{"q:v": 3}, map_metadata=-1, update=1
    )
    _, runner = ctx.services.media()
    await runner.run(out.get_args(), duration_s=None, timeout_s=task.timeout_s,
                     cancel=ctx.cancel)
    return StageResult(files={"poster": out_path}, meta={"width": width, "height": height,
                                                          "at_s": round(at, 3)})


function = stage("thumbnail", handle, doc=__doc__ or "")
