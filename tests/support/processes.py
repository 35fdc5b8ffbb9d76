"""jetcut functions as real OS processes, for tests that kill, pause or restart a worker.

Fixture:
    workers: ``await workers.start("transcode", settings, name="w1", ack_wait_s="2")``
             starts ``jetcut run transcode`` with the test's settings (namespace, store) plus
             ``JETCUT_*`` overrides; its output goes to a log (``workers.log(name)``). Every
             process still alive at teardown gets SIGTERM (then SIGKILL) and is reaped.

Helper:
    stack_processes(root, parent=pid): the live processes of one stack, read from the
             process table (descendants of ``pid`` and anything naming ``root``), for tests
             that prove nothing outlives a stopped or killed stack.
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


def stack_processes(root: Path, *, parent: int | None = None) -> dict[int, str]:
    """Live processes of one stack, from the process table: every descendant of ``parent``
    and every process whose command line names ``root`` (the stack's data or work dir).

    Returns ``{pid: command line}``; zombies are left out (they hold no port, file or CPU).
    """
    table: dict[int, tuple[int, str, str]] = {}  # pid -> (ppid, state, cmdline)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        table[int(entry.name)] = (int(ppid), state, cmdline.strip())
    found = {pid for pid, (_, _, cmd) in table.items() if str(root) in cmd}
    if parent is not None:
        frontier = {parent}
        while frontier:
            children = {pid for pid, (ppid, _, _) in table.items() if ppid in frontier}
            frontier = children - found
            found |= children
    return {pid: table[pid][2] for pid in found if table[pid][1] != "Z"}
