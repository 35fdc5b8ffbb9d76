"""Child processes that die with their parent, even when the parent is SIGKILLed.

A parent killed outright (SIGKILL, the OOM killer) runs no cleanup, so the only guarantee
that its nats-server and ffmpeg/ffprobe children go too must come from the kernel. On Linux,
:func:`die_with_parent` (run in the child between fork and exec, as ``preexec_fn``) asks for
``PR_SET_PDEATHSIG(SIGKILL)``: the child is killed the moment its parent goes.

Two caveats the callers respect:

* The signal fires when the *thread* that forked the child exits, not the process. jetcut
  spawns from the thread running its event loop (asyncio forks in the loop thread; the
  embedded nats-server is started by ``jetcut dev`` on the main thread), and that thread
  lives as long as the process.
* Other systems (macOS, the BSDs) have no such call: there children are stopped by the
  graceful shutdown and by the next start (the pid file of :mod:`shared.natsserver`), but
  not when the parent is killed outright. docs/operations.md says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

PR_SET_PDEATHSIG = 1


@functools.cache
def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    prctl: Callable[..., int] = libc.prctl
    return prctl


def die_with_parent_hook() -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child die (SIGKILL) when this process dies.

    Built in the parent, so the child does only plain syscalls between fork and exec: no
    library loading, no locks. A no-op on systems without ``PR_SET_PDEATHSIG``.
    """
    prctl = _prctl()
    parent = os.getpid()

    def hook() -> None:
        if prctl is None:
            return
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        # The parent may have died between fork and prctl: then nobody would send the
        # signal, so go now (the child was re-parented, its parent pid changed).
        if os.getppid() != parent:
            os._exit(1)

    return hook


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a zombie holds no port, file or dir).

    A pid we may not signal belongs to a live process of another user: it counts as alive,
    so a caller errs on the side of leaving that process's things alone.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not Path("/proc").is_dir()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
