"""The user documentation names every setting and every error code, so it cannot fall behind.

A new ``Settings`` field or ``ErrorCode`` member fails here until docs/configuration.md or
docs/api.md describes it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared.errors import ErrorCode
from shared.settings import Settings, env_name
from tests.support.docjobs import doc_text, job_bodies, plan_error

DOCS = Path(__file__).resolve().parents[1] / "docs"


def words(path: Path) -> set[str]:
    """Every identifier-like token in a document (so ``JETCUT_STORE`` is not found inside
    ``JETCUT_STORE_DIR``, nor ``timeout`` inside ``timeout_s``)."""
    return set(re.findall(r"[A-Za-z0-9_]+", path.read_text(encoding="utf-8")))


@pytest.mark.parametrize("field", Settings.__struct_fields__)
def test_every_setting_is_documented(field: str) -> None:
    assert env_name(field) in words(DOCS / "configuration.md"), (
        f"docs/configuration.md does not mention {env_name(field)}"
    )


@pytest.mark.parametrize("code", [c.value for c in ErrorCode])
def test_every_error_code_is_documented(code: str) -> None:
    assert code in words(DOCS / "api.md"), f"docs/api.md does not mention error code {code!r}"


RECIPE_DOCS = sorted([DOCS / "recipes.md", *(DOCS / "recipes").glob("*.md")])


@pytest.mark.parametrize("doc", RECIPE_DOCS, ids=lambda p: p.name)
def test_recipe_doc_examples_are_valid_jobs(doc: Path) -> None:
    """Every ``-d '{...}'`` job body in a recipe doc plans, or is refused with a message the
    doc itself shows: examples cannot rot as params and validation change."""
    text = doc_text(doc)
    jobs = [b for b in job_bodies(text) if "recipe" in b or "steps" in b]
    assert jobs, f"{doc.name} shows no job example"
    for body in jobs:
        error = plan_error(body)
        if error is not None:
            assert error.message in text, f"{doc.name}: {error.message}"
