"""DLQ triage: dead letters grouped by cause, and a whole group replayed at once.

Real jobs are dead-lettered for two different causes: probe workers deployed without
ffprobe, and thumbnail workers deployed without ffmpeg (each fails transiently on every
delivery until ``MaxDeliver``). The gateway groups them by stage, code and message shape,
and replaying one group (once healthy workers run) retries each of its jobs exactly once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from functions.registry import FUNCTIONS
from shared.dlqgroups import GROUP_ID, group_id, shape
from tests.support.nats import running, submit_job, until_http_up, wait_for_job
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(120)

PROBE_ONLY = {"probe": {"stage": "probe", "uses": [":input"]}}
WITH_POSTER = {**PROBE_ONLY, "poster": {"stage": "thumbnail", "uses": [":input", "probe"]}}


# --- the shape of a message (no I/O) --------------------------------------------------------


def test_one_cause_on_many_jobs_is_one_group_and_another_cause_is_not() -> None:
    a = ("gave up after 2 attempts; last error: internal: job jabcdefghijklmnopqrstuvwxy2 "
         "step probe: no file at /tmp/pytest-7/store/uploads/default/u1/a.mp4 (size 1834)")
    b = ("gave up after 3 attempts; last error: internal: job j234567abcdefghijklmnopqrst "
         "step probe: no file at /srv/x/uploads/t9/u77/clip_two.mp4 (size 99)")
    other = "gave up after 2 attempts; last error: internal: permission denied"
    assert shape(a) == shape(b)
    assert group_id("probe", "retries_exhausted", a) == group_id("probe", "retries_exhausted", b)
    assert group_id("probe", "retries_exhausted", a) != group_id("probe", "retries_exhausted",
                                                                  other)
    # The stage and the code are part of the group, not only the message.
    assert group_id("probe", "timeout", a) != group_id("probe", "retries_exhausted", a)
    assert group_id("transcode", "retries_exhausted", a) != group_id("probe",
                                                                      "retries_exhausted", a)
    gid = group_id("probe", "retries_exhausted", a)
    assert GROUP_ID.fullmatch(gid) and gid.startswith("probe.retries_exhausted.")
    # Type and field names msgspec puts in backticks are the shape; quoted values are not.
    assert shape("Expected `str`, got `int` - at `$.tenant`") != shape(
        "Expected `int`, got `str` - at `$.tenant`")
    assert shape("no upload 'u1'") == shape("no upload 'incoming/b.mp4'")


# --- against the real stack -----------------------------------------------------------------


async def groups(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    r = await client.get("/v1/dlq/groups")
    assert r.status_code == 200, r.text
    found: list[dict[str, Any]] = r.json()["groups"]
    return found


async def test_jobs_dead_lettered_by_two_causes_make_two_groups_and_one_replays(  # type: ignore[no-untyped-def]
    make_settings, http_port, clip_3s, tmp_path: Path, capsys
) -> None:
    settings = make_settings(http_port=http_port, max_deliver=2)
    broken = make_settings(max_deliver=2, ffmpeg=str(tmp_path / "no-ffmpeg"),
                           ffprobe=str(tmp_path / "no-ffprobe"))
    async with running(settings, [FUNCTIONS["gateway"], FUNCTIONS["conductor"]]) as rt:
        services = rt.services
        assert services is not None
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=10) as client:
            await until_http_up(client)
            # Cause 1: three jobs whose probe worker has no ffprobe.
            async with running(broken, [FUNCTIONS["probe"]], name="broken-probe"):
                probe_jobs = [await submit_job(rt, [clip_3s], steps=PROBE_ONLY)
                              for _ in range(3)]
                for job_id in probe_jobs:
                    record = await wait_for_job(services, job_id, timeout=60)
                    assert record.status == "failed", record.error
            # Cause 2: two jobs probed fine whose thumbnail worker has no ffmpeg.
            async with running(settings, [FUNCTIONS["probe"]], name="probe"), \
                    running(broken, [FUNCTIONS["thumbnail"]], name="broken-thumbnail"):
                poster_jobs = [await submit_job(rt, [clip_3s], steps=WITH_POSTER)
                               for _ in range(2)]
                for job_id in poster_jobs:
                    record = await wait_for_job(services, job_id, timeout=60)
                    assert record.status == "failed", record.error
                    assert record.steps["probe"].status == "done"

            async def both_listed() -> bool:
                return sum(g["count"] for g in await groups(client)) == 5

            await eventually(both_listed, what="five dead letters in the groups")
            listed = await groups(client)
            assert [(g["function"], g["count"], g["jobs"]) for g in listed] == [
                ("probe", 3, 3), ("thumbnail", 2, 2)]
            probe_group, thumb_group = listed
            assert probe_group["code"] == thumb_group["code"] == "retries_exhausted"
            assert probe_group["group"].startswith("probe.retries_exhausted.")
            assert probe_group["example"]["job_id"] in probe_jobs
            assert thumb_group["example"]["job_id"] in poster_jobs
            assert probe_group["first_seen"] <= probe_group["last_seen"]
            assert probe_group["example"]["at"] == probe_group["last_seen"]
            # The path each worker named is made uniform: one shape for every job.
            assert probe_group["shape"].endswith("=<q> is not an executable file")
            assert str(tmp_path) not in probe_group["shape"]

            # The CLI shows the same groups (in a thread: the gateway serves on this loop).
            from functions.cli import main

            capsys.readouterr()
            code = await asyncio.to_thread(main, ["dlq", "groups", "--url",
                                                  settings.base_url])
            out = capsys.readouterr().out
            assert code == 0
            assert out.index(probe_group["group"]) < out.index(thumb_group["group"])

            # Replay the probe group with a healthy probe worker: each job retried once.
            async with running(settings, [FUNCTIONS["probe"]], name="healthy-probe"):
                r = await client.post(f"/v1/dlq/groups/{probe_group['group']}:replay")
                assert r.status_code == 200, r.text
                result = r.json()
                assert (result["replayed"], result["covered"], result["kept"]) == (3, 0, 0)
                assert sorted(i["job_id"] for i in result["items"]) == sorted(probe_jobs)
                for job_id in probe_jobs:
                    record = await wait_for_job(services, job_id, timeout=60,
                                                until=lambda r: r.status == "succeeded")
                    assert record.steps["probe"].attempt == 2  # one new attempt, not two

                # A repeat finds the group gone; nothing is replayed twice.
                r = await client.post(f"/v1/dlq/groups/{probe_group['group']}:replay")
                assert r.status_code == 404, r.text
                assert r.json()["error"]["code"] == "not_found"
                code = await asyncio.to_thread(main, ["dlq", "replay", probe_group["group"],
                                                      "--url", settings.base_url])
                assert code == 1
                for job_id in probe_jobs:
                    assert (await services.jobs.get(job_id)).steps["probe"].attempt == 2
            # The other cause is untouched.
            assert [(g["group"], g["count"]) for g in await groups(client)] == [
                (thumb_group["group"], 2)]
            for job_id in poster_jobs:
                assert (await services.jobs.get(job_id)).status == "failed"


@pytest.fixture
async def gateway(make_settings, http_port):  # type: ignore[no-untyped-def]
    settings = make_settings(http_port=http_port)
    async with running(settings, [FUNCTIONS["gateway"]]) as rt:
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=10) as client:
            await until_http_up(client)
            yield rt, client


@pytest.mark.parametrize(("path", "status", "code"), [
    ("/v1/dlq/groups/not-a-group:replay", 400, "invalid_request"),
    ("/v1/dlq/groups/probe.retries_exhausted.XYZ:replay", 400, "invalid_request"),
    ("/v1/dlq/groups/probe.retries_exhausted.0123456789ab:replay", 404, "not_found"),
    ("/v1/dlq/groups/probe.retries_exhausted.0123456789ab:frobnicate", 404, "not_found"),
    ("/v1/dlq/groups/probe.retries_exhausted.0123456789ab", 400, "invalid_request"),
])
async def test_bad_group_ids_get_a_specific_error(gateway, path, status, code) -> None:  # type: ignore[no-untyped-def]
    _, client = gateway
    r = await client.post(path)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


async def test_an_empty_dlq_has_no_groups(gateway) -> None:  # type: ignore[no-untyped-def]
    _, client = gateway
    r = await client.get("/v1/dlq/groups")
    assert r.status_code == 200
    assert r.json() == {"groups": [], "entries": 0}


async def test_the_dead_tasks_of_one_job_are_one_retry(make_settings, http_port) -> None:  # type: ignore[no-untyped-def]
    """Two dead tasks of one cancelled job, in one group: the first entry retries the job,
    the second is removed as covered by it (one retry, not two)."""
    from shared import msgids
    from shared.events import DeadLetter, ErrorInfo, StageTask, encode

    settings = make_settings(http_port=http_port)
    async with running(settings, [FUNCTIONS["gateway"], FUNCTIONS["conductor"]]) as rt:
        services = rt.services
        assert services is not None
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=10) as client:
            await until_http_up(client)
            upload = (await client.post("/v1/uploads", params={"filename": "a.bin"},
                                        content=b"x" * 64)).json()
            steps = {name: {"stage": "noop", "uses": [":input"]} for name in ("a", "b")}
            r = await client.post("/v1/jobs", json={"steps": steps,
                                                    "input": upload["upload_id"]})
            job_id = r.json()["job_id"]
            await wait_for_job(services, job_id, until=lambda rec: rec.planned)
            assert (await client.delete(f"/v1/jobs/{job_id}")).status_code == 202
            await wait_for_job(services, job_id, until=lambda rec: rec.status == "cancelled")
            for seq, step in enumerate(("a", "b"), start=1):
                task = StageTask(job_id=job_id, tenant="default", step=step, stage="noop",
                                 attempt=1)
                await services.bus.publish(services.names.dlq("noop"), DeadLetter(
                    function="noop", subject="stages.noop", data=encode(task),
                    error=ErrorInfo(code="retries_exhausted",
                                    message=f"gave up on job {job_id} step '{step}'"),
                    stream_seq=seq), msg_id=msgids.dlq_entry(services.names.stages_stream, seq))

            async def two_in_one_group() -> bool:
                listed = await groups(client)
                return [(g["count"], g["jobs"]) for g in listed] == [(2, 1)]

            await eventually(two_in_one_group, what="one group of two entries of one job")
            (group,) = await groups(client)
            r = await client.post(f"/v1/dlq/groups/{group['group']}:replay")
            assert r.status_code == 200, r.text
            result = r.json()
            assert (result["replayed"], result["covered"], result["kept"]) == (1, 1, 0)
            assert [i["outcome"] for i in result["items"]] == ["replayed", "covered"]
            record = await wait_for_job(services, job_id, until=lambda rec: not rec.terminal)
            assert {s.attempt for s in record.steps.values()} == {2}  # one retry: attempt 2
            assert await groups(client) == []
