"""Video stages (transcode) and the recipes built on them (web)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from shared.events import StepSpec
from shared.params.base import Params, Recipe, StageInfo

VideoCodec = Literal["h264", "hevc", "vp9", "av1"]
AudioCodec = Literal["aac", "opus", "mp3"]
Preset = Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow"]

CONTAINER: dict[str, str] = {"h264": "mp4", "hevc": "mp4", "av1": "mp4", "vp9": "webm"}
"""The container each video codec is written in (the output file's extension)."""

CRF_RANGE: dict[str, tuple[int, int]] = {
    # x264's crf 0 is lossless, which only the High 4:4:4 profile allows: not web-playable.
    "h264": (1, 51),
    "hevc": (0, 51),
    "vp9": (0, 63),
    "av1": (0, 63),
}
DEFAULT_CRF: dict[str, int] = {"h264": 23, "hevc": 28, "vp9": 32, "av1": 30}
"""Used when neither ``crf`` nor ``video_bitrate_k`` is given: roughly the same quality."""

AUDIO_CODECS_IN: dict[str, tuple[str, ...]] = {"mp4": ("aac", "mp3", "opus"), "webm": ("opus",)}
DEFAULT_AUDIO: dict[str, str] = {"mp4": "aac", "webm": "opus"}
AUDIO_BITRATE_RANGE: dict[str, tuple[int, int]] = {
    "aac": (32, 512), "opus": (32, 512), "mp3": (32, 320),
}
PRESET_CODECS = ("h264", "hevc")
_NAMES = {"mp4": "MP4", "webm": "WebM"}


class TranscodeParams(Params, frozen=True):
    """One web-playable rendition: 8-bit 4:2:0 video, first audio track, metadata stripped.

    ``crf`` and ``video_bitrate_k`` are two ways to say how big the output may be; give at
    most one (neither: the codec's default crf). ``None`` fields take the codec's default,
    see the ``effective_*`` properties.
    """

    vcodec: VideoCodec = "h264"
    crf: int | None = None
    """Constant quality (lower is better): 1..51 for h264, 0..51 hevc, 0..63 vp9 and av1."""
    video_bitrate_k: int | None = None
    """Average video bitrate in kbit/s instead of a crf (50..100000)."""
    preset: Preset | None = None
    """x264/x265 speed preset (h264 and hevc only; default ``veryfast``)."""
    max_height: int = 720
    max_width: int = 1280
    fps: float | None = None
    """Constant output frame rate (1..240); a slower source keeps its own rate."""
    audio_codec: AudioCodec | None = None
    """Default: ``aac`` in MP4, ``opus`` in WebM (vp9)."""
    audio_bitrate_k: int = 128
    hdr: Literal["tonemap", "keep"] = "tonemap"
    """An HDR (PQ/HLG) source is tone-mapped to SDR BT.709 (``tonemap``), or kept as 10-bit
    HDR (``keep``: vcodec ``hevc`` only, Main 10 with the source's BT.2020 tags)."""
    still_s: float = 5.0
    """Length of the clip made from a still picture (JPEG, PNG, WebP...), 0.1..3600 s."""

    def __post_init__(self) -> None:
        low, high = CRF_RANGE[self.vcodec]
        if self.hdr == "keep" and self.vcodec != "hevc":
            raise ValueError("hdr 'keep' needs vcodec 'hevc' (10-bit HDR is written as HEVC "
                             "Main 10; other codecs get the tone-mapped SDR picture)")
        if not 0.1 <= self.still_s <= 3600:
            raise ValueError("still_s must be within 0.1..3600")
        if self.crf is not None and self.video_bitrate_k is not None:
            raise ValueError("give crf or video_bitrate_k, not both")
        if self.crf is not None and not low <= self.crf <= high:
            raise ValueError(f"crf must be within {low}..{high} for vcodec {self.vcodec!r}")
        if self.video_bitrate_k is not None and not 50 <= self.video_bitrate_k <= 100_000:
            raise ValueError("video_bitrate_k must be within 50..100000")
        if self.preset is not None and self.vcodec not in PRESET_CODECS:
            raise ValueError(f"preset applies to vcodec h264 and hevc only, not "
                             f"{self.vcodec!r} (vp9 and av1 use fixed speed settings)")
        if not 16 <= self.max_height <= 4320 or not 16 <= self.max_width <= 7680:
            raise ValueError("max_height must be within 16..4320 and max_width 16..7680")
        if self.fps is not None and not 1 <= self.fps <= 240:
            raise ValueError("fps must be within 1..240")
        if self.audio_codec is not None and self.audio_codec not in AUDIO_CODECS_IN[
                self.container]:
            allowed = " or ".join(repr(c) for c in AUDIO_CODECS_IN[self.container])
            raise ValueError(f"audio_codec {self.audio_codec!r} cannot go in "
                             f"{_NAMES[self.container]} (the container of vcodec "
                             f"{self.vcodec!r}); use {allowed}")
        low, high = AUDIO_BITRATE_RANGE[self.effective_audio_codec]
        if not low <= self.audio_bitrate_k <= high:
            raise ValueError(f"audio_bitrate_k must be within {low}..{high} for "
                             f"audio_codec {self.effective_audio_codec!r}")

    @property
    def container(self) -> str:
        """``mp4`` or ``webm``, chosen by the video codec."""
        return CONTAINER[self.vcodec]

    @property
    def effective_crf(self) -> int | None:
        """The crf to encode with, or ``None`` when a bitrate was asked for."""
        if self.video_bitrate_k is not None:
            return None
        return self.crf if self.crf is not None else DEFAULT_CRF[self.vcodec]

    @property
    def effective_preset(self) -> str | None:
        return (self.preset or "veryfast") if self.vcodec in PRESET_CODECS else None

    @property
    def effective_audio_codec(self) -> str:
        return self.audio_codec or DEFAULT_AUDIO[self.container]


class WebParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    max_height: int = 720
    crf: int = 23
    preset: str = "veryfast"
    still_s: float = 5.0


def web(params: dict[str, Any]) -> dict[str, StepSpec]:
    """MP4 (H.264/AAC, at most 720p, faststart) and a poster JPEG."""
    p = msgspec.convert(params, WebParams)
    return {
        "probe": StepSpec(stage="probe", uses=[":input"]),
        "transcode": StepSpec(
            stage="transcode", uses=[":input", "probe"],
            params={"max_height": p.max_height, "crf": p.crf, "preset": p.preset,
                    "still_s": p.still_s},
        ),
        "poster": StepSpec(stage="thumbnail", uses=[":input", "probe"]),
    }


STAGES: dict[str, StageInfo] = {
    "transcode": StageInfo(TranscodeParams, cost=1.0),
}
RECIPES: dict[str, Recipe] = {"web": web}
