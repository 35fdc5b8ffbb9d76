"""Stages every pipeline may use: probe (media facts) and noop (canary)."""

from __future__ import annotations

from shared.params.base import Params, Recipe, StageInfo


class ProbeParams(Params, frozen=True):
    pass


class NoopParams(Params, frozen=True):
    pass


STAGES: dict[str, StageInfo] = {
    "probe": StageInfo(ProbeParams, cost=0.1),
    "noop": StageInfo(NoopParams, cost=0.01),
}
RECIPES: dict[str, Recipe] = {}
