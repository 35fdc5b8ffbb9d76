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
