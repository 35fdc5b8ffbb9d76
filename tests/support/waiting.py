"""Waiting for a condition with a deadline: the one way tests synchronise with processes.

A test never sleeps for a fixed time and hopes; it names the condition it waits for, polls
it, and fails with that name when the deadline passes.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

POLL_S = 0.05


async def eventually(check: Callable[[], bool | Awaitable[bool]], *, timeout: float = 10.0,
                     what: str = "condition") -> None:
    """Return once ``check()`` (sync or async) is true; AssertionError after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(POLL_S)
