"""``GET /v1/recipes``: the recipes a job may name, with what each makes and how many inputs.

Read from ``shared.recipes`` at request time, so a recipe added there is listed here with
no change to the gateway. The dashboard fills its recipe picker from it; a program can use
it to check a recipe name before it submits.
"""

from __future__ import annotations

import inspect
from typing import Any

import msgspec
from litestar import Controller, Request, get

from functions.gateway.views import tenant_of
from shared.jobstate import input_ref_index
from shared.recipes import RECIPES


class RecipeView(msgspec.Struct):
    name: str
    summary: str
    """The first paragraph of the recipe's description, on one line."""
    doc: str
    """What the recipe makes, and the params it takes (docs/recipes.md has them all)."""
    inputs: int | None
    """Inputs a job needs with default params (``null``: the params decide, e.g. montage's
    ``clips``)."""
    steps: list[str]
    """Its steps with default params (empty when the recipe needs params to plan)."""


class RecipeList(msgspec.Struct):
    recipes: list[RecipeView]
    """Sorted by name."""


def _default_plan(name: str) -> tuple[int | None, list[str]]:
    """Inputs named and step names when planned with no params; (None, []) if it needs some."""
    try:
        steps = RECIPES[name]({})
    except (msgspec.ValidationError, ValueError, TypeError):
        return None, []
    indexes = [i for spec in steps.values() for ref in spec.uses
               if (i := input_ref_index(ref)) is not None]
    return (max(indexes) + 1 if indexes else 1), list(steps)


def recipe_views() -> list[RecipeView]:
    views = []
    for name in sorted(RECIPES):
        # Docstrings quote code reST-style (double backticks); JSON readers expect Markdown's one.
        doc = inspect.cleandoc(RECIPES[name].__doc__ or "").replace("``", "`")
        inputs, steps = _default_plan(name)
        summary = " ".join(doc.split("\n\n", 1)[0].split())
        views.append(RecipeView(name=name, summary=summary, doc=doc,
                                inputs=inputs, steps=steps))
    return views


class RecipeController(Controller):
    path = "/recipes"
    tags = ["recipes"]

    @get("/")
    async def list_recipes(self, request: Request[Any, Any, Any]) -> RecipeList:
        """Every recipe, with its description, the inputs it needs and its steps."""
        tenant_of(request)  # the same key as every other call: no anonymous probing
        return RecipeList(recipes=recipe_views())
