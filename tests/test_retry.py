"""Manual retry of failed and cancelled jobs, over HTTP and with the CLI.

A retried job resumes from its checkpoints: steps that finished keep their outputs (their
objects are not rewritten, their attempt stays 1) and only what failed or was cancelled
runs again, under a new attempt.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from functions.registry import FUNCTIONS
from shared.events import InputRef, JobSubmit
from shared.function import Services
from shared.ids import new_job_id
from tests.support.nats import running, submit_job, until_http_up, wait_for_job

pytestmark = pytest.mark.timeout(120)

JETCUT = str(Path(sys.executable).parent / "jetcut")


async def snapshot(services: Services, job_id: str, step: str) -> dict[str, tuple[str, float]]:
    """What a step stored: key -> (etag, mtime), which a re-run would change."""
    return {o.key: (o.etag, o.last_modified)
            for o in await services.store.list(f"jobs/{job_id}/{step}/")}


async def retry_messages(services: Services) -> int:
    info = await services.bus.js.stream_info(services.names.jobs_stream,
                                             subjects_filter=services.names.retry)
    return sum((info.state.subjects or {}).values())


async def test_a_job_failed_for_a_missing_input_is_retried_once_it_is_back(  # type: ignore[no-untyped-def]
    make_settings, http_port, clip_3s
):
    settings = make_settings(http_port=http_port)
    planners = [FUNCTIONS[n] for n in ("gateway", "conductor", "probe")]
    async with running(settings, planners) as rt:
        services = rt.services
        assert services is not None
        job_id = await submit_job(rt, [clip_3s], steps={
            "probe": {"stage": "probe", "uses": [":input"]},
            "web": {"stage": "transcode", "uses": [":input", "probe"],
                    "params": {"max_height": 144}},
        })
        # Probe finishes; no transcode worker runs yet, so the next step waits, ready.
        record = await wait_for_job(services, job_id,
                                    until=lambda r: r.steps.get("web") is not None
                                    and r.steps["web"].status == "ready")
        probed = await snapshot(services, job_id, "probe")
        assert any(k.endswith("manifest.json") for k in probed)
        upload = record.inputs[0].key
        await services.store.delete(upload)  # gone when the transcode step reads it

        async with running(settings, [FUNCTIONS["transcode"]], name="encoder"):
            failed = await wait_for_job(services, job_id)
            assert failed.status == "failed", failed.error
            assert failed.error is not None and failed.error.code == "input_not_found"

            await services.store.put_file(upload, clip_3s)  # the operator puts it back
            async with httpx.AsyncClient(base_url=settings.base_url, timeout=10) as client:
                await until_http_up(client)
                first, second = await asyncio.gather(
                    client.post(f"/v1/jobs/{job_id}:retry"),
                    client.post(f"/v1/jobs/{job_id}:retry"),
                )
                assert first.status_code == 202, first.text
                assert first.json()["job_id"] == job_id
                # The double click is one retry: a 202 under the same revision (deduplicated)
                # or, if the conductor already took the first, a 409 because it runs.
                assert second.status_code in (202, 409), second.text
                record = await wait_for_job(services, job_id,
                                            until=lambda r: r.status == "succeeded")
                assert await retry_messages(services) == 1

                probe, web = record.steps["probe"], record.steps["web"]
                assert (probe.status, probe.attempt, probe.from_checkpoint) == ("done", 1, False)
                assert await snapshot(services, job_id, "probe") == probed  # not re-run
                assert (web.status, web.attempt) == ("done", 2)
                assert web.outputs["video"].startswith(f"jobs/{job_id}/web/")

                again = await client.post(f"/v1/jobs/{job_id}:retry")
                assert again.status_code == 409
                assert again.json()["error"] == {
                    "code": "conflict", "details": {"status": "succeeded"},
                    "message": f"job {job_id} is succeeded: only a failed or cancelled job "
                               "can be retried"}


async def test_a_cancelled_job_is_retried_with_the_cli_and_keeps_its_finished_steps(  # type: ignore[no-untyped-def]
    make_settings, http_port, make_clip
):
    clip = make_clip("retry_after_cancel_10s", duration=10.0, width=640, height=360)
    settings = make_settings(http_port=http_port)
    # No janitor: it would delete the probe step's objects as intermediates on success.
    functions = [FUNCTIONS[n] for n in ("gateway", "conductor", "probe", "transcode")]
    async with running(settings, functions) as rt:
        services = rt.services
        assert services is not None
        job_id = await submit_job(rt, [clip], steps={
            "probe": {"stage": "probe", "uses": [":input"]},
            "encode": {"stage": "transcode", "uses": [":input", "probe"],
                       "params": {"preset": "medium", "max_height": 360}},
        })
        await wait_for_job(services, job_id, until=lambda r: r.terminal or (
            "encode" in r.steps and r.steps["encode"].progress > 0))
        probed = await snapshot(services, job_id, "probe")
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=10) as client:
            await until_http_up(client)
            assert (await client.delete(f"/v1/jobs/{job_id}")).status_code == 202
        cancelled = await wait_for_job(services, job_id)
        assert cancelled.status == "cancelled"
        assert cancelled.steps["encode"].status == "cancelled"

        cli = await asyncio.create_subprocess_exec(
            JETCUT, "retry", job_id, "--wait", "--timeout", "60", "--url", settings.base_url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(cli.communicate(), 90)
        assert cli.returncode == 0, err.decode()
        assert f"job {job_id} retrying (it was cancelled)" in out.decode()
        assert f"/v1/jobs/{job_id}/outputs/encode/video" in out.decode()  # --wait's summary

        record = await services.jobs.get(job_id)
        assert record.status == "succeeded"
        assert record.steps["probe"].attempt == 1
        assert await snapshot(services, job_id, "probe") == probed
        assert (record.steps["encode"].status, record.steps["encode"].attempt) == ("done", 2)


async def test_retry_answers_409_unless_failed_or_cancelled_and_404_for_unknown(  # type: ignore[no-untyped-def]
    make_settings, http_port, clip_3s
):
    settings = make_settings(http_port=http_port)
    async with running(settings, [FUNCTIONS[n] for n in ("gateway", "conductor")]) as rt:
        services = rt.services
        assert services is not None
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=10) as client:
            await until_http_up(client)
            r = await client.post("/v1/jobs/jnosuchjob:retry")
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
            r = await client.post("/v1/jobs/jnosuchjob:frobnicate")
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"

            # Planned, but no probe worker runs: the job stays queued.
            queued = await submit_job(rt, [clip_3s], recipe="web")
            await wait_for_job(services, queued, until=lambda r: r.planned)
            r = await client.post(f"/v1/jobs/{queued}:retry")
            assert r.status_code == 409, r.text
            assert r.json()["error"]["details"] == {"status": "queued"}
            assert (await client.get(f"/v1/jobs/{queued}")).status_code == 200

            # Failed before planning (its input never existed): nothing to resume.
            unplanned = new_job_id()
            await services.bus.publish(services.names.submit, JobSubmit(
                job_id=unplanned, recipe="web",
                inputs=[InputRef(key="uploads/default/unope/missing.mp4")]), msg_id=unplanned)
            record = await wait_for_job(services, unplanned)
            assert record.status == "failed" and not record.planned
            r = await client.post(f"/v1/jobs/{unplanned}:retry")
            assert r.status_code == 409, r.text
            error: dict[str, Any] = r.json()["error"]
            assert error["details"] == {"status": "failed", "error_code": "input_not_found"}
            assert "fix the request and submit again" in error["message"]
        assert await retry_messages(services) == 0
