"""Is a TCP port free, and if not, which program holds it?

``jetcut dev`` checks its ports before it starts anything, so a port held by another
program (a stack left running, another service) ends in one line that names the port, the
holder when it can be known, and the setting that moves it, instead of a traceback from
deep inside nats-server or uvicorn.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's "st" column


class PortInUse(Exception):
    """A port jetcut must listen on is taken.

    Attributes:
        port: the port.
        holder: ``"pid 1234 (nats-server)"`` when /proc shows who listens, else None (another
            user's process, or a system without /proc).
        setting: the environment variable that moves it, e.g. ``JETCUT_NATS_PORT``.
    """

    def __init__(self, port: int, holder: str | None, setting: str, what: str) -> None:
        self.port, self.holder, self.setting, self.what = port, holder, setting, what
        by = f"by {holder}" if holder else "by another program"
        super().__init__(
            f"port {port} ({what}) is already in use {by}; stop it, or set {setting} to "
            f"another port (0 picks a free one)"
        )


def ensure_free(host: str, port: int, *, setting: str, what: str) -> None:
    """Raise :class:`PortInUse` unless ``host:port`` can be listened on now.

    ``SO_REUSEADDR`` as the real servers use it: a port with only closing (TIME_WAIT)
    connections counts as free, one with a listener does not. Port 0 is always free.
    """
    if port == 0:
        return
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            raise PortInUse(port, holder_of(port), setting, what) from None


def holder_of(port: int, proc: Path = Path("/proc")) -> str | None:
    """``"pid N (name)"`` of the process listening on TCP ``port``, when /proc tells.

    The listening socket's inode comes from /proc/net/tcp(6); the process is the one with
    a ``socket:[inode]`` among its open files (readable only for our own user's processes).
    """
    inodes = _listening_inodes(port, proc)
    if not inodes:
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in targets:
                        name = (entry / "comm").read_text().strip()
                        return f"pid {entry.name} ({name})"
    return None


def _listening_inodes(port: int, proc: Path) -> set[str]:
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _LISTEN:
                continue
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes
