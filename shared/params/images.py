"""Image stages (thumbnail) and the recipes built on them."""

from __future__ import annotations

from shared.params.base import Params, Recipe, StageInfo


class ThumbnailParams(Params, frozen=True):
    at_fraction: float = 0.1
    """Where in the clip the poster frame is taken (0..1 of the duration)."""
    max_width: int = 1280

    def __post_init__(self) -> None:
        if not 0.0 <= self.at_fraction <= 1.0:
            raise ValueError("at_fraction must be within 0..1")
        if not 16 <= self.max_width <= 7680:
            raise ValueError("max_width must be within 16..7680")


STAGES: dict[str, StageInfo] = {
    "thumbnail": StageInfo(ThumbnailParams, cost=0.2),
}
RECIPES: dict[str, Recipe] = {}
