"""Segment-parallel encoding and HLS packaging, and the ``hls`` recipe built on them.

Stages: ``segment`` (split the video at keyframes, no re-encode), ``rendition`` (decide one
rung of a ladder: its size, or skipped above the source), ``encode-part`` (one part to one
rung), ``audio-extract`` (the audio, encoded once), ``concat`` (join a rung's parts and the
audio by stream copy, verified), ``package-hls`` (HLS VOD playlists, segments and a master
playlist for every rung present).

A rung is named by its *short side*: ``480p`` is 854x480 for a 16:9 source and 480x854 for
a portrait one, which is what people mean by "480p" for a phone video. For a landscape
source the short side is the display height.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

import msgspec

from shared.events import StepSpec
from shared.params.base import Params, Recipe, StageInfo

Preset = Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow"]
SegmentType = Literal["mpegts", "fmp4"]

DEFAULT_LADDER = (1080, 720, 480, 360)
DEFAULT_PART_SECONDS = 12.0
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


def rung_size(display_width: int, display_height: int, height: int) -> tuple[int, int]:
    """Output size of rung ``height`` (its short side) for a source shown at the given size.

    Keeps the displayed aspect ratio, never upscales (a rung above the source comes out at
    the source's size), and makes both sides even for yuv420p, rounding to the nearest even
    number (1280x720 -> 854x480, as ladders usually have it) but never past the source.
    """
    short = min(display_width, display_height)
    scale = min(1.0, height / short)

    def even(value: int) -> int:
        return max(2, min(int(value * scale / 2 + 0.5) * 2, value // 2 * 2))

    return even(display_width), even(display_height)


def rung_name(height: int) -> str:
    return f"{height}p"


def default_maxrate_k(height: int) -> int:
    """VBV cap for a capped-CRF rung: 6 Mb/s at 1080p, scaling with the pixel count's square
    root (about 3.3 Mb/s at 720p, 1.8 at 480p, 1.2 at 360p), never under 300 kb/s."""
    return max(300, round(6000 * (height / 1080) ** 1.5))


def _check_seconds(name: str, value: float, low: float, high: float) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name} must be within {low:g}..{high:g}")


class SegmentParams(Params, frozen=True):
    part_seconds: float = 4.0
    """Target length of each part; a part starts at the first keyframe at or after each
    multiple of this, so parts are as long as the source's keyframes allow."""

    first_part_seconds: float | None = None
    """Target length of the first part (default: ``part_seconds``). A short first part
    is encoded first and soonest, which is what makes a progressive stream playable."""
    audio: bool = False
    """Also cut the first audio stream (stream copy) at the parts' start times, as
    ``audio.NNNN`` beside each ``part.NNNN``: what ``encode-part`` needs to write a
    playable segment with sound (``segment: true``)."""

    def __post_init__(self) -> None:
        _check_seconds("part_seconds", self.part_seconds, 0.5, 3600.0)
        if self.first_part_seconds is not None:
            _check_seconds("first_part_seconds", self.first_part_seconds, 0.5, 3600.0)


class RenditionParams(Params, frozen=True):
    height: int
    """The rung's short side (``480`` for 480p)."""
    always: bool = False
    """Run even when the source is smaller (then at the source's size, never upscaled):
    the ladder's lowest rung sets it, so every job has at least one rendition."""

    def __post_init__(self) -> None:
        if not 16 <= self.height <= 4320:
            raise ValueError("height must be within 16..4320")


class EncodePartParams(Params, frozen=True):
    height: int
    """Rung short side; the size comes from ``rung_size`` of the probed display size."""
    crf: int = 23
    preset: Preset = "veryfast"
    keyframe_seconds: float = 4.0
    """Keyframes exactly at every multiple of this on the *whole* video's timeline (plus
    one at each part's start), so HLS segments of this length cut identically in every
    rung. Use the package's ``segment_seconds``."""
    maxrate_k: int = 0
    """VBV maximum bitrate in kb/s (capped CRF); 0: uncapped."""
    bufsize_k: int = 0
    """VBV buffer in kb; 0: twice ``maxrate_k``."""
    segment: bool = False
    """Also write ``segment.ts``: this part as a playable MPEG-TS HLS segment (the video
    stream-copied, the part's audio from the split encoded to AAC) on the *whole* video's
    timeline, so consecutive parts play as one stream while the job still runs."""
    audio_bitrate_k: int = 128

    def __post_init__(self) -> None:
        if not 16 <= self.height <= 4320:
            raise ValueError("height must be within 16..4320")
        if not 32 <= self.audio_bitrate_k <= 512:
            raise ValueError("audio_bitrate_k must be within 32..512")
        if not 0 <= self.crf <= 51:
            raise ValueError("crf must be within 0..51")
        _check_seconds("keyframe_seconds", self.keyframe_seconds, 0.5, 60.0)
        if not 0 <= self.maxrate_k <= 200_000 or not 0 <= self.bufsize_k <= 400_000:
            raise ValueError("maxrate_k must be within 0..200000 and bufsize_k 0..400000")


class AudioExtractParams(Params, frozen=True):
    bitrate_k: int = 128
    channels: Literal[1, 2] = 2
    sample_rate: Literal[44100, 48000] = 48000

    def __post_init__(self) -> None:
        if not 32 <= self.bitrate_k <= 512:
            raise ValueError("bitrate_k must be within 32..512")


class ConcatParams(Params, frozen=True):
    name: str = "video"
    """The rendition's name: its file is ``<name>.mp4`` and HLS files start with it."""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name) or self.name == "master":
            raise ValueError("name must be 1-32 of a-z, 0-9, '-', '_' (starting alphanumeric), "
                             "and not 'master' (the master playlist's name)")


