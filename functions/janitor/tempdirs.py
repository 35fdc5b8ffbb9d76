"""Orphaned step temp dirs: ``jetcut-<pid>-<random>`` whose process is gone.

``FFmpegRunner.workdir`` removes its dir on exit, error and cancellation, so only a process
that died outright (SIGKILL, OOM, a power cut) leaves one behind, often gigabytes of
segments. The owner's pid is in the name; a dir is removed when that pid no longer runs
*and* the dir is older than ``orphan_after_s`` (the age guards against a recycled pid and a
dir made a moment ago).

Pids mean something on one host only, so temp dirs are per host: each host's janitor (or
``jetcut dev``) sweeps its own ``JETCUT_WORK_DIR``, and a work dir must never be shared
between hosts or containers. In containers the work dir usually dies with the container
(an emptyDir, the container's /tmp), and this sweep has nothing to do there.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from shared.children import pid_alive

TEMP_DIR_NAME = re.compile(r"^jetcut-(\d+)-")
"""How ``shared.media.runner`` names step dirs; names without a pid are never touched."""


def owner_pid(name: str) -> int | None:
    """The pid in a step dir's name, or None for anything else in the work dir."""
    match = TEMP_DIR_NAME.match(name)
    if match is None:
        return None
    pid = int(match.group(1))
    return pid if pid > 0 else None


def remove_orphan_dirs(
    work_dir: str | os.PathLike[str], *, now: float, older_than: float,
    alive: Callable[[int], bool] = pid_alive,
) -> list[Path]:
    """Remove the step dirs under ``work_dir`` whose process is gone; blocking (a thread).

    Returns:
        The dirs removed.
    """
    try:
        entries = list(os.scandir(work_dir))
    except FileNotFoundError:
        return []
    removed: list[Path] = []
    for entry in entries:
        pid = owner_pid(entry.name)
        if pid is None or not entry.is_dir(follow_symlinks=False) or alive(pid):
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue
        if age <= older_than:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        if not os.path.lexists(entry.path):
            removed.append(Path(entry.path))
    return removed
