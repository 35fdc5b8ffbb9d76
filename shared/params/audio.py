"""Audio stages (loudnorm) and the recipes built on them (audio)."""

from __future__ import annotations

from shared.params.base import Recipe, StageInfo

STAGES: dict[str, StageInfo] = {}
RECIPES: dict[str, Recipe] = {}
