"""Encode helpers shared by the stages that redraw the picture: one home for "how jetcut
writes a web MP4", so every stage that ends in one agrees on codec, profile, audio and tags.

Pure command building: the stage runs the arguments with its runner (progress, deadline and
cancellation come from there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ffmpeg

from shared.media.allowlist import STRIP_METADATA
from shared.media.probe import MediaInfo, VideoStream

__all__ = ["audio_plan", "encoder_time_base", "web_mp4_args"]


def encoder_time_base(video: VideoStream | None) -> str:
    """The source stream's time base as ffmpeg's ``-enc_time_base`` reads it (``1:90000``);
    the millisecond grid of WebM/Matroska when the probe did not say.

    With ``-fps_mode vfr`` every frame keeps its own time, but the encoder still counts in
    its own time base, 1/frame-rate by default: a phone's or a browser's jittery
    timestamps would be rounded onto that grid and frames that land on the same tick are
    dropped. Named explicitly because ``-1`` (the input's) does not reach through a
    ``-filter_complex`` graph.
    """
    num, _, den = ((video.time_base if video else None) or "").partition("/")
    if num.isdigit() and den.isdigit() and int(num) > 0 and int(den) > 0:
        return f"{int(num)}:{int(den)}"
    return "1:1000"


def audio_plan(media: MediaInfo, bitrate_k: int) -> tuple[dict[str, Any], str | None]:
    """ffmpeg-python output options for the first audio stream of an MP4 we make.

    AAC is copied as it is (no generation loss, no time); anything else is encoded to stereo
    AAC. ``({}, None)`` when there is no audio.

    Returns:
        The options, and how the audio is handled (``copy``/``aac``/None) for the step's meta.
    """
    audio = media.audio
    if audio is None:
        return {}, None
    if audio.codec_name == "aac":
        return {"acodec": "copy"}, "copy"
    return {"acodec": "aac", "audio_bitrate": f"{bitrate_k}k", "ac": 2}, "aac"


def web_mp4_args(video: Any, source: Any, media: MediaInfo, out_path: Path, *, preset: str,
                 crf: int, audio_bitrate_k: int, threads: int = 0,
                 tags: dict[str, Any] | None = None) -> tuple[list[str], str | None]:
    """The ffmpeg arguments that write a filtered picture (and the source's first audio
    track) as a web MP4: H.264 High, faststart, metadata stripped, ``threads`` as an output
    option (after the last output it would be ignored), colour ``tags`` as output options.
    Every frame keeps the source's timestamp (``fps_mode vfr`` in the source stream's time
    base, :func:`encoder_time_base`): MP4's default would force the nominal constant rate
    and duplicate frames of a variable-rate upload (a browser recording grew by 100 ms
    under a watermark that way), and a filter graph with a second input (the watermark's
    picture) would otherwise decide the output's rate.

    Args:
        video: the filtered ffmpeg-python video node.
        source: the ffmpeg-python input the audio comes from.
        media: the probed source.
        out_path: where the MP4 goes.
        preset: x264 preset.
        crf: x264 quality.
        audio_bitrate_k: AAC bitrate when the audio is re-encoded.
        threads: ``JETCUT_FFMPEG_THREADS`` (0: ffmpeg decides).
        tags: colour tags for the output (``shared.media.picture.SDR_TAGS``).

    Returns:
        The arguments (without the binary), and how the audio was handled.
    """
    audio_opts, audio = audio_plan(media, audio_bitrate_k)
    streams = [video, source[f"a:{media.audio_ordinal(media.audio)}"]] if (
        audio and media.audio is not None) else [video]
    out = ffmpeg.output(*streams, str(out_path), vcodec="libx264", preset=preset, crf=crf,
                        profile="high", movflags="+faststart", **STRIP_METADATA,
                        fps_mode="vfr",
                        **{"enc_time_base:v": encoder_time_base(media.video)},
                        **audio_opts, **(tags or {}),
                        **({"threads": threads} if threads else {}))
    return out.get_args(), audio
