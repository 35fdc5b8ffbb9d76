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
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import TypeVar

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

__all__ = ["JobNotFound", "JobStore", "NoChange"]

T = TypeVar("T")

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(JobRecord)
MAX_CAS_ATTEMPTS = 64


class JobNotFound(JetcutError):
    code = ErrorCode.NOT_FOUND
    non_retryable = True

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id!r}", details={"job_id": job_id})
        self.job_id = job_id


class NoChange(Exception):
    """Raised by a mutation to leave the record as it is (skips the write)."""


class JobStore:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

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
        return _decoder.decode(entry.value), entry.revision

    async def create(self, record: JobRecord) -> int | None:
        """Store a new record; its revision, or None when the job already exists."""
        try:
            data = _encoder.encode(record)
            return int(await ride_out(lambda: self.kv.create(record.job_id, data)))
        except KeyWrongLastSequenceError:
            return None

    async def apply(
        self, job_id: str, transition: Callable[[JobRecord], T | None],
        current: tuple[JobRecord, int] | None = None,
    ) -> tuple[JobRecord, T | None]:
        """Apply one of ``shared.jobstate``'s named transitions to the latest record.

        A transition returns ``False`` or ``None`` to leave the record as it is (nothing is
        written and the result is ``None``); anything else is written back by
        compare-and-set and returned. Bind its arguments with ``functools.partial``.

        Raises:
            JobNotFound: no such job.
        """

        def mutate(record: JobRecord) -> T:
            result = transition(record)
            if result is None or result is False:
                raise NoChange
            return result

        return await self.update(job_id, mutate, current)

    async def update(
        self, job_id: str, mutate: Callable[[JobRecord], T],
        current: tuple[JobRecord, int] | None = None,
    ) -> tuple[JobRecord, T | None]:
        """Apply ``mutate`` to the latest record and write it back with compare-and-set.

        ``mutate`` may raise ``NoChange`` to skip the write; the result is then ``None``.
        ``current`` is a (record, revision) the caller just read: the first try uses it
        instead of reading again (if it is stale, the write loses and the loop re-reads).
        The record passed in is mutated in place.

        Raises:
            JobNotFound: no such job.
        """
        for attempt in range(MAX_CAS_ATTEMPTS):
            if current is not None:
                (record, revision), current = current, None
            else:
                record, revision = await self.get_with_revision(job_id)
            try:
                result = mutate(record)
            except NoChange:
                return record, None
            try:
                await ride_out(
                    partial(self.kv.update, job_id, _encoder.encode(record), last=revision)
                )
            except KeyWrongLastSequenceError:
                # Lost the race: back off a little (jittered) and re-apply to the new revision.
                await asyncio.sleep(random.random() * 0.005 * (attempt + 1))
                continue
            return record, result
        raise JetcutError(f"job {job_id}: too much contention on the job record")

    async def delete(self, job_id: str) -> None:
        await self.kv.delete(job_id)

    async def remove(self, job_id: str, revision: int) -> bool:
        """Delete a record for good, history included, if it is still at ``revision``.

        Retention uses it: a record that changed since the caller read it (a job retried
        meanwhile) is kept, and False tells the caller to re-read and decide again.
        """
        try:
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

