"""CPU seconds that processes (and their descendants) spent, read from ``/proc``.

The bus benchmark puts CPU per job beside every throughput figure: a system can buy jobs/s
with cores, and on the machines jetcut targets the core-seconds are the bill. Linux only;
elsewhere every reading is None and the report says so.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PROC = Path("/proc")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user+system seconds) of ``pid``; None once it is gone."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after its end.
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICKS


def tree(root: int) -> list[int]:
    """``root`` and every live descendant (a prefork worker's pool children)."""
    if not PROC.is_dir():
        return []
    parents: dict[int, int] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                parents[int(entry.name)] = stat[0]
    found, frontier = [root], [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid]
        found += children
        frontier += children
    return found


def seconds(pids: Iterable[int | None]) -> float | None:
    """CPU seconds the live processes ``pids`` spent so far (None: not measurable here)."""
    if not PROC.is_dir():
        return None
    total = 0.0
    for pid in pids:
        if pid is None:
            continue
        stat = _stat(pid)
        if stat is not None:
            total += stat[1]
    return total


class Meter:
    """CPU seconds of a set of processes between :meth:`start` and :meth:`stop`.

    ``trees`` names root pids whose descendants count too (looked up at each reading, so
    pool children that come and go between readings are missed: read often enough).
    """

    def __init__(self, pids: Iterable[int | None] = (), trees: Iterable[int] = ()) -> None:
        self.pids = [p for p in pids if p is not None]
        self.trees = list(trees)
        self.begin: float | None = None

    def _now(self) -> float | None:
        pids = list(self.pids)
        for root in self.trees:
            pids += tree(root)
        return seconds(pids)

    def start(self) -> None:
        self.begin = self._now()

    def stop(self) -> float | None:
        end = self._now()
        if end is None or self.begin is None:
            return None
        return end - self.begin
