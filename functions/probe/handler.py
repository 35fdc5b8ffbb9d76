"""probe — what is this media?

Consumes: stages.probe   StageTask (uses: the input file)
Does:     ffprobe with protocol and demuxer allowlists, a codec allowlist and the probe gate
          (``JETCUT_INPUT_MAX_*``): playlists and lists fail ``unsupported_format``, codecs
          off the list ``unsupported_codec``, inputs past the caps ``input_too_large``
Emits:    jobs.stage.complete with meta = MediaInfo (duration, streams, codecs, rotation);
          non-media input fails the job with ``invalid_input`` and is never retried.
"""

from __future__ import annotations

import msgspec

from shared.events import StageTask
from shared.media import ProbeLimits
from shared.media import probe as ffprobe
from shared.params.core import ProbeParams
from shared.stage import StageContext, StageResult, stage


async def handle(task: StageTask, ctx: StageContext[ProbeParams]) -> StageResult:
    binaries, _ = ctx.services.media()
    info = await ffprobe(binaries, str(ctx.input_file()),
                         limits=ProbeLimits.from_settings(ctx.services.settings))
    return StageResult(meta=msgspec.to_builtins(info))


function = stage("probe", handle, doc=__doc__ or "", concurrency=4)