class PackageHlsParams(Params, frozen=True):
    segment_seconds: float = 4.0
    """HLS target segment length; cuts fall on the encoders' aligned keyframes."""
    segment_type: SegmentType = "mpegts"
    """``mpegts`` (.ts, every player) or ``fmp4`` (.m4s + an init segment, HLS v7)."""

    def __post_init__(self) -> None:
        _check_seconds("segment_seconds", self.segment_seconds, 0.5, 60.0)


class HlsRecipeParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    ladder: list[int] = msgspec.field(default_factory=lambda: list(DEFAULT_LADDER))
    """Rung short sides; rungs above the source are skipped, except the lowest."""
    segment_seconds: float = 4.0
    part_seconds: float | None = None
    """Length of the parts encoded in parallel (default: 12 s, or ``segment_seconds`` when
    that is longer). Shorter parts spread a short video over more workers; longer ones
    mean fewer tasks (less per-task overhead, a smaller job record) for long videos."""
    crf: int = 23
    preset: Preset = "veryfast"
    capped: bool = True
    """Capped CRF: each rung gets a VBV cap (``default_maxrate_k``)."""
    audio_bitrate_k: int = 128
    segment_type: SegmentType = "mpegts"
    progressive: bool = True
    """Playable while it runs: every part of every rung is also written as an HLS segment
    with its audio, the gateway serves playlists that grow as parts finish
    (``playback_url``), parts are encoded in play order, the lowest rung first."""
    first_part_seconds: float = 2.0
    """Length of the first part (progressive only): the first thing a viewer can play."""
    fast_preset: Preset = "superfast"
    """x264 preset of the lowest rung (progressive only; never slower than ``preset``):
    that rung is encoded first and makes the stream playable soonest."""

    def __post_init__(self) -> None:
        _check_seconds("first_part_seconds", self.first_part_seconds, 0.5, 3600.0)
        if not 1 <= len(self.ladder) <= 8 or len(set(self.ladder)) != len(self.ladder):
            raise ValueError("ladder must list 1-8 distinct heights")


def hls(params: dict[str, Any]) -> dict[str, StepSpec]:
    """A segment-parallel HLS ladder: probe, split once, encode every part of every rung in
    parallel, encode the audio once, join each rung, package them all.

    Progressive (the default): the split also cuts the audio per part, every part is also
    an HLS segment, and the rungs are planned lowest first, so ``play_order`` schedules
    part 0 of the fast lowest rung before anything else.
    """
    p = msgspec.convert(params, HlsRecipeParams)
    lowest = min(p.ladder)
    split: dict[str, Any] = {"part_seconds": p.part_seconds
                             or max(DEFAULT_PART_SECONDS, p.segment_seconds)}
    if p.progressive:
        split.update(first_part_seconds=min(p.first_part_seconds, split["part_seconds"]),
                     audio=True)
    steps: dict[str, StepSpec] = {
        "probe": StepSpec(stage="probe", uses=[":input"]),
        "segment": StepSpec(stage="segment", uses=[":input", "probe"], params=split),
        "audio": StepSpec(stage="audio-extract", uses=[":input", "probe"],
                          params={"bitrate_k": p.audio_bitrate_k}),
    }
    concats = []
    order = sorted(p.ladder) if p.progressive else sorted(p.ladder, reverse=True)
    for height in order:
        name = rung_name(height)
        encode: dict[str, Any] = {"height": height, "crf": p.crf, "preset": p.preset,
                                  "keyframe_seconds": p.segment_seconds}
        if p.capped:
            encode["maxrate_k"] = default_maxrate_k(height)
        if p.progressive:
            encode.update(segment=True, audio_bitrate_k=p.audio_bitrate_k)
            if height == lowest:
                encode["preset"] = faster_preset(p.preset, p.fast_preset)
        steps[f"rung_{name}"] = StepSpec(stage="rendition", uses=["probe"],
                                         params={"height": height, "always": height == lowest})
        steps[f"encode_{name}"] = StepSpec(stage="encode-part", each="segment",
                                           uses=["segment", "probe", f"rung_{name}"],
                                           params=encode)
        steps[f"concat_{name}"] = StepSpec(stage="concat", uses=[f"encode_{name}", "audio"],
                                           params={"name": name})
        concats.append(f"concat_{name}")
    steps["package"] = StepSpec(stage="package-hls", uses=concats, fan_in=True,
                                params={"segment_seconds": p.segment_seconds,
                                        "segment_type": p.segment_type})
    return steps


_PRESETS: tuple[Preset, ...] = ("ultrafast", "superfast", "veryfast", "faster", "fast",
                                "medium", "slow")


def faster_preset(a: Preset, b: Preset) -> Preset:
    """The faster of two x264 presets."""
    return a if _PRESETS.index(a) <= _PRESETS.index(b) else b


STAGES: dict[str, StageInfo] = {
    "segment": StageInfo(SegmentParams, cost=0.2),
    "rendition": StageInfo(RenditionParams, cost=0.01),
    "encode-part": StageInfo(EncodePartParams, cost=1.0),
    "audio-extract": StageInfo(AudioExtractParams, cost=0.2),
    "concat": StageInfo(ConcatParams, cost=0.2),
    "package-hls": StageInfo(PackageHlsParams, cost=0.2),
}
RECIPES: dict[str, Recipe] = {"hls": hls}
