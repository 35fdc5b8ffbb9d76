"""jetcut functions as real OS processes (``jetcut run <function>``), as deployments run them.

Used by fault tests (kill, pause, restart a worker) and by the chaos run: the controlling
process keeps what must survive, and the processes share only NATS and the store.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import msgspec

from shared.settings import Settings, env_name

JETCUT = str(Path(sys.executable).parent / "jetcut")


PER_PROCESS = ("work_dir", "data_dir")
"""Settings each process gets for itself rather than from the deployment's settings."""


def worker_env(settings: Settings, work_dir: Path, **overrides: str) -> dict[str, str]:
    """The environment of a process that joins ``settings``' deployment: every setting that
    differs from its default (namespace, NATS, store, timings...), its own work dir, and
    ``JETCUT_<KEY>=value`` overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETCUT_")}
    defaults = Settings()
    for name in Settings.__struct_fields__:
        value = getattr(settings, name)
        if name in PER_PROCESS or value == getattr(defaults, name) or value is None:
            continue
        env[env_name(name)] = _env_value(value)
    if settings.store == "local":
        env[env_name("store_dir")] = os.path.abspath(settings.store_root)
    env[env_name("work_dir")] = str(work_dir)
    env[env_name("data_dir")] = str(work_dir.parent / f"{work_dir.name}-data")
    env.update({env_name(k): v for k, v in overrides.items()})
    return env


def _env_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return msgspec.json.encode(value).decode()
    return str(value)


class Workers:
    """A group of ``jetcut run`` processes, each logging to ``<root>/<name>.log``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        root.mkdir(parents=True, exist_ok=True)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def work_dir(self, name: str) -> Path:
        return self.root / f"{name}-work"

    async def start(self, function: str, settings: Settings, *, name: str,
                    **overrides: str) -> asyncio.subprocess.Process:
        work_dir = Path(overrides.pop("work_dir", self.work_dir(name)))
        work_dir.mkdir(parents=True, exist_ok=True)
        with (self.root / f"{name}.log").open("ab") as log:  # the child keeps its own fd
            proc = await asyncio.create_subprocess_exec(
                JETCUT, "run", function, env=worker_env(settings, work_dir, **overrides),
                stdout=log, stderr=asyncio.subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    async def kill(self, name: str) -> None:
        """SIGKILL: no drain, no cleanup, as the OOM killer or a lost node does it."""
        proc = self.procs[name]
        if proc.returncode is None:
            proc.kill()
        await proc.wait()

    async def stop_all(self, grace_s: float = 30.0) -> None:
        """SIGTERM every live process (resuming paused ones first), SIGKILL stragglers."""
        live = [p for p in self.procs.values() if p.returncode is None]
        for proc in live:
            proc.send_signal(signal.SIGCONT)  # a paused process cannot act on SIGTERM
            proc.send_signal(signal.SIGTERM)
        for proc in live:
            try:
                await asyncio.wait_for(proc.wait(), grace_s)
            except TimeoutError:
                proc.kill()
                await proc.wait()
