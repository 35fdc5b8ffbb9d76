"""Audio stages (loudnorm) and the recipes built on them (audio)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from shared.events import StepSpec
from shared.params.base import Params, Recipe, StageInfo

AudioCodec = Literal["aac", "mp3", "opus"]
AudioContainer = Literal["m4a", "mp3", "ogg", "webm"]

CONTAINERS: dict[str, tuple[str, ...]] = {
    "aac": ("m4a",),
    "mp3": ("mp3",),
    "opus": ("ogg", "webm"),
}
"""Containers each codec may go in; the first is the default."""

SAMPLE_RATES: dict[str, frozenset[int]] = {
    "aac": frozenset({8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000}),
    "mp3": frozenset({8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000}),
    # libopus encodes at these rates only (it resamples anything else behind our back).
    "opus": frozenset({8000, 12000, 16000, 24000, 48000}),
}


class LoudnormParams(Params, frozen=True):
    """EBU R128 loudness normalisation (two-pass ``loudnorm``) and the audio encode.

    The defaults are EBU R128's broadcast target (-23 LUFS, -1 dBTP); streaming services
    and podcasts usually ask for -16 (speech) or -14 LUFS.
    """

    integrated_lufs: float = -23.0
    """Target integrated loudness, LUFS (-70..-5)."""
    true_peak_db: float = -1.0
    """Maximum true peak, dBTP (-9..0)."""
    lra: float = 11.0
    """Target loudness range, LU (1..50). Only used when the input's own range is wider
    (or its peaks too high for a plain gain): loudnorm then compresses dynamically."""
    codec: AudioCodec = "aac"
    container: AudioContainer | None = None
    """``m4a`` for aac, ``mp3`` for mp3, ``ogg`` (default) or ``webm`` for opus."""
    bitrate_k: int = 128
    """Audio bitrate in kbit/s (32..320; opus: at most 256 for mono)."""
    sample_rate: int = 48000
    """Output sample rate in Hz; opus allows 8000, 12000, 16000, 24000 and 48000 only."""
    channels: Literal[1, 2] = 2
    """Mono or stereo; loudness is measured after the down- or up-mix."""
    keep_video: bool = False
    """Also write the input's video stream (copied, not re-encoded) with the normalised
    audio as a second output, ``video`` (MP4, or Matroska for codecs MP4 cannot carry).
    An input without video simply gets no ``video`` output."""

    def __post_init__(self) -> None:
        if not -70.0 <= self.integrated_lufs <= -5.0:
            raise ValueError("integrated_lufs must be within -70..-5")
        if not -9.0 <= self.true_peak_db <= 0.0:
            raise ValueError("true_peak_db must be within -9..0")
        if not 1.0 <= self.lra <= 50.0:
            raise ValueError("lra must be within 1..50")
        if not 32 <= self.bitrate_k <= 320:
            raise ValueError("bitrate_k must be within 32..320")
        if self.sample_rate not in SAMPLE_RATES[self.codec]:
            rates = ", ".join(str(r) for r in sorted(SAMPLE_RATES[self.codec]))
            raise ValueError(f"sample_rate for {self.codec} must be one of {rates}")
        if self.codec == "opus" and self.bitrate_k > 256 * self.channels:
            raise ValueError("bitrate_k for opus must be at most 256 per channel")
        if self.container is not None and self.container not in CONTAINERS[self.codec]:
            allowed = " or ".join(CONTAINERS[self.codec])
            raise ValueError(f"container for {self.codec} must be {allowed}")

    @property
    def output_container(self) -> str:
        return self.container or CONTAINERS[self.codec][0]


def audio(params: dict[str, Any]) -> dict[str, StepSpec]:
    """Probe the input, then normalise its loudness into one audio file.

    Takes every ``loudnorm`` param. An input without audio fails with ``no_audio_stream``.
    """
    p = msgspec.convert(params, LoudnormParams)
    return {
        "probe": StepSpec(stage="probe", uses=[":input"]),
        "loudnorm": StepSpec(stage="loudnorm", uses=[":input", "probe"],
                             params=msgspec.to_builtins(p)),
    }


STAGES: dict[str, StageInfo] = {
    # Two decodes (measure, then normalise) and one audio encode: cheap next to video.
    "loudnorm": StageInfo(LoudnormParams, cost=0.5),
}
RECIPES: dict[str, Recipe] = {"audio": audio}
