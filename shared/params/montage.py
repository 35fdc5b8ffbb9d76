"""The montage stage and recipe: several clips into one."""

from __future__ import annotations

import re
from typing import Any, Literal

import msgspec

from shared.events import StepSpec
from shared.params.base import Params, Recipe, StageInfo

MAX_CLIPS = 30
"""Every clip is decoded at once in one filter graph; past this, split the montage."""

MAX_TITLE_CHARS = 200

Transition = Literal[
    "fade", "fadeblack", "fadewhite", "dissolve", "wipeleft", "wiperight", "wipeup",
    "wipedown", "slideleft", "slideright", "slideup", "slidedown", "circleopen",
    "circleclose", "radial", "smoothleft", "smoothright", "pixelize", "distance",
]
"""A curated subset of ffmpeg's ``xfade`` transitions."""

COLOR_NAMES = frozenset({
    "black", "white", "gray", "grey", "silver", "red", "maroon", "orange", "yellow", "olive",
    "lime", "green", "teal", "cyan", "aqua", "blue", "navy", "purple", "magenta", "fuchsia",
    "pink", "brown", "darkslategray", "midnightblue",
})
_HEX_COLOR = re.compile(r"#[0-9a-fA-F]{6}")


def _check_color(field: str, value: str) -> None:
    # Colours go into filter options and a lavfi source: allow only what is surely inert.
    if value.lower() not in COLOR_NAMES and not _HEX_COLOR.fullmatch(value):
        raise ValueError(f"{field} must be #RRGGBB or one of {', '.join(sorted(COLOR_NAMES))}")


class MontageParams(Params, frozen=True):
    """Clips (every media input, in ``uses`` order) into one H.264/AAC MP4."""

    width: int = 1280
    height: int = 720
    """Output size. Each clip is scaled to fit inside it, keeping its displayed aspect
    ratio, and padded (letterbox / pillarbox) with ``background``. Both must be even."""
    fps: float = 25.0
    """Constant output frame rate (1..120; 29.97 and 23.976 are understood)."""
    crossfade_s: float = 0.5
    """Length of each transition (0..5 s); 0 cuts. Shortened to half the shortest clip."""
    transition: Transition = "fade"
    background: str = "black"
    """Padding and title card colour: ``#RRGGBB`` or a basic colour name."""
    music: bool = False
    """The last input is a music bed, not a clip: looped or trimmed to the montage's
    length, faded in and out, and mixed under the clips' own audio."""
    music_volume_db: float = -12.0
    """Gain applied to the music bed (-60..0 dB)."""
    music_fade_s: float = 1.0
    """Fade-in and fade-out of the music bed (0..10 s)."""
    title: str | None = None
    """Text of a title card shown first (1..200 characters; newlines break lines).
    Rendered literally: no ``%{...}`` expansion, no filter syntax."""
    title_s: float = 3.0
    """How much the title card adds to the montage (0.5..10 s); it crossfades into the
    first clip like any other transition."""
    title_color: str = "white"
    title_size: int | None = None
    """Font size in pixels; default: a twelfth of the height, smaller for long titles."""
    crf: int = 23
    preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium",
                    "slow"] = "veryfast"
    audio_bitrate_k: int = 128

    def __post_init__(self) -> None:
        if not (16 <= self.width <= 7680 and 16 <= self.height <= 4320):
            raise ValueError("width must be within 16..7680 and height within 16..4320")
        if self.width % 2 or self.height % 2:
            raise ValueError("width and height must be even (yuv420p halves chroma)")
        if not 1.0 <= self.fps <= 120.0:
            raise ValueError("fps must be within 1..120")
        if not 0.0 <= self.crossfade_s <= 5.0:
            raise ValueError("crossfade_s must be within 0..5")
        _check_color("background", self.background)
        _check_color("title_color", self.title_color)
        if not -60.0 <= self.music_volume_db <= 0.0:
            raise ValueError("music_volume_db must be within -60..0")
        if not 0.0 <= self.music_fade_s <= 10.0:
            raise ValueError("music_fade_s must be within 0..10")
        if self.title is not None and not 1 <= len(self.title.strip()) <= MAX_TITLE_CHARS:
            raise ValueError(f"title must have 1..{MAX_TITLE_CHARS} characters")
        if not 0.5 <= self.title_s <= 10.0:
            raise ValueError("title_s must be within 0.5..10")
        if self.title_size is not None and not 8 <= self.title_size <= 400:
            raise ValueError("title_size must be within 8..400")
        if not 0 <= self.crf <= 51:
            raise ValueError("crf must be within 0..51")
        if not 32 <= self.audio_bitrate_k <= 512:
            raise ValueError("audio_bitrate_k must be within 32..512")


class MontageRecipeParams(MontageParams, frozen=True, kw_only=True):
    clips: int
    """How many of the job's inputs are clips: inputs 0..clips-1. With ``music`` the
    music bed is input ``clips``; any further input is an error."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.clips <= MAX_CLIPS:
            raise ValueError(f"clips must be within 1..{MAX_CLIPS}")


def montage(params: dict[str, Any]) -> dict[str, StepSpec]:
    """One ``montage`` step over inputs 0..clips-1 (and the music bed after them).

    The recipe cannot see how many inputs the job has, so ``clips`` says it; the planner
    then rejects a job with fewer inputs than the refs named here (``invalid_recipe``).
    """
    p = msgspec.convert(params, MontageRecipeParams)
    count = p.clips + (1 if p.music else 0)
    uses = [":input" if i == 0 else f":input/{i}" for i in range(count)]
    stage_params = {k: v for k, v in msgspec.to_builtins(p).items() if k != "clips"}
    return {"montage": StepSpec(stage="montage", uses=uses, params=stage_params)}


STAGES: dict[str, StageInfo] = {
    # Decodes every clip, scales and blends them, and encodes H.264: heavier than transcode.
    "montage": StageInfo(MontageParams, cost=1.5),
}
RECIPES: dict[str, Recipe] = {"montage": montage}
