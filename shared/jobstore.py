"""Job records in the JetStream KV bucket ``jobs``, changed only by compare-and-set.

``update`` re-reads and re-applies the change whenever another writer got there first, so a
change is a pure function of the latest record and concurrent writers never lose updates.
Every read and write rides out a leader election (``shared.retry.ride_out``): retrying a
write whose outcome is unknown is safe, since a repeat of one that landed fails its
compare-and-set and is re-applied like any lost race.
"""

from __future__ import annotations

import asyncio
import random
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import NamedTuple, TypeVar

import msgspec
from nats.js.errors import (
    APIError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoKeysError,
)
from nats.js.kv import KeyValue

from shared.errors import ErrorCode, JetcutError
from shared.jobstate import JobRecord
from shared.retry import ride_out

__all__ = ["JobNotFound", "JobStore", "NoChange", "Written"]

T = TypeVar("T")

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(JobRecord)
MAX_CAS_ATTEMPTS = 64
RECENT_RECORDS = 1024
"""Records a process keeps with their revision (a few KB each): the jobs it works on now."""


class JobNotFound(JetcutError):
    code = ErrorCode.NOT_FOUND
    non_retryable = True

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id!r}", details={"job_id": job_id})
        self.job_id = job_id


class NoChange(Exception):
    """Raised by a mutation to leave the record as it is (skips the write)."""


class Written(NamedTuple):
    """Where a compare-and-set write put a record: it was applied to revision ``base`` and
    stored as ``revision``."""

    base: int
    revision: int


