"""jetcut functions as real OS processes (``jetcut run <function>``), as deployments run them.

Tests that kill, pause or restart a worker need it in its own process: the test process keeps
the conductor and whatever else must survive. Both sides share only NATS and the store.

Fixture:
    workers: ``await workers.start("transcode", settings, name="w1", ACK_WAIT_S="2")`` starts
             a worker with the test's settings (namespace, store) plus ``JETCUT_*``
             overrides; its output goes to ``<tmp_path>/<name>.log`` (``workers.log(name)``).
             Every worker still alive at teardown gets SIGTERM (then SIGKILL) and is reaped.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shared.settings import Settings

JETCUT = str(Path(sys.executable).parent / "jetcut")


def worker_env(settings: Settings, work_dir: Path, **overrides: str) -> dict[str, str]:
    """The environment of a worker process that joins the test's deployment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETCUT_")}
    env.update({
        "JETCUT_NATS_URL": settings.nats_url,
        "JETCUT_NAMESPACE": settings.namespace,
        "JETCUT_STORE": settings.store,
        "JETCUT_STORE_DIR": settings.store_root,
        "JETCUT_WORK_DIR": str(work_dir),
        "JETCUT_DATA_DIR": str(work_dir.parent / f"{work_dir.name}-data"),
        "JETCUT_FETCH_TIMEOUT_S": "0.5",
        "JETCUT_BACKOFF_BASE_S": str(settings.backoff_base_s),
        "JETCUT_BACKOFF_MAX_S": str(settings.backoff_max_s),
    })
    if settings.store == "s3":
        env.update({
            "JETCUT_S3_ENDPOINT": settings.s3_endpoint,
            "JETCUT_S3_ACCESS_KEY": settings.s3_access_key,
            "JETCUT_S3_SECRET_KEY": settings.s3_secret_key,
            "JETCUT_BUCKET": settings.bucket,
        })
    env.update({f"JETCUT_{k}": v for k, v in overrides.items()})
    return env


class Workers:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, asyncio.subprocess.Process] = {}

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def work_dir(self, name: str) -> Path:
        return self.root / f"{name}-work"

    async def start(self, function: str, settings: Settings, *, name: str,
                    **overrides: str) -> asyncio.subprocess.Process:
        work_dir = self.work_dir(name)
        work_dir.mkdir(parents=True, exist_ok=True)
        with (self.root / f"{name}.log").open("wb") as log:  # the child keeps its own fd
            proc = await asyncio.create_subprocess_exec(
                JETCUT, "run", function, env=worker_env(settings, work_dir, **overrides),
                stdout=log, stderr=asyncio.subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    async def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.returncode is not None:
                continue
            proc.send_signal(signal.SIGCONT)  # a paused worker cannot act on SIGTERM
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


@pytest.fixture
async def workers(tmp_path: Path) -> AsyncIterator[Workers]:
    group = Workers(tmp_path / "workers")
    group.root.mkdir()
    try:
        yield group
    finally:
        await group.stop_all()
