"""The montage stage and recipe: several clips into one."""

from __future__ import annotations

from shared.params.base import Recipe, StageInfo

STAGES: dict[str, StageInfo] = {}
RECIPES: dict[str, Recipe] = {}
