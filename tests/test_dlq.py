"""DLQ tooling through the gateway: list, show, replay and purge dead letters."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from functions.registry import FUNCTIONS
from shared.function import Services
from tests.support.nats import running, submit_job, until_http_up, wait_for_job

pytestmark = pytest.mark.timeout(90)

POISON_SUBMIT = b'{"type": "job.submit", "tenant": 42}'
POISON_TASK = b'{"type": "stage.task", "job_id": 7}'


async def dlq_count(services: Services) -> int:
    info = await services.bus.js.stream_info(services.names.dlq_stream)
    return info.state.messages


async def eventually_entries(client: httpx.AsyncClient, count: int, **params: Any) -> list[Any]:
    """The listing once it holds ``count`` entries (dead-lettering follows the publish)."""
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        r = await client.get("/v1/dlq", params=params)
        assert r.status_code == 200, r.text
        entries: list[Any] = r.json()["entries"]
        if len(entries) >= count or loop.time() > deadline:
            return entries
        await asyncio.sleep(0.05)


@pytest.fixture
async def gateway(make_settings, http_port):  # type: ignore[no-untyped-def]
    """The gateway, the conductor and the noop stage: enough to make poison dead letters."""
    settings = make_settings(http_port=http_port)
    functions = [FUNCTIONS[n] for n in ("gateway", "conductor", "noop")]
    async with running(settings, functions) as rt:
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=10) as client:
            await until_http_up(client)
            yield rt, client


async def test_poison_messages_are_listed_shown_replayed_and_purged(gateway) -> None:  # type: ignore[no-untyped-def]
    rt, client = gateway
    services = rt.services
    js, names = services.bus.js, services.names
    await js.publish(names.submit, POISON_SUBMIT)
    await js.publish(names.submit, b"not json at all")
    await js.publish(names.stage("noop"), POISON_TASK)

    entries = await eventually_entries(client, 3)
    assert sorted(e["function"] for e in entries) == ["conductor", "conductor", "noop"]
    assert {e["error"]["code"] for e in entries} == {"invalid_event"}

    # Paging by sequence, and the function filter.
    first = (await client.get("/v1/dlq", params={"limit": 2})).json()
    assert len(first["entries"]) == 2 and first["next_after"] == first["entries"][1]["seq"]
    rest = (await client.get("/v1/dlq", params={"after": first["next_after"]})).json()
    assert len(rest["entries"]) == 1 and rest["next_after"] is None
    only = (await client.get("/v1/dlq", params={"function": "conductor"})).json()["entries"]
    assert [e["function"] for e in only] == ["conductor", "conductor"]

    seq = only[0]["seq"]
    shown = (await client.get(f"/v1/dlq/{seq}")).json()
    assert shown["subject"] == "jobs.submit" and shown["num_delivered"] == 1
    assert shown["error"]["code"] == "invalid_event"
    assert "cannot decode JobSubmit" in shown["error"]["message"]
    assert shown["payload"] == json.loads(POISON_SUBMIT)
    assert base64.b64decode(shown["data"]) == POISON_SUBMIT
    garbage = (await client.get(f"/v1/dlq/{only[1]['seq']}")).json()
    assert garbage["payload"] is None and base64.b64decode(garbage["data"]) == b"not json at all"

    # Replaying a non-task entry publishes it again as it was: still poison, so it comes
    # straight back, as a new entry that says what it replays.
    r = await client.post(f"/v1/dlq/{seq}:replay")
    assert r.status_code == 200, r.text
    assert r.json()["action"] == "republished" and r.json()["subject"] == "jobs.submit"
    assert (await client.get(f"/v1/dlq/{seq}")).status_code == 404
    back = [e for e in await eventually_entries(client, 2, function="conductor")
            if e["seq"] > seq and e["function"] == "conductor"]
    assert len(back) == 2
    replayed = (await client.get(f"/v1/dlq/{back[-1]['seq']}")).json()
    assert replayed["headers"]["jetcut-replay-of"] == str(seq)
    assert replayed["headers"]["Nats-Msg-Id"] == f"replay:{seq}"
    assert base64.b64decode(replayed["data"]) == POISON_SUBMIT

    # Purge: one entry, one function's, then everything, only when asked for explicitly.
    r = await client.delete(f"/v1/dlq/{back[0]['seq']}")
    assert r.status_code == 200 and r.json()["purged"] == 1
    assert (await client.get(f"/v1/dlq/{back[0]['seq']}")).status_code == 404
    r = await client.delete("/v1/dlq")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
    r = await client.delete("/v1/dlq", params={"function": "noop"})
    assert r.json() == {"purged": 1, "function": "noop"}
    assert await dlq_count(services) == 1
    r = await client.delete("/v1/dlq", params={"all": "true"})
    assert r.json() == {"purged": 1, "function": None}
    assert await dlq_count(services) == 0
    assert (await client.get("/v1/dlq")).json() == {"entries": [], "next_after": None}


async def test_an_exhausted_task_replays_as_a_retry_of_its_job(  # type: ignore[no-untyped-def]
    make_settings, http_port, clip_3s, tmp_path: Path
):
    """A probe worker deployed without ffmpeg fails transiently on every delivery; once a
    healthy worker runs, replaying the dead task retries its job, which then succeeds."""
    settings = make_settings(http_port=http_port, max_deliver=2)
    broken = make_settings(max_deliver=2, ffmpeg=str(tmp_path / "no-ffmpeg"),
                           ffprobe=str(tmp_path / "no-ffprobe"))
    async with running(settings, [FUNCTIONS["gateway"], FUNCTIONS["conductor"]]) as rt:
        services = rt.services
        assert services is not None
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=10) as client:
            await until_http_up(client)
            async with running(broken, [FUNCTIONS["probe"]], name="broken"):
                job_id = await submit_job(rt, [clip_3s], steps={
                    "probe": {"stage": "probe", "uses": [":input"]}})
                record = await wait_for_job(services, job_id, timeout=30)
            assert record.status == "failed"
            assert record.error is not None and record.error.code == "retries_exhausted"

            (entry,) = await eventually_entries(client, 1, function="probe")
            assert entry["job_id"] == job_id and entry["num_delivered"] == 2
            assert entry["error"]["details"]["last_error"] == "internal"
            shown = (await client.get(f"/v1/dlq/{entry['seq']}")).json()
            assert shown["payload"]["type"] == "stage.task"
            assert (shown["payload"]["step"], shown["payload"]["attempt"]) == ("probe", 1)

            async with running(settings, [FUNCTIONS["probe"]], name="healthy"):
                r = await client.post(f"/v1/dlq/{entry['seq']}:replay")
                assert r.status_code == 200, r.text
                result = r.json()
                assert result["action"] == "job_retry" and result["job_id"] == job_id
                assert result["subject"] == "jobs.retry"
                assert result["msg_id"] == f"replay:{entry['seq']}"
                record = await wait_for_job(services, job_id,
                                            until=lambda r: r.status == "succeeded")
            assert record.steps["probe"].attempt == 2
            assert (await client.get(f"/v1/dlq/{entry['seq']}")).status_code == 404
            assert await dlq_count(services) == 0


async def test_replaying_a_task_of_a_job_that_is_not_failed_is_a_conflict(  # type: ignore[no-untyped-def]
    gateway, clip_3s
) -> None:
    """The entry is kept: the operator decides (purge it, or retry when the job fails)."""
    rt, client = gateway
    services = rt.services
    from shared import msgids
    from shared.events import DeadLetter, ErrorInfo, StageTask, encode

    job_id = await submit_job(rt, [clip_3s], steps={"n": {"stage": "noop", "uses": [":input"]}})
    await wait_for_job(services, job_id, until=lambda r: r.status == "succeeded")
    task = StageTask(job_id=job_id, tenant="default", step="n", stage="noop", attempt=1)
    await services.bus.publish(services.names.dlq("noop"), DeadLetter(
        function="noop", subject="stages.noop", data=encode(task),
        error=ErrorInfo(code="retries_exhausted", message="test"), stream_seq=1,
    ), msg_id=msgids.dlq_entry(services.names.stages_stream, 1))
    (entry,) = await eventually_entries(client, 1)
    r = await client.post(f"/v1/dlq/{entry['seq']}:replay")
    assert r.status_code == 409, r.text
    assert r.json()["error"]["details"] == {"job_id": job_id, "status": "succeeded"}
    assert (await client.get(f"/v1/dlq/{entry['seq']}")).status_code == 200


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/v1/dlq?limit=0", 400),
    ("GET", "/v1/dlq?limit=501", 400),
    ("GET", "/v1/dlq?limit=ten", 400),
    ("GET", "/v1/dlq?after=-1", 400),
    ("GET", "/v1/dlq?function=no.such", 400),
    ("GET", "/v1/dlq/abc", 400),
    ("GET", "/v1/dlq/0", 400),
    ("GET", "/v1/dlq/999999", 404),
    ("POST", "/v1/dlq/999999:replay", 404),
    ("POST", "/v1/dlq/abc:replay", 400),
    ("POST", "/v1/dlq/1:frobnicate", 404),
    ("DELETE", "/v1/dlq/999999", 404),
    ("DELETE", "/v1/dlq?function=no.such", 400),
])
async def test_bad_dlq_requests_get_a_specific_error(gateway, method, path, status) -> None:  # type: ignore[no-untyped-def]
    _, client = gateway
    r = await client.request(method, path)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == {400: "invalid_request", 404: "not_found"}[status]


async def test_the_cli_lists_shows_replays_and_purges(gateway, capsys) -> None:  # type: ignore[no-untyped-def]
    """``jetcut dlq ...`` against the gateway (run in a thread: the gateway serves on this
    test's event loop, and the CLI's HTTP client is synchronous)."""
    import asyncio

    from functions.cli import main

    rt, client = gateway
    services = rt.services
    url = ["--url", str(client.base_url)]
    await services.bus.js.publish(services.names.stage("noop"), POISON_TASK)
    await services.bus.js.publish(services.names.stage("noop"), POISON_TASK + b" ")
    (one, two) = await eventually_entries(client, 2)

    async def cli(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = await asyncio.to_thread(main, list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = await cli("dlq", "list", "--function", "noop", *url)
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == [str(one["seq"]), str(two["seq"])]
    assert "invalid_event" in lines[0] and "stages.noop" in lines[0]
    code, out, _ = await cli("dlq", "list", "--limit", "1", *url)
    assert f"more: jetcut dlq list --after {one['seq']}" in out

    code, out, _ = await cli("dlq", "show", str(one["seq"]), *url)
    assert code == 0 and json.loads(out)["payload"] == json.loads(POISON_TASK)

    code, out, _ = await cli("dlq", "purge", str(one["seq"]), *url)
    assert (code, out.strip()) == (0, "purged 1 entry")
    code, _, err = await cli("dlq", "show", str(one["seq"]), *url)
    assert code == 1 and "error 404 not_found" in err
    code, _, err = await cli("dlq", "purge", *url)
    assert code == 2 and "--function NAME, or --all" in err

    code, out, _ = await cli("dlq", "replay", str(two["seq"]), *url)
    assert code == 0 and "published again on stages.noop" in out
    (back,) = await eventually_entries(client, 1)  # still poison: dead-lettered again
    assert back["seq"] > two["seq"]
    code, out, _ = await cli("dlq", "purge", "--all", *url)
    assert (code, out.strip()) == (0, "purged 1 entry")
    code, out, _ = await cli("dlq", "list", *url)
    assert out.strip() == "the DLQ is empty"
