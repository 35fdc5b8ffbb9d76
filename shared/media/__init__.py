"""ffmpeg and ffprobe for jetcut stages: find the binaries, probe untrusted input, run renders.

Stages import from here, never from the submodules::

    from shared.media import FFmpegRunner, find_binaries, probe
"""

from __future__ import annotations

from shared.media.allowlist import (
    FORMAT_WHITELIST,
    INPUT_FORMATS,
    STRIP_METADATA,
    STRIP_METADATA_ARGS,
)
from shared.media.binaries import Binaries, BinaryNotFoundError, child_env, find_binaries
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
    "child_env",
    "classify_failure",
    "find_binaries",
    "probe",
    "run_ffprobe",
    "step_timeout",
]
