"""Segment-parallel encoding and HLS packaging (segment, encode-part, concat, package-hls)."""

from __future__ import annotations

from shared.params.base import Recipe, StageInfo

STAGES: dict[str, StageInfo] = {}
RECIPES: dict[str, Recipe] = {}
