"""Image and overlay stages (thumbnail, preview, watermark, subtitles) and their recipes.

Recipes: ``thumbnails`` (poster, evenly spaced frames, a sprite sheet + WebVTT for scrubbing),
``preview`` and ``gif`` (a short animated preview), ``watermark`` (a logo over a video) and
``subtitles`` (burnt-in captions). Every recipe starts with ``probe``: the stages size their
outputs from its media info.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import msgspec

from shared.events import StepSpec
from shared.params.base import Params, Recipe, StageInfo

Preset = Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow"]
Corner = Literal["top-left", "top-right", "bottom-left", "bottom-right"]

MAX_FRAMES = 400
"""Most frames one ``thumbnail`` step extracts (``frames``/``sprite``): each is one seek."""
MAX_SPRITE_SIDE = 16_000
"""Largest sprite sheet side in pixels; JPEG allows 65535, players and browsers far less."""


class ThumbnailParams(Params, frozen=True):
    mode: Literal["poster", "frames", "sprite"] = "poster"
    """``poster``: one frame at ``at_fraction``. ``frames``: ``count`` evenly spaced frames.
    ``sprite``: those frames as tiles of one JPEG, plus a WebVTT file for scrubbing."""
    at_fraction: float = 0.1
    """Where in the clip the poster frame is taken (0..1 of the duration)."""
    max_width: int = 1280
    """Poster and frames: at most this wide (never upscaled)."""
    count: int = 10
    """Frames and sprite: how many frames, one from the middle of each of ``count`` equal
    slices of the clip (fewer when the clip has fewer frames)."""
    interval_s: float | None = None
    """Frames and sprite: one frame per ``interval_s`` seconds instead of ``count``."""
    columns: int = 5
    """Sprite: tiles per row (rows follow from the frame count)."""
    tile_width: int = 160
    """Sprite: width of one tile (height keeps the displayed aspect ratio)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.at_fraction <= 1.0:
            raise ValueError("at_fraction must be within 0..1")
        if not 16 <= self.max_width <= 7680:
            raise ValueError("max_width must be within 16..7680")
        if not 1 <= self.count <= MAX_FRAMES:
            raise ValueError(f"count must be within 1..{MAX_FRAMES}")
        if self.interval_s is not None and not 0.1 <= self.interval_s <= 3600:
            raise ValueError("interval_s must be within 0.1..3600")
        if not 1 <= self.columns <= 50:
            raise ValueError("columns must be within 1..50")
        if not 16 <= self.tile_width <= 640:
            raise ValueError("tile_width must be within 16..640")
        if self.columns * self.tile_width > MAX_SPRITE_SIDE:
            raise ValueError(f"columns * tile_width must be at most {MAX_SPRITE_SIDE}")


class PreviewParams(Params, frozen=True):
    format: Literal["gif", "webp", "mp4"] = "gif"
    """``gif`` (palettegen/paletteuse), animated ``webp``, or a silent H.264 ``mp4``."""
    start_s: float | None = None
    """Where the preview starts; default 10% into the clip (earlier if the clip is short)."""
    duration_s: float = 3.0
    width: int = 320
    """Output width (never upscaled); height keeps the displayed aspect ratio, even."""
    fps: float = 10.0
    loop: bool = True
    """GIF/WebP: loop forever (true) or play once (false)."""

    def __post_init__(self) -> None:
        if self.start_s is not None and not 0.0 <= self.start_s <= 4 * 3600:
            raise ValueError("start_s must be within 0..14400")
        if not 0.1 <= self.duration_s <= 30.0:
            raise ValueError("duration_s must be within 0.1..30")
        if not 16 <= self.width <= 1920:
            raise ValueError("width must be within 16..1920")
        if not 1.0 <= self.fps <= 50.0:
            raise ValueError("fps must be within 1..50")


class _VideoOut(Params, frozen=True):
    """Re-encode settings shared by the stages that draw on a video."""

    crf: int = 23
    preset: Preset = "veryfast"
    audio_bitrate_k: int = 128
    """Used only when the source audio is not AAC (AAC is copied untouched)."""

    def __post_init__(self) -> None:
        if not 0 <= self.crf <= 51:
            raise ValueError("crf must be within 0..51")
        if not 32 <= self.audio_bitrate_k <= 512:
            raise ValueError("audio_bitrate_k must be within 32..512")


class WatermarkParams(_VideoOut, frozen=True):
    position: Corner = "bottom-right"
    margin: int = 16
    """Pixels between the watermark and the frame's edges."""
    scale: float | None = None
    """Watermark width as a fraction of the video width (0.01..1); default: the image's own
    size, shrunk if needed to fit inside the margins."""
    opacity: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.margin <= 1000:
            raise ValueError("margin must be within 0..1000")
        if self.scale is not None and not 0.01 <= self.scale <= 1.0:
            raise ValueError("scale must be within 0.01..1")
        if not 0.0 < self.opacity <= 1.0:
            raise ValueError("opacity must be within 0 (exclusive)..1")