class JobStore:
    """Job records by compare-and-set, with the latest records this process read or wrote.

    The recent records (a bounded LRU of encoded value and revision) let a writer that knows
    which revision is current skip the read before its write: see :meth:`recent`.
    """

    def __init__(self, kv: KeyValue, *, recent: int = RECENT_RECORDS) -> None:
        self.kv = kv
        self._recent: OrderedDict[str, tuple[bytes, int]] = OrderedDict()
        self._recent_max = recent

    def _remember(self, job_id: str, data: bytes, revision: int) -> None:
        known = self._recent.get(job_id)
        if known is not None and known[1] > revision:
            return  # a later revision is known already (concurrent tasks of one process)
        self._recent[job_id] = (data, revision)
        self._recent.move_to_end(job_id)
        if len(self._recent) > self._recent_max:
            self._recent.popitem(last=False)

    def recent(self, job_id: str, revision: int, *, base: int | None = None,
               replay: Callable[[JobRecord], object] | None = None,
               ) -> tuple[JobRecord, int] | None:
        """The record at ``revision`` without reading it, when this process knows it.

        Known when this process read or wrote that revision itself, or when it knows
        revision ``base`` and ``replay`` is the one transition another process applied to
        ``base`` to write ``revision`` (deterministic: it gets the writer's clock): a
        revision is one write of one key, so the content is exactly that. None otherwise.
        A caller writes the result with compare-and-set, so a record changed since is
        re-read then (``update``), never overwritten.
        """
        known = self._recent.get(job_id)
        if known is None:
            return None
        data, at = known
        if at == revision:
            return _decoder.decode(data), revision
        if at == base and replay is not None:
            record = _decoder.decode(data)
            if replay(record):
                return record, revision
        return None

    async def get(self, job_id: str) -> JobRecord:
        record, _ = await self.get_with_revision(job_id)
        return record

    async def get_with_revision(self, job_id: str) -> tuple[JobRecord, int]:
        try:
            entry = await ride_out(lambda: self.kv.get(job_id))
        except KeyNotFoundError as exc:
            raise JobNotFound(job_id) from exc
        if entry.value is None or entry.revision is None:
            raise JobNotFound(job_id)
        self._remember(job_id, entry.value, entry.revision)
        return _decoder.decode(entry.value), entry.revision

    async def create(self, record: JobRecord) -> int | None:
        """Store a new record; its revision, or None when the job already exists."""
        try:
            data = _encoder.encode(record)
            revision = int(await ride_out(lambda: self.kv.create(record.job_id, data)))
        except KeyWrongLastSequenceError:
            return None
        self._remember(record.job_id, data, revision)
        return revision

    async def apply(
        self, job_id: str, transition: Callable[[JobRecord], T | None],
        current: tuple[JobRecord, int] | None = None, *, fresh: bool = True,
    ) -> tuple[JobRecord, T | None]:
        """Apply one of ``shared.jobstate``'s named transitions to the latest record.

        A transition returns ``False`` or ``None`` to leave the record as it is (nothing is
        written and the result is ``None``); anything else is written back by
        compare-and-set and returned. Bind its arguments with ``functools.partial``.

        Raises:
            JobNotFound: no such job.
        """
        record, result, _ = await self.apply_written(job_id, transition, current, fresh=fresh)
        return record, result

    async def apply_written(
        self, job_id: str, transition: Callable[[JobRecord], T | None],
        current: tuple[JobRecord, int] | None = None, *, fresh: bool = True,
    ) -> tuple[JobRecord, T | None, Written | None]:
        """:meth:`apply`, also saying where the write put the record (None: no write)."""

        def mutate(record: JobRecord) -> T:
            result = transition(record)
            if result is None or result is False:
                raise NoChange
            return result

        return await self._update(job_id, mutate, current, fresh=fresh)

    async def update(
        self, job_id: str, mutate: Callable[[JobRecord], T],
        current: tuple[JobRecord, int] | None = None, *, fresh: bool = True,
    ) -> tuple[JobRecord, T | None]:
        """Apply ``mutate`` to the latest record and write it back with compare-and-set.

        ``mutate`` may raise ``NoChange`` to skip the write; the result is then ``None``.
        ``current`` is a (record, revision) the caller knows: the first try uses it instead
        of reading (if it is stale, the write loses and the loop re-reads). ``fresh=False``
        says it may be stale (from :meth:`recent`): a ``NoChange`` on it is then confirmed on
        a record read afresh. The record passed in is mutated in place.

        Raises:
            JobNotFound: no such job.
        """
        record, result, _ = await self._update(job_id, mutate, current, fresh=fresh)
        return record, result

    async def _update(
        self, job_id: str, mutate: Callable[[JobRecord], T],
        current: tuple[JobRecord, int] | None, *, fresh: bool,
    ) -> tuple[JobRecord, T | None, Written | None]:
        for attempt in range(MAX_CAS_ATTEMPTS):
            if current is not None:
                (record, revision), current = current, None
                read = fresh
            else:
                record, revision = await self.get_with_revision(job_id)
                read = True
            try:
                result = mutate(record)
            except NoChange:
                if not read:
                    continue  # decided on a record that may be stale: decide on the latest
                return record, None, None
            data = _encoder.encode(record)
            try:
                stored = await ride_out(partial(self.kv.update, job_id, data, last=revision))
            except KeyWrongLastSequenceError:
                # Lost the race: back off a little (jittered) and re-apply to the new revision.
                await asyncio.sleep(random.random() * 0.005 * (attempt + 1))
                continue
            self._remember(job_id, data, int(stored))
            return record, result, Written(base=revision, revision=int(stored))
        raise JetcutError(f"job {job_id}: too much contention on the job record")

    async def delete(self, job_id: str) -> None:
        self._recent.pop(job_id, None)
        await self.kv.delete(job_id)

    async def remove(self, job_id: str, revision: int) -> bool:
        """Delete a record for good, history included, if it is still at ``revision``.

        Retention uses it: a record that changed since the caller read it (a job retried
        meanwhile) is kept, and False tells the caller to re-read and decide again.
        """
        try:
            self._recent.pop(job_id, None)
            await self.kv.delete(job_id, last=revision)
        except APIError as exc:
            if exc.err_code in (10071, 10164):  # wrong last sequence: changed since read
                return False
            raise
        await self.kv.purge(job_id)
        return True

    async def watch(self, job_id: str) -> AsyncIterator[JobRecord]:
        """Yield the record now and after every change (for waiters and live views)."""
        watcher = await self.kv.watch(job_id)
        try:
            async for entry in watcher:
                if entry is None or entry.value is None:
                    continue
                yield _decoder.decode(entry.value)
        finally:
            await watcher.stop()

    async def job_ids(self) -> list[str]:
        try:
            return list(await self.kv.keys())
        except NoKeysError:
            return []

