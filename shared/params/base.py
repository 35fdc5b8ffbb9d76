"""What every stage's params and every recipe builder share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from shared.events import StepSpec


class Params(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of stage params: user input, so unknown fields are errors, not ignored.

    Range checks go in ``__post_init__`` raising ``ValueError``; msgspec turns that into a
    validation error naming the field, which reaches the user as ``invalid_recipe``.
    """


@dataclass(frozen=True)
class StageInfo:
    params: type[Params]
    cost: float
    """Seconds of work per second of media, relative to ``timeout_per_media_s``."""


Recipe = Callable[[dict[str, Any]], dict[str, StepSpec]]
"""Builds a pipeline from the job's params (validated with a Params-like Struct)."""
