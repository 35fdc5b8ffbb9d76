"""noop — succeeds without touching media.

Consumes: stages.noop  StageTask
Does:     nothing; the step still goes through the whole runtime (lease, fence,
          completion; being declared without files, it has no work dir and no manifest), so
          a pipeline of noop steps measures jetcut's own overhead and makes a cheap canary
          job for health checks.
Emits:    jobs.stage.complete with meta {"noop": true}
"""

from __future__ import annotations

from shared.events import StageTask
from shared.params.core import NoopParams
from shared.stage import StageContext, StageResult, stage


async def handle(task: StageTask, ctx: StageContext[NoopParams]) -> StageResult:
    return StageResult(meta={"noop": True})


function = stage("noop", handle, doc=__doc__ or "", concurrency=32, files=False)
