"""jetcut functions as real OS processes, for tests that kill, pause or restart a worker.

Fixture:
    workers: ``await workers.start("transcode", settings, name="w1", ack_wait_s="2")``
             starts ``jetcut run transcode`` with the test's settings (namespace, store) plus
             ``JETCUT_*`` overrides; its output goes to a log (``workers.log(name)``). Every
             process still alive at teardown gets SIGTERM (then SIGKILL) and is reaped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from loadtests.procs import Workers


@pytest.fixture
async def workers(tmp_path: Path) -> AsyncIterator[Workers]:
    group = Workers(tmp_path / "workers")
    try:
        yield group
    finally:
        await group.stop_all()
