"""ffmpeg and ffprobe for jetcut stages: find the binaries, probe untrusted input into typed
``MediaInfo``, decide how a picture is drawn (``picture``), build encode commands
(``web_mp4_args``), run renders.

Stages import from here, never from the submodules::

    from shared.media import FFmpegRunner, find_binaries, picture, probe
"""

from __future__ import annotations

from shared.media import picture
from shared.media.allowlist import (
    FORMAT_WHITELIST,
    INPUT_FORMATS,
    STRIP_METADATA,
    STRIP_METADATA_ARGS,
)
from shared.media.binaries import Binaries, BinaryNotFoundError, child_env, find_binaries
from shared.media.encode import audio_plan, encoder_time_base, web_mp4_args
from shared.media.probe import (
    REFUSED_FORMATS,
    AudioStream,
    MediaInfo,
    ProbeLimits,
    StreamInfo,
    VideoStream,
    probe,
    run_ffprobe,
)
from shared.media.runner import (
    PROTOCOL_WHITELIST,
    FFmpegRunner,
    Progress,
    ProgressCallback,
    RunResult,
    classify_failure,
    step_timeout,
)

__all__ = [
    "FORMAT_WHITELIST",
    "INPUT_FORMATS",
    "PROTOCOL_WHITELIST",
    "REFUSED_FORMATS",
    "STRIP_METADATA",
    "STRIP_METADATA_ARGS",
    "AudioStream",
    "Binaries",
    "BinaryNotFoundError",
    "FFmpegRunner",
    "MediaInfo",
    "ProbeLimits",
    "Progress",
    "ProgressCallback",
    "RunResult",
    "StreamInfo",
    "VideoStream",
    "audio_plan",
    "child_env",
    "classify_failure",
    "encoder_time_base",
    "find_binaries",
    "picture",
    "probe",
    "run_ffprobe",
    "step_timeout",
    "web_mp4_args",
]
