"""Job records change only by compare-and-set: concurrent writers never lose an update."""

from __future__ import annotations

import asyncio

import pytest

from shared.jobstate import JobRecord
from shared.jobstore import JobNotFound, NoChange
from tests.support.nats import running

pytestmark = pytest.mark.timeout(60)


async def test_concurrent_updates_are_all_applied(make_settings):  # type: ignore[no-untyped-def]
    async with running(make_settings(), []) as rt:
        jobs = rt.services.jobs
        assert await jobs.create(JobRecord(job_id="jcas", tenant="default", params={"n": 0}))
        assert not await jobs.create(JobRecord(job_id="jcas", tenant="default"))  # idempotent

        def bump(record: JobRecord) -> int:
            record.params["n"] += 1
            return int(record.params["n"])

        results = await asyncio.gather(*(jobs.update("jcas", bump) for _ in range(25)))
        assert sorted(r for _, r in results) == list(range(1, 26))  # each saw a distinct value
        assert (await jobs.get("jcas")).params["n"] == 25

        def refuse(record: JobRecord) -> None:
            raise NoChange

        record, result = await jobs.update("jcas", refuse)
        assert result is None and record.params["n"] == 25
        with pytest.raises(JobNotFound):
            await jobs.get("jmissing")


async def test_publish_repeats_with_one_message_id_are_stored_once(make_settings):  # type: ignore[no-untyped-def]
    from shared.events import JobCancel

    async with running(make_settings(), []) as rt:
        bus, names = rt.services.bus, rt.names
        first = await bus.publish(names.cancel, JobCancel(job_id="j1"), msg_id="j1:cancel")
        again = await bus.publish(names.cancel, JobCancel(job_id="j1"), msg_id="j1:cancel")
        assert again.duplicate and again.seq == first.seq
