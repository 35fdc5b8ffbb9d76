"""When a worker may take new work: machine headroom, and a circuit breaker on the store.

Both answer the same question before every fetch, "should this process take a task now?",
and both answer "not yet" by *waiting*, never by failing a job: a task that is not fetched
stays in the stream, where a worker with room (or a working store) takes it.

* ``Headroom``: enough available memory (the host's ``MemAvailable``, or the cgroup's limit
  minus its usage when that is tighter) and enough free disk under the work dir.
* ``StoreBreaker``: after ``store_breaker_failures`` consecutive handler failures caused by
  the object store, stop fetching and probe the store every ``store_probe_interval_s``
  until it answers; then close. Without it, an outage burns every queued task's retries
  within minutes and dead-letters them all.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from pathlib import Path

from prometheus_client import Gauge

from shared.settings import Settings
from shared.store import ObjectStore

log = logging.getLogger(__name__)
MB = 1024 * 1024
CGROUP = Path("/sys/fs/cgroup")


def available_memory_bytes(meminfo: Path = Path("/proc/meminfo"),
                           cgroup: Path = CGROUP) -> int | None:
    """Memory a new task could use: the smaller of the host's and the cgroup's headroom.

    None where neither can be read (not Linux): the check is then skipped.
    """
    candidates: list[int] = []
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
                break
    except OSError:
        pass
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text().strip())
            candidates.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return min(candidates) if candidates else None


class Headroom:
    """Is there room on this machine for one more task?"""

    def __init__(self, settings: Settings) -> None:
        self.min_memory = settings.min_free_memory_mb * MB
        self.min_disk = settings.min_free_disk_mb * MB
        self.work_dir = settings.work_dir or tempfile.gettempdir()

    def shortage(self) -> str | None:
        """Why not (``"memory"`` or ``"disk"``, with figures), or None when there is room."""
        if self.min_memory:
            available = available_memory_bytes()
            if available is not None and available < self.min_memory:
                return (f"memory: {available // MB} MB available, "
                        f"{self.min_memory // MB} MB required")
        if self.min_disk:
            try:
                free = shutil.disk_usage(self.work_dir).free
            except OSError:
                free = None
            if free is not None and free < self.min_disk:
                return (f"disk: {free // MB} MB free under {self.work_dir}, "
                        f"{self.min_disk // MB} MB required")
        return None


class StoreBreaker:
    """Counts consecutive store failures; when open, probes until the store is back."""

    def __init__(self, store: ObjectStore, *, failures: int, probe_interval_s: float,
                 gauge: Gauge | None = None) -> None:
        self.store = store
        self.gauge = gauge
        self.threshold = failures
        self.probe_interval_s = probe_interval_s
        self.consecutive = 0
        self.opened_at: float | None = None
        self.failed_probes = 0
        self._probe_lock = asyncio.Lock()

    @property
    def open(self) -> bool:
        return self.opened_at is not None

    def record_failure(self) -> None:
        self.consecutive += 1
        if self.consecutive >= self.threshold and self.opened_at is None:
            self.opened_at = time.monotonic()
            if self.gauge is not None:
                self.gauge.set(1)
            log.warning("object store failed %d times in a row: circuit open, no new work "
                        "is fetched until it answers again", self.consecutive)

    def record_success(self) -> None:
        self.consecutive = 0

    async def probe(self) -> bool:
        """Try the store once (one prober at a time); close the circuit if it answered."""
        async with self._probe_lock:
            if not self.open:
                return True
            try:
                await self.store.check()
            except Exception as exc:
                self.failed_probes += 1
                log.info("object store still unavailable: %r", exc)
                return False
            assert self.opened_at is not None
            log.warning("object store answers again after %.1fs: circuit closed",
                        time.monotonic() - self.opened_at)
            self.opened_at = None
            self.consecutive = 0
            if self.gauge is not None:
                self.gauge.set(0)
            return True
