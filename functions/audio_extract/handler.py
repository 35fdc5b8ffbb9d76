"""audio-extract — encode the input's audio once, on the video's timeline.

Consumes: stages.audio-extract  StageTask (uses: the input file and the probe step)
Does:     AAC-LC (``bitrate_k``, ``channels``, ``sample_rate``) from the first audio stream,
          shifted so that time 0 is the first video frame: audio that starts after the
          video is padded with silence, audio that starts before it is trimmed, and it ends
          with the video. Every rendition of a ladder muxes this one encode (``concat``), so
          the audio is encoded once however many renditions and parts there are.
Emits:    jobs.stage.complete with outputs {audio: .../audio.m4a} and meta {audio: true,
          codecs: "mp4a.40.2", bitrate_k, channels, sample_rate, offset_s}; for an input
          without audio: no outputs and meta {audio: false} (joins then make silent video).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from shared.errors import ErrorCode, FFmpegError
from shared.events import StageTask
from shared.media import STRIP_METADATA_ARGS, Binaries, run_ffprobe
from shared.params.hls import AudioExtractParams
from shared.stage import StageContext, StageResult, stage


async def stream_starts(binaries: Binaries, path: Path, timeout_s: float) -> dict[int, float]:
    """Each stream's start time in seconds, as the demuxer reports it (edit lists applied)."""
    argv = ["-v", "error", "-protocol_whitelist", "file",
            "-show_entries", "stream=index,start_time", "-of", "compact=p=0:nk=0",
            "file:" + str(path)]
    out, tail, code = await run_ffprobe(binaries, argv, timeout_s)
    if code != 0:
        raise FFmpegError(ErrorCode.FFMPEG_FAILED, f"ffprobe failed: {tail.strip()}",
                          non_retryable=code > 0, returncode=code,
                          stderr_tail=tail)
    starts: dict[int, float] = {}
    for line in out.decode("utf-8", "replace").splitlines():
        fields = dict(item.split("=", 1) for item in line.split("|") if "=" in item)
        with contextlib.suppress(KeyError, ValueError):
            starts[int(fields["index"])] = float(fields["start_time"])
    return starts


async def handle(task: StageTask, ctx: StageContext[AudioExtractParams]) -> StageResult:
    p = ctx.params
    media = ctx.probe()
    audio = media.audio
    if audio is None:
        return StageResult(meta={"audio": False})
    video = media.require_video()
    source = ctx.input_file()
    binaries, runner = ctx.services.media()
    starts = await stream_starts(binaries, source, min(task.timeout_s, 60.0))
    video_start = starts.get(video.index, 0.0)
    audio_start = starts.get(audio.index, video_start)

    # -copyts keeps the demuxer's timestamps, so the shift is exactly the video's start;
    # aresample with first_pts=0 then pads or trims the head to land on 0.
    chain = [f"asetpts=PTS-{video_start:.6f}/TB", "aresample=async=1:first_pts=0"]
    if video.duration_s:
        chain.append(f"atrim=end={video.duration_s:.6f}")
    out = ctx.workdir / "audio.m4a"
    args = ["-copyts", "-i", str(source), "-map", f"0:{audio.index}", "-vn", "-sn",
            "-dn", "-af", ",".join(chain), "-c:a", "aac", "-b:a", f"{p.bitrate_k}k",
            "-ac", str(p.channels), "-ar", str(p.sample_rate), *STRIP_METADATA_ARGS,
            str(out)]
    await runner.run(args, duration_s=task.media_duration_s, timeout_s=task.timeout_s,
                     on_progress=lambda pr: ctx.progress(pr.fraction or 0.0),
                     cancel=ctx.cancel)
    return StageResult(files={"audio": out},
                       meta={"audio": True, "codecs": "mp4a.40.2", "bitrate_k": p.bitrate_k,
                             "channels": p.channels, "sample_rate": p.sample_rate,
                             "offset_s": round(audio_start - video_start, 6)})


function = stage("audio-extract", handle, doc=__doc__ or "")