_HEX_COLOR = re.compile(r"[0-9A-Fa-f]{6}")


class SubtitlesParams(_VideoOut, frozen=True):
    encoding: Literal["utf-8", "utf-16", "cp1252", "latin-1"] = "utf-8"
    """Text encoding of the subtitle file (a UTF-8 or UTF-16 byte-order mark wins)."""
    font_size: float = 0.05
    """Text height as a fraction of the video height."""
    position: Literal["bottom", "top"] = "bottom"
    margin: float = 0.05
    """Distance from the bottom (or top) edge as a fraction of the video height."""
    color: str = "FFFFFF"
    """Text colour, RRGGBB hex; drawn with a black outline."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.01 <= self.font_size <= 0.25:
            raise ValueError("font_size must be within 0.01..0.25")
        if not 0.0 <= self.margin <= 0.4:
            raise ValueError("margin must be within 0..0.4")
        if not _HEX_COLOR.fullmatch(self.color):
            raise ValueError("color must be six hex digits, RRGGBB")


class _Recipe(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class ThumbnailsRecipe(_Recipe, frozen=True):
    count: int = 10
    interval_s: float | None = None
    columns: int = 5
    tile_width: int = 160
    max_width: int = 1280
    at_fraction: float = 0.1


def thumbnails(params: dict[str, Any]) -> dict[str, StepSpec]:
    """A poster, ``count`` evenly spaced frames, and a sprite sheet + WebVTT for scrubbing."""
    p = msgspec.convert(params, ThumbnailsRecipe)
    uses = [":input", "probe"]
    spread = {"count": p.count, "interval_s": p.interval_s}
    return {
        "probe": StepSpec(stage="probe", uses=[":input"]),
        "poster": StepSpec(stage="thumbnail", uses=uses, params={
            "mode": "poster", "at_fraction": p.at_fraction, "max_width": p.max_width}),
        "frames": StepSpec(stage="thumbnail", uses=uses, params={
            "mode": "frames", "max_width": p.max_width, **spread}),
        "sprite": StepSpec(stage="thumbnail", uses=uses, params={
            "mode": "sprite", "columns": p.columns, "tile_width": p.tile_width, **spread}),
    }


class GifRecipe(_Recipe, frozen=True):
    start_s: float | None = None
    duration_s: float = 3.0
    width: int = 320
    fps: float = 10.0
    loop: bool = True


class PreviewRecipe(GifRecipe, frozen=True):
    format: Literal["gif", "webp", "mp4"] = "gif"


def preview(params: dict[str, Any]) -> dict[str, StepSpec]:
    """A short animated preview (GIF, animated WebP or a silent MP4 snippet)."""
    p = msgspec.convert(params, PreviewRecipe)
    return {
        "probe": StepSpec(stage="probe", uses=[":input"]),
        "preview": StepSpec(stage="preview", uses=[":input", "probe"],
                            params=msgspec.to_builtins(p)),
    }


def gif(params: dict[str, Any]) -> dict[str, StepSpec]:
    """``preview`` with the format fixed to GIF."""
    p = msgspec.convert(params, GifRecipe)
    return preview({**msgspec.to_builtins(p), "format": "gif"})


def watermark(params: dict[str, Any]) -> dict[str, StepSpec]:
    """The job's second input (a PNG/JPEG) over its first (a video); H.264/AAC MP4."""
    return {
        "probe": StepSpec(stage="probe", uses=[":input"]),
        "watermark": StepSpec(stage="watermark", uses=[":input", ":input/1", "probe"],
                              params=msgspec.to_builtins(msgspec.convert(params,
                                                                         WatermarkParams))),
    }


def subtitles(params: dict[str, Any]) -> dict[str, StepSpec]:
    """The job's second input (SRT/WebVTT) burnt into its first (a video); H.264/AAC MP4."""
    return {
        "probe": StepSpec(stage="probe", uses=[":input"]),
        "subtitles": StepSpec(stage="subtitles", uses=[":input", ":input/1", "probe"],
                              params=msgspec.to_builtins(msgspec.convert(params,
                                                                         SubtitlesParams))),
    }


STAGES: dict[str, StageInfo] = {
    "thumbnail": StageInfo(ThumbnailParams, cost=0.2),
    "preview": StageInfo(PreviewParams, cost=0.2),
    "watermark": StageInfo(WatermarkParams, cost=1.0),
    "subtitles": StageInfo(SubtitlesParams, cost=1.0),
}
RECIPES: dict[str, Recipe] = {
    "thumbnails": thumbnails,
    "preview": preview,
    "gif": gif,
    "watermark": watermark,
    "subtitles": subtitles,
}
