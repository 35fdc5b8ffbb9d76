"""Job records change only by compare-and-set: concurrent writers never lose an update."""

from __future__ import annotations

import asyncio
from typing import Any

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


async def test_a_replayed_lease_write_is_the_stored_record(make_settings: Any) -> None:
    """What the conductor does with a worker's ``taken`` hint: two stores on one bucket
    stand for two processes. The worker's store takes the lease; the conductor's store,
    knowing only the revision it wrote, replays that write and gets the stored record byte
    for byte, and writes on it by compare-and-set without reading."""
    from functools import partial

    from shared.jobstate import StepState, StepStatus, mark_running
    from shared.jobstore import JobStore, _encoder

    async with running(make_settings(), []) as rt:
        assert rt.services is not None
        conductor = rt.services.jobs
        worker = JobStore(conductor.kv)
        record = JobRecord(job_id="jtaken", tenant="default",
                           steps={"a": StepState(stage="noop", status=StepStatus.READY,
                                                   attempt=1)})
        base = await conductor.create(record)
        assert base is not None
        at = 1_700_000_000.123456
        take = partial(mark_running, step="a", attempt=1, delivery=1)
        _, took, written = await worker.apply_written("jtaken", partial(take, now=at))
        assert took and written is not None and written.base == base

        known = conductor.recent("jtaken", written.revision, base=written.base,
                                 replay=partial(take, now=at))
        assert known is not None
        stored, revision = await worker.get_with_revision("jtaken")
        assert known[1] == revision == written.revision
        assert _encoder.encode(known[0]) == _encoder.encode(stored)
        # Without the hint's base, or with another revision, nothing is claimed.
        assert conductor.recent("jtaken", written.revision) is None
        assert conductor.recent("jtaken", written.revision, base=base + 1,
                                replay=partial(take, now=at)) is None

        def finish(r: JobRecord) -> bool:
            r.steps["a"].status = StepStatus.DONE
            return True

        await conductor.apply("jtaken", finish, known, fresh=False)
        assert (await worker.get("jtaken")).steps["a"].status == StepStatus.DONE


async def test_a_stale_known_record_is_reread_not_overwritten(make_settings: Any) -> None:
    """A record known from an older revision loses its compare-and-set and is re-read,
    and a "no change" decided on it is confirmed on the latest record."""
    from shared.jobstore import JobStore

    async with running(make_settings(), []) as rt:
        assert rt.services is not None
        mine = rt.services.jobs
        other = JobStore(mine.kv)
        revision = await mine.create(JobRecord(job_id="jstale", tenant="default",
                                               params={"n": 0}))
        assert revision is not None

        def bump(r: JobRecord) -> bool:
            r.params["n"] += 1
            return True

        old = mine.recent("jstale", revision)
        assert old is not None
        await other.apply("jstale", bump)  # another process writes meanwhile
        record, _ = await mine.apply("jstale", bump, old, fresh=False)
        assert record.params["n"] == 2 and (await other.get("jstale")).params["n"] == 2

        _, _, written = await mine.apply_written("jstale", bump)  # n == 3
        assert written is not None
        known = mine.recent("jstale", written.revision)
        assert known is not None and known[0].params["n"] == 3
        await other.apply("jstale", bump)  # n == 4, unknown to `mine`

        def flag_from_four(r: JobRecord) -> bool:
            if r.params["n"] < 4:
                return False
            r.params["flag"] = True
            return True

        record, result = await mine.apply("jstale", flag_from_four, known, fresh=False)
        assert result is True and record.params == {"n": 4, "flag": True}
        assert (await other.get("jstale")).params == {"n": 4, "flag": True}
