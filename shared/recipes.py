"""The stage catalog and recipes, merged from ``shared.params``, planned into validated DAGs.

Shared by the gateway (reject a bad job before it is queued) and the conductor (plan it).
A recipe is a function of the job's params returning ``{step: StepSpec}``; inline steps use
the same shape. Validation names the step and field at fault, with code ``invalid_recipe``.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from shared.errors import ErrorCode, PermanentError
from shared.events import StepSpec
from shared.jobstate import input_ref_index
from shared.params import audio, core, hls, images, montage, video
from shared.params.base import Params, Recipe, StageInfo

STEP_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_FAMILIES = (core, video, hls, images, audio, montage)
STAGES: dict[str, StageInfo] = {k: v for m in _FAMILIES for k, v in m.STAGES.items()}
RECIPES: dict[str, Recipe] = {k: v for m in _FAMILIES for k, v in m.RECIPES.items()}


def decode_params(stage: str, params: dict[str, Any]) -> Params:
    """Validate params for ``stage``; raises ``ValueError`` with msgspec's message."""
    try:
        return msgspec.convert(params, STAGES[stage].params)
    except msgspec.ValidationError as exc:
        raise ValueError(str(exc)) from exc


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
        if not STEP_NAME.fullmatch(name):
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
