"""The stage catalog (params, cost) and built-in recipes, planned into validated DAGs.

Shared by the gateway (reject a bad job before it is queued) and the conductor (plan it).
A recipe is a function of the job's params returning ``{step: StepSpec}``; inline steps use
the same shape. Validation names the step and field at fault, with code ``invalid_recipe``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from shared.errors import ErrorCode, PermanentError
from shared.events import StepSpec
from shared.jobstate import input_ref_index


class Params(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of stage params: user input, so unknown fields are errors, not ignored."""


class ProbeParams(Params, frozen=True):
    pass


class NoopParams(Params, frozen=True):
    pass


class TranscodeParams(Params, frozen=True):
    vcodec: Literal["h264"] = "h264"
    crf: int = msgspec.field(default=23)
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


class ThumbnailParams(Params, frozen=True):
    at_fraction: float = 0.1
    """Where in the clip the poster frame is taken (0..1 of the duration)."""
    max_width: int = 1280

    def __post_init__(self) -> None:
        if not 0.0 <= self.at_fraction <= 1.0:
            raise ValueError("at_fraction must be within 0..1")
        if not 16 <= self.max_width <= 7680:
            raise ValueError("max_width must be within 16..7680")


@dataclass(frozen=True)
class StageInfo:
    params: type[Params]
    cost: float
    """Seconds of work per second of media, relative to ``timeout_per_media_s``."""


STAGES: dict[str, StageInfo] = {
    "probe": StageInfo(ProbeParams, cost=0.1),
    "transcode": StageInfo(TranscodeParams, cost=1.0),
    "thumbnail": StageInfo(ThumbnailParams, cost=0.2),
    "noop": StageInfo(NoopParams, cost=0.01),
}


def decode_params(stage: str, params: dict[str, Any]) -> Params:
    """Validate params for ``stage``; raises ``ValueError`` with msgspec's message."""
    try:
        return msgspec.convert(params, STAGES[stage].params)
    except msgspec.ValidationError as exc:
        raise ValueError(str(exc)) from exc


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


RECIPES: dict[str, Callable[[dict[str, Any]], dict[str, StepSpec]]] = {"web": web}


def invalid(message: str, **details: Any) -> PermanentError:
    return PermanentError(ErrorCode.INVALID_RECIPE, message, details=details)


def resolve(
    recipe: str | None, steps: dict[str, StepSpec] | None, params: dict[str, Any], n_inputs: int
) -> dict[str, StepSpec]:
    """Turn a job's recipe (or inline steps) into a validated DAG.

    Raises:
        PermanentError: ``invalid_recipe`` naming the step and field at fault.
    """
    if (recipe is None) == (steps is None):
        raise invalid("give exactly one of 'recipe' or 'steps'")
    if recipe is not None:
        if recipe not in RECIPES:
            raise invalid(f"unknown recipe {recipe!r}; known: {', '.join(sorted(RECIPES))}",
                          field="recipe")
        try:
            steps = RECIPES[recipe](params)
        except msgspec.ValidationError as exc:
            raise invalid(f"recipe {recipe!r}: bad params: {exc}", field="params") from exc
    assert steps is not None
    validate(steps, n_inputs)
    return steps


def validate(steps: dict[str, StepSpec], n_inputs: int) -> None:
    if not steps:
        raise invalid("a pipeline needs at least one step", field="steps")
    for name, spec in steps.items():
        if not name or not all(c.isalnum() or c in "-_" for c in name) or len(name) > 64:
            raise invalid(f"step name {name!r} must be 1-64 letters, digits, '-' or '_'",
                          step=name)
        if spec.stage not in STAGES:
            raise invalid(f"step {name!r}: unknown stage {spec.stage!r}", step=name,
                          field="stage")
        for ref in spec.uses:
            index = _input_index(name, ref)
            if index is None and ref not in steps:
                raise invalid(f"step {name!r}: 'uses' names unknown step {ref!r}", step=name,
                              field="uses")
            if index is not None and index >= n_inputs:
                raise invalid(f"step {name!r}: 'uses' names {ref!r} but the job has "
                              f"{n_inputs} input(s)", step=name, field="uses")
        if spec.each is not None and spec.each not in spec.uses:
            raise invalid(f"step {name!r}: 'each' names {spec.each!r}, which it must also "
                          f"list in 'uses'", step=name, field="each")
        if spec.each is not None and input_ref_index(spec.each) is not None:
            raise invalid(f"step {name!r}: 'each' must name a step, not an input", step=name,
                          field="each")
        try:
            decode_params(spec.stage, spec.params)
        except ValueError as exc:
            raise invalid(f"step {name!r}: bad params: {exc}", step=name,
                          field="params") from exc
    _check_acyclic(steps)


def _input_index(step: str, ref: str) -> int | None:
    try:
        return input_ref_index(ref)
    except ValueError:
        raise invalid(f"step {step!r}: bad input reference {ref!r}", step=step,
                      field="uses") from None


def _check_acyclic(steps: dict[str, StepSpec]) -> None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = " -> ".join([*path[path.index(name):], name])
            raise invalid(f"steps form a cycle: {cycle}", step=name, field="uses")
        state[name] = 1
        for ref in steps[name].uses:
            if input_ref_index(ref) is None:
                visit(ref, [*path, name])
        state[name] = 2

    for name in steps:
        visit(name, [])
