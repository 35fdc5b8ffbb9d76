"""rendition — decide one rung of a ladder: its size, or that it does not apply.

Consumes: stages.rendition  StageTask (uses: the probe step only, so nothing is downloaded)
Does:     computes the rung's output size from the source's displayed size (``height`` is
          the short side; aspect kept, even sides, never upscaled). A rung whose short side
          is above the source's is ``skipped`` — and with it the steps that encode, join
          and package it — unless ``always`` is set (the ladder's lowest rung: a tiny source
          still gets one rendition, at its own size).
Emits:    jobs.stage.complete with meta {rendition, width, height, source_width,
          source_height}, or skipped with the reason.
"""

from __future__ import annotations

from shared.events import StageTask
from shared.params.hls import RenditionParams, rung_name, rung_size
from shared.stage import StageContext, StageResult, stage


async def handle(task: StageTask, ctx: StageContext[RenditionParams]) -> StageResult:
    p = ctx.params
    source_w, source_h = ctx.probe().require_video().display_size
    if p.height > min(source_w, source_h) and not p.always:
        return StageResult(skipped=f"the source is {source_w}x{source_h}: a "
                                   f"{rung_name(p.height)} rendition would upscale it")
    width, height = rung_size(source_w, source_h, p.height)
    return StageResult(meta={"rendition": rung_name(p.height), "width": width,
                             "height": height, "source_width": source_w,
                             "source_height": source_h})


function = stage("rendition", handle, doc=__doc__ or "", concurrency=16)
