"""The job bodies a document shows (``curl ... -d '{...}'``), and what planning makes of them.

Docs splice upload ids in with shell variables (``'$CLIP'``); they become fake upload ids
here, since planning only counts inputs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec

from shared.errors import PermanentError
from shared.events import StepSpec
from shared.recipes import resolve


def doc_text(path: Path) -> str:
    """The document, with ``'$VAR'`` shell splices replaced by ``uvar``."""
    return re.sub(r"'\$([A-Z_]+)'", lambda m: "u" + m.group(1).lower(),
                  path.read_text(encoding="utf-8"))


def job_bodies(text: str) -> list[dict[str, Any]]:
    """Every ``-d '{...}'`` JSON body in ``text``."""
    return [msgspec.json.decode(b) for b in re.findall(r"-d '(\{[^']*\})'", text)]


def plan_error(body: dict[str, Any]) -> PermanentError | None:
    """Why the conductor would refuse to plan ``body`` (None: it plans)."""
    n_inputs = len(body.get("inputs", [])) + (1 if "input" in body else 0)
    steps = body.get("steps")
    try:
        resolve(body.get("recipe"),
                None if steps is None else msgspec.convert(steps, dict[str, StepSpec]),
                body.get("params", {}), n_inputs)
    except PermanentError as exc:
        return exc
    return None
