"""Every deployable function, by name: what ``jetcut run <name>`` and ``jetcut dev`` serve.

Discovered by convention, so adding a function is adding a folder: every package under
``functions/`` whose module exports ``function`` is one.
"""

from __future__ import annotations

import importlib
import pkgutil

import functions
from shared.function import Function


def _discover() -> dict[str, Function]:
    found: dict[str, Function] = {}
    for info in sorted(pkgutil.iter_modules(functions.__path__), key=lambda i: i.name):
        if not info.ispkg:
            continue
        fn = getattr(importlib.import_module(f"functions.{info.name}"), "function", None)
        if isinstance(fn, Function):
            if fn.name in found:
                raise RuntimeError(f"two functions are named {fn.name!r}")
            found[fn.name] = fn
    return found


FUNCTIONS: dict[str, Function] = _discover()
