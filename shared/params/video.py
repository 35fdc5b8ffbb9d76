"""Video stages (transcode) and the recipes built on them (web)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from shared.events import StepSpec
from shared.params.base import Params, Recipe, StageInfo


class TranscodeParams(Params, frozen=True):
    vcodec: Literal["h264"] = "h264"
    crf: int = 23
    preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium",
                    "slow"] = "veryfast"
    max_height: int = 720
    max_width: int = 1280
    audio_codec: Literal["aac"] = "aac"
    audio_bitrate_k: int = 128

    def __post_init__(self) -> None:
        if not 0 <= self.crf <= 51:
            raise ValueError("crf must be within 0..51")
        if not 16 <= self.max_height <= 4320 or not 16 <= self.max_width <= 7680:
            raise ValueError("max_height must be within 16..4320 and max_width 16..7680")
        if not 32 <= self.audio_bitrate_k <= 512:
            raise ValueError("audio_bitrate_k must be within 32..512")


class WebParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    max_height: int = 720
    crf: int = 23
    preset: str = "veryfast"


def web(params: dict[str, Any]) -> dict[str, StepSpec]:
    """MP4 (H.264/AAC, at most 720p, faststart) and a poster JPEG."""
    p = msgspec.convert(params, WebParams)
    return {
        "probe": StepSpec(stage="probe", uses=[":input"]),
        "transcode": StepSpec(
            stage="transcode", uses=[":input", "probe"],
            params={"max_height": p.max_height, "crf": p.crf, "preset": p.preset},
        ),
        "poster": StepSpec(stage="thumbnail", uses=[":input", "probe"]),
    }


STAGES: dict[str, StageInfo] = {
    "transcode": StageInfo(TranscodeParams, cost=1.0),
}
RECIPES: dict[str, Recipe] = {"web": web}
