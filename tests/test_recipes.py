"""Recipe planning and DAG validation: every mistake names the step and field."""

from __future__ import annotations

import pytest

from shared.errors import PermanentError
from shared.events import StepSpec
from shared.recipes import resolve


def test_web_recipe_plans_probe_then_transcode_and_poster() -> None:
    steps = resolve("web", None, {"max_height": 480}, 1)
    assert steps["probe"].uses == [":input"]
    assert steps["transcode"].params["max_height"] == 480
    assert steps["poster"].stage == "thumbnail"


@pytest.mark.parametrize(("recipe", "steps", "params", "n_inputs", "fragment", "details"), [
    ("nope", None, {}, 1, "unknown recipe 'nope'", {"field": "recipe"}),
    ("web", None, {"bogus": 1}, 1, "unknown field `bogus`", {"field": "params"}),
    (None, None, {}, 1, "exactly one", {}),
    ("web", {"a": StepSpec(stage="probe")}, {}, 1, "exactly one", {}),
    (None, {}, {}, 1, "at least one step", {"field": "steps"}),
    (None, {"a": StepSpec(stage="paint")}, {}, 1, "unknown stage 'paint'",
     {"step": "a", "field": "stage"}),
    (None, {"a": StepSpec(stage="probe", uses=["ghost"])}, {}, 1, "unknown step 'ghost'",
     {"step": "a", "field": "uses"}),
    (None, {"a": StepSpec(stage="probe", uses=[":input/1"])}, {}, 1, "has 1 input",
     {"step": "a", "field": "uses"}),
    (None, {"a": StepSpec(stage="probe", uses=[":input/x"])}, {}, 1, "bad input reference",
     {"step": "a", "field": "uses"}),
    (None, {"a": StepSpec(stage="transcode", params={"crf": 99})}, {}, 1, "crf",
     {"step": "a", "field": "params"}),
    (None, {"a": StepSpec(stage="transcode", params={"colour": "red"})}, {}, 1, "colour",
     {"step": "a", "field": "params"}),
    (None, {"a b": StepSpec(stage="probe")}, {}, 1, "step name", {"step": "a b"}),
    (None, {"a": StepSpec(stage="noop"), "b": StepSpec(stage="noop", each="a")}, {}, 1,
     "must also list in 'uses'", {"step": "b", "field": "each"}),
    (None, {"b": StepSpec(stage="noop", uses=[":input"], each=":input")}, {}, 1,
     "must name a step", {"step": "b", "field": "each"}),
    (None, {"a": StepSpec(stage="noop", uses=["b"]), "b": StepSpec(stage="noop", uses=["a"])},
     {}, 1, "cycle", {"field": "uses"}),
])
def test_invalid_pipelines_are_refused_with_a_precise_message(  # type: ignore[no-untyped-def]
    recipe, steps, params, n_inputs, fragment, details
) -> None:
    with pytest.raises(PermanentError) as caught:
        resolve(recipe, steps, params, n_inputs)
    assert caught.value.code == "invalid_recipe"
    assert fragment in caught.value.message
    for key, value in details.items():
        assert caught.value.details[key] == value


def test_inline_dag_with_fan_in_is_accepted() -> None:
    steps = {
        "a": StepSpec(stage="noop", uses=[":input"]),
        "b": StepSpec(stage="noop", uses=[":input"]),
        "c": StepSpec(stage="noop", uses=["a", "b", ":input/1"]),
    }
    assert resolve(None, steps, {}, 2) == steps
