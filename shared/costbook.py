"""The cost model's coefficients in KV (bucket ``costs``): read with a cache, updated by CAS.

One key per (stage, parameter class), ``<stage>.<class>``, holding a ``CostEntry``
(``shared.costmodel``). ``calibrate`` is the only writer (``observe``); the conductor (step
deadlines), the gateway (ETA, admission) and the benchmarks read (``predict``). A reader keeps
each entry for ``cost_cache_s``, so the conductor's hot path pays one KV read per (stage,
class) per cache period, not one per task.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial

import msgspec
from nats.js import JetStreamContext, api
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from shared.costmodel import (
    CostEntry,
    Work,
    job_probe,
    observe,
    pooled,
    predict,
    remaining_compute_s,
    remaining_s,
    step_work,
    work_of,
)
from shared.errors import JetcutError
from shared.jobstate import ACTIVE_JOB, JobRecord
from shared.recipes import resolve
from shared.retry import ride_out
from shared.settings import Settings
from shared.subjects import Names

__all__ = ["CostBook", "job_backlog", "job_eta", "task_prediction"]

log = logging.getLogger(__name__)
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(CostEntry)
MAX_CAS_ATTEMPTS = 32


class CostBook:
    """Cached reads and compare-and-set writes of the ``costs`` bucket.

    The bucket is opened (created the first time) on first use, so a process that never
    predicts (a stage worker) never touches it, nor needs permission to.
    """

    def __init__(self, open_kv: Callable[[], Awaitable[KeyValue]], *, cache_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._open_kv = open_kv
        self._kv: KeyValue | None = None
        self.cache_s = cache_s
        self._clock = clock
        self._cache: dict[str, tuple[float, CostEntry | None]] = {}

    @classmethod
    def lazy(cls, js: JetStreamContext, names: Names, settings: Settings) -> CostBook:
        """A book whose bucket is opened, or created like the jobs bucket, on first use."""

        async def open_kv() -> KeyValue:
            try:
                return await js.key_value(names.costs_bucket)
            except BucketNotFoundError:
                return await js.create_key_value(api.KeyValueConfig(
                    bucket=names.costs_bucket, history=1, storage=api.StorageType.FILE,
                    replicas=settings.replicas, description="jetcut cost-model coefficients",
                ))

        return cls(open_kv, cache_s=settings.cost_cache_s)

    async def kv(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self._open_kv()
        return self._kv

    def fresh(self) -> CostBook:
        """The same bucket without a cache (tests, reports: what KV holds now)."""
        return CostBook(self.kv, cache_s=0, clock=self._clock)

    async def _read(self, key: str) -> tuple[CostEntry | None, int | None]:
        kv = await self.kv()
        try:
            got = await ride_out(lambda: kv.get(key))
        except KeyNotFoundError:
            return None, None
        if got.value is None:
            return None, None
        return _decoder.decode(got.value), got.revision

    async def entry(self, key: str) -> CostEntry | None:
        """The entry for ``key``, at most ``cache_s`` old (None: nothing measured yet)."""
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None and now - cached[0] < self.cache_s:
            return cached[1]
        try:
            entry, _ = await self._read(key)
        except Exception as exc:
            # A prediction must never hold a job up: without the bucket (down, or not
            # permitted) the stage's prior stands in until the next period.
            log.warning("cost entry %s unreadable (%r); predicting from the prior", key, exc)
            entry = cached[1] if cached is not None else None
        self._cache[key] = (now, entry)
        return entry

    async def predict(self, work: Work) -> float:
        """Predicted compute-seconds of ``work`` from the (cached) calibrated entries."""
        return predict(work, await self.entry(work.key), await self.entry(pooled(work).key))

    async def observe(self, work: Work, seconds: float, sample_id: str = "") -> CostEntry:
        """Add one measured step to its class's entry and to its stage's pooled entry
        (each by compare-and-set); a ``sample_id`` an entry has already counted changes
        nothing there. Returns the class's entry."""
        pool, _ = await self._read(pooled(work).key)
        updated = await self._observe(work, seconds, sample_id, pool)
        await self._observe(pooled(work), seconds, sample_id, None)
        return updated

    async def _observe(self, work: Work, seconds: float, sample_id: str,
                       pool: CostEntry | None) -> CostEntry:
        for _ in range(MAX_CAS_ATTEMPTS):
            entry, revision = await self._read(work.key)
            updated = observe(entry, work, seconds, sample_id, pool)
            if entry is not None and updated is entry:
                return entry
            data = _encoder.encode(updated)
            kv = await self.kv()
            try:
                if revision is None:
                    await kv.create(work.key, data)
                else:
                    await kv.update(work.key, data, last=revision)
            except KeyWrongLastSequenceError:
                continue
            self._cache[work.key] = (self._clock(), updated)
            return updated
        raise RuntimeError(f"cost entry {work.key!r}: too many concurrent writers")

    async def entries(self) -> dict[str, CostEntry]:
        """Every entry now (uncached): for reports and the benchmark."""
        try:
            keys = await (await self.kv()).keys()
        except Exception as exc:  # nats-py raises NoKeysError for an empty bucket
            if type(exc).__name__ != "NoKeysError":
                raise
            return {}
        found = {}
        for key in keys:
            entry, _ = await self._read(key)
            if entry is not None:
                found[key] = entry
        return found


async def task_prediction(book: CostBook | None, record: JobRecord, step: str,
                          part: int | None) -> float:
    """Predicted compute-seconds of one task of ``record`` (priors when ``book`` is None)."""
    work = step_work(record, step, part, job_probe(record))
    return await book.predict(work) if book is not None else predict(work, None)


async def job_eta(book: CostBook | None, record: JobRecord, now: float) -> float | None:
    """Predicted seconds until ``record`` finishes (None once it has: no ETA to give)."""
    if record.status not in ACTIVE_JOB:
        return None
    return remaining_s(record, partial(_predicted, await _step_entries(book, record)), now)


async def job_backlog(book: CostBook | None, record: JobRecord, now: float) -> float:
    """Predicted compute-seconds ``record`` still needs (0 once it has finished)."""
    if record.status not in ACTIVE_JOB:
        return 0.0
    if not record.steps:  # not planned yet (the conductor has not read its submit)
        try:
            specs = resolve(record.recipe, record.pipeline, record.params, len(record.inputs))
        except JetcutError:
            return 0.0  # it will fail at once
        total = 0.0
        sizes = [i.size for i in record.inputs]
        input_mb = sum(s or 0 for s in sizes) / 1e6 if None not in sizes else None
        for spec in specs.values():
            work = work_of(spec.stage, spec.params, None, None, input_mb)
            total += await book.predict(work) if book is not None else predict(work, None)
        return round(total, 1)
    return remaining_compute_s(record, partial(_predicted, await _step_entries(book, record)),
                               now)


async def _step_entries(book: CostBook | None,
                        record: JobRecord) -> dict[str, CostEntry | None]:
    """The cost entries (each class's and its stage's pooled one) of every step and part of
    ``record``, each read once."""
    entries: dict[str, CostEntry | None] = {}
    info = job_probe(record)
    for name, step in record.steps.items():
        for part in ([None] if not step.parts else range(len(step.parts))):
            work = step_work(record, name, part, info)
            for key in (work.key, pooled(work).key):
                if key not in entries:
                    entries[key] = await book.entry(key) if book is not None else None
    return entries


def _predicted(entries: dict[str, CostEntry | None], work: Work) -> float:
    return predict(work, entries.get(work.key), entries.get(pooled(work).key))
