"""loudnorm — EBU R128 loudness normalisation, two passes.

Consumes: stages.loudnorm  StageTask (uses: one media input; a probe step's meta if present,
          otherwise the stage probes the input itself)
Does:     pass 1 measures the first audio stream (``loudnorm`` with ``print_format=json``,
          after the mix to the output channel count, since loudness depends on it); pass 2
          applies the measured values with ``linear=true`` — a plain gain when the input's
          loudness range and true peak allow it, loudnorm's dynamic mode otherwise — then
          resamples and encodes AAC (.m4a), MP3 (.mp3) or Opus (.ogg / .webm).
          ``keep_video`` also copies the input's video stream next to the normalised audio.
Emits:    jobs.stage.complete with outputs {audio: jobs/<id>/<step>/audio.<ext>} (and
          {video: .../video.mp4|.mkv} with keep_video on an input that has video), and meta
          {input: measured loudness, target, output: loudness after the filter,
          normalization_type: linear|dynamic|none, codec, container, sample_rate, ...}.
          An input without audio fails with ``no_audio_stream`` (never retried).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import ffmpeg

from shared.errors import ErrorCode, PermanentError
from shared.events import StageTask
from shared.media import STRIP_METADATA
from shared.params.audio import LoudnormParams
from shared.stage import StageContext, StageResult, stage

ENCODERS = {"aac": "aac", "mp3": "libmp3lame", "opus": "libopus"}
MP4_VIDEO_CODECS = frozenset({"h264", "hevc", "av1", "vp9", "mpeg4", "mpeg2video", "mjpeg"})
"""Video codecs an MP4 carries and players play; anything else is kept in Matroska."""

_JSON_START = re.compile(r"\{\s*\"input_i\"")


async def handle(task: StageTask, ctx: StageContext[LoudnormParams]) -> StageResult:
    p = ctx.params
    source = _media_input(ctx)
    media = await ctx.probe_input(source)
    audio = media.audio
    if audio is None:
        raise PermanentError(ErrorCode.NO_AUDIO_STREAM, "the input has no audio stream")
    video = media.video if p.keep_video else None
    duration = media.duration_s or task.media_duration_s
    _, runner = ctx.services.media()

    # Pass 1: measure, after the channel mix the output will have (a mono source played
    # on two channels is 3 LU louder than the same source measured as mono).
    src = ffmpeg.input(str(source))
    mixed = src[f"a:{media.audio_ordinal(audio)}"].filter(
        "aformat", channel_layouts="mono" if p.channels == 1 else "stereo")
    measure = mixed.filter("loudnorm", I=p.integrated_lufs, TP=p.true_peak_db, LRA=p.lra,
                           print_format="json")
    first = await runner.run(
        ffmpeg.output(measure, "-", f="null").get_args(), duration_s=duration,
        timeout_s=task.timeout_s, on_progress=lambda pr: ctx.progress(0.3 * (pr.fraction or 0)),
        cancel=ctx.cancel,
    )
    measured = _loudnorm_stats(first.stderr_tail)

    # Pass 2: normalise with what pass 1 measured, resample (dynamic mode runs at 192 kHz),
    # encode. Silence (-inf LUFS) has no loudness to correct: it is only re-encoded.
    src = ffmpeg.input(str(source))
    mixed = src[f"a:{media.audio_ordinal(audio)}"].filter(
        "aformat", channel_layouts="mono" if p.channels == 1 else "stereo")
    silent = not _finite(measured, "input_i", "input_tp", "input_lra", "input_thresh")
    if silent:
        normalised = mixed
    else:
        offset = measured["target_offset"] if _finite(measured, "target_offset") else 0.0
        normalised = mixed.filter(
            "loudnorm", I=p.integrated_lufs, TP=p.true_peak_db, LRA=p.lra,
            # Clamped to the ranges loudnorm accepts: a full-scale square wave measures
            # above 0 LUFS, which it would refuse as measured_I.
            measured_I=_clamp(measured["input_i"], -99, 0),
            measured_TP=_clamp(measured["input_tp"], -99, 99),
            # loudnorm reads a measured LRA of 0 as "not measured" and falls back to
            # dynamic mode; a steady tone really measures 0, so pass the smallest step.
            measured_LRA=_clamp(measured["input_lra"], 0.01, 99),
            measured_thresh=_clamp(measured["input_thresh"], -99, 0),
            offset=_clamp(offset, -99, 99),
            linear="true", print_format="json",
        )
    normalised = normalised.filter("aresample", p.sample_rate)

    audio_path = ctx.workdir / f"audio.{p.output_container}"
    encode: dict[str, Any] = {"acodec": ENCODERS[p.codec], "audio_bitrate": f"{p.bitrate_k}k",
                              "ar": p.sample_rate, "ac": p.channels, **STRIP_METADATA}
    files: dict[str, Path] = {"audio": audio_path}
    if video is None:
        outputs = [ffmpeg.output(normalised, str(audio_path), vn=None, **encode,
                                 **_container_args(p.output_container))]
    else:
        split = normalised.filter_multi_output("asplit", 2)
        video_ext = "mp4" if video.codec_name in MP4_VIDEO_CODECS else "mkv"
        video_path = ctx.workdir / f"video.{video_ext}"
        files["video"] = video_path
        outputs = [
            ffmpeg.output(split[0], str(audio_path), vn=None, **encode,
                          **_container_args(p.output_container)),
            ffmpeg.output(src[str(video.index)], split[1], str(video_path), vcodec="copy",
                          **encode, **_container_args(video_ext)),
        ]
    second = await runner.run(
        ffmpeg.merge_outputs(*outputs).get_args(), duration_s=duration,
        timeout_s=task.timeout_s,
        on_progress=lambda pr: ctx.progress(0.3 + 0.7 * (pr.fraction or 0)), cancel=ctx.cancel,
    )
    output = {} if silent else _loudnorm_stats(second.stderr_tail)
    return StageResult(files=files, meta={
        "input": _loudness(measured, "input"),
        "target": {"integrated_lufs": p.integrated_lufs, "true_peak_db": p.true_peak_db,
                   "lra": p.lra},
        "output": _loudness(output, "output") if output else None,
        "normalization_type": "none" if silent else output.get("normalization_type"),
        "codec": p.codec, "container": p.output_container, "bitrate_k": p.bitrate_k,
        "sample_rate": p.sample_rate, "channels": p.channels,
        "video_kept": video is not None,
        "duration_s": round(duration, 3) if duration else None,
    })


def _media_input(ctx: StageContext[LoudnormParams]) -> Path:
    """The one media file among the inputs (an upload, or a step's single output)."""
    for item in ctx.task.inputs:
        files = ctx.inputs.get(item.ref, {})
        if "media" in files:
            return files["media"]
        if len(files) == 1:
            return next(iter(files.values()))
    raise PermanentError(ErrorCode.INVALID_RECIPE,
                         f"step {ctx.task.step!r} needs one media input in 'uses'")


def _container_args(container: str) -> dict[str, Any]:
    if container in ("m4a", "mp4"):
        return {"f": "mp4" if container == "mp4" else "ipod", "movflags": "+faststart"}
    return {"f": {"mp3": "mp3", "ogg": "ogg", "webm": "webm", "mkv": "matroska"}[container]}


def _loudnorm_stats(stderr: str) -> dict[str, Any]:
    """The JSON block loudnorm prints at the end of a run (the last one in stderr).

    Raises:
        PermanentError: ``ffmpeg_failed`` when there is none (the filter did not run).
    """
    starts = list(_JSON_START.finditer(stderr))
    if starts:
        try:
            text = stderr[starts[-1].start():]
            stats, _ = json.JSONDecoder().raw_decode(text)
        except ValueError:
            stats = None
        if isinstance(stats, dict):
            return {k: _number(v) for k, v in stats.items()}
    raise PermanentError(ErrorCode.FFMPEG_FAILED,
                         "loudnorm printed no measurement (is there decodable audio?)")


def _number(value: Any) -> Any:
    """loudnorm prints numbers as strings ("-23.01", "-inf"); names stay strings."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _clamp(value: float, low: float, high: float) -> float:
    return min(high, max(low, value))


def _finite(stats: dict[str, Any], *keys: str) -> bool:
    return all(isinstance(stats.get(k), float) and math.isfinite(stats[k]) for k in keys)


def _loudness(stats: dict[str, Any], prefix: str) -> dict[str, float | None]:
    def value(key: str) -> float | None:
        v = stats.get(f"{prefix}_{key}")
        return round(v, 2) if isinstance(v, float) and math.isfinite(v) else None

    return {"integrated_lufs": value("i"), "true_peak_db": value("tp"), "lra": value("lra"),
            "threshold_lufs": value("thresh")}


function = stage("loudnorm", handle, doc=__doc__ or "")
