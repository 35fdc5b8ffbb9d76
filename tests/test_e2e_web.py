"""End to end through HTTP, in one process: upload -> recipe web -> playable outputs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from functions.registry import FUNCTIONS
from shared.events import DeadLetter, decode
from tests.support.media import ffprobe_json
from tests.support.nats import (
    consumer_settled,
    serving_http,
    submit_job,
    wait_for_job,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def stack(make_settings, http_port):  # type: ignore[no-untyped-def]
    settings = make_settings(http_port=http_port)
    async with serving_http(settings, list(FUNCTIONS.values())) as (runtime, client):
        yield runtime, client


async def _upload(client: httpx.AsyncClient, path: Path) -> dict:
    r = await client.post("/v1/uploads", params={"filename": path.name},
                          content=path.read_bytes())
    assert r.status_code == 201, r.text
    return r.json()


async def test_web_recipe_end_to_end(stack, clip_3s, binaries, tmp_path):  # type: ignore[no-untyped-def]
    runtime, client = stack
    upload = await _upload(client, clip_3s)
    r = await client.post("/v1/jobs", json={"recipe": "web", "input": upload["upload_id"]})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]

    record = await wait_for_job(runtime.services, job_id)
    assert record.status == "succeeded", record.error

    r = await client.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 200
    job = r.json()
    assert job["status"] == "succeeded" and job["progress"] == 1.0
    assert {s["status"] for s in job["steps"].values()} == {"done"}

    outputs = {(o["step"], o["name"]): o for o in (await client.get(
        f"/v1/jobs/{job_id}/outputs")).json()["outputs"]}
    video = tmp_path / "video.mp4"
    video.write_bytes((await client.get(outputs[("transcode", "video")]["url"])).content)
    poster = tmp_path / "poster.jpg"
    poster.write_bytes((await client.get(outputs[("poster", "poster")]["url"])).content)

    info = ffprobe_json(binaries, video)
    streams = {s["codec_type"]: s for s in info["streams"]}
    assert streams["video"]["codec_name"] == "h264"
    assert streams["video"]["pix_fmt"] == "yuv420p"
    assert streams["audio"]["codec_name"] == "aac"
    assert (streams["video"]["width"], streams["video"]["height"]) == (640, 360)
    assert abs(float(info["format"]["duration"]) - 3.0) <= 0.1

    assert poster.read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG SOI marker
    pinfo = ffprobe_json(binaries, poster)
    assert pinfo["streams"][0]["codec_name"] == "mjpeg"


async def test_text_file_fails_fast_with_invalid_input(stack, text_file, clip_3s):  # type: ignore[no-untyped-def]
    runtime, client = stack
    upload = await _upload(client, text_file)
    r = await client.post("/v1/jobs", json={"recipe": "web", "input": upload["upload_id"]})
    assert r.status_code == 202, r.text
    record = await wait_for_job(runtime.services, r.json()["job_id"], timeout=15)
    assert record.status == "failed"
    assert record.error is not None and record.error.code == "invalid_input"
    assert runtime.settings.work_dir not in record.error.message  # no worker paths leak
    probe = record.steps["probe"]
    assert probe.status == "failed" and probe.attempt == 1  # zero retries
    assert {s.status for n, s in record.steps.items() if n != "probe"} == {"cancelled"}

    names = runtime.services.names
    # nothing left in flight
    assert await consumer_settled(runtime.services, names.stages_stream, "stage-probe") == (0, 0)

    upload = await _upload(client, clip_3s)
    r = await client.post("/v1/jobs", json={"recipe": "web", "input": upload["upload_id"]})
    record = await wait_for_job(runtime.services, r.json()["job_id"])
    assert record.status == "succeeded"


async def test_malformed_submit_is_dead_lettered(stack, clip_3s):  # type: ignore[no-untyped-def]
    runtime, client = stack
    services = runtime.services
    await services.bus.js.publish(services.names.submit, b'{"recipe": 42, "inputs": "x"}')
    sub = await services.bus.js.subscribe(services.names.dlq("conductor"), ordered_consumer=True)
    msg = await sub.next_msg(timeout=10)
    entry = decode(DeadLetter, msg.data)
    assert entry.error.code == "invalid_event"
    assert "recipe" in entry.error.message
    assert entry.data == b'{"recipe": 42, "inputs": "x"}'
    await sub.unsubscribe()

    # The conductor is not stalled: a real job still goes through.
    upload = await _upload(client, clip_3s)
    r = await client.post("/v1/jobs", json={"recipe": "web", "input": upload["upload_id"]})
    record = await wait_for_job(services, r.json()["job_id"])
    assert record.status == "succeeded"


async def test_same_idempotency_key_makes_one_job(stack, clip_3s):  # type: ignore[no-untyped-def]
    runtime, client = stack
    upload = await _upload(client, clip_3s)
    body = {"recipe": "web", "input": upload["upload_id"]}
    first = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "same-key"})
    assert first.status_code == 202
    job_id = first.json()["job_id"]
    await wait_for_job(runtime.services, job_id)
    again = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "same-key"})
    assert again.status_code == 200 and again.json()["job_id"] == job_id
    assert again.json()["status"] == "succeeded"
    # one set of outputs: each step ran exactly once
    record = await runtime.services.jobs.get(job_id)
    assert {s.attempt for s in record.steps.values()} == {1}
    stored = sorted(o.key.split("/", 2)[2]
                    for o in await runtime.services.store.list(f"jobs/{job_id}/"))
    # probe is an intermediate: the janitor may already have deleted its manifest.
    assert [k for k in stored if not k.startswith("probe/")] == [
        "poster/manifest.json", "poster/poster.jpg", "transcode/manifest.json",
        "transcode/video.mp4"]


async def test_metrics_count_handled_messages(stack, clip_3s):  # type: ignore[no-untyped-def]
    runtime, client = stack
    upload = await _upload(client, clip_3s)
    r = await client.post("/v1/jobs", json={"recipe": "web", "input": upload["upload_id"]})
    await wait_for_job(runtime.services, r.json()["job_id"])
    wanted = ['jetcut_messages_total{function="transcode",outcome="ack",'
              'subject_kind="stages.transcode"} 1.0',
              'jetcut_jobs_total{recipe="web",status="succeeded"} 1.0']
    # The conductor counts the job right after the KV write this test watched: give it
    # that moment, with a deadline.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while True:
        text = (await client.get("/metrics")).text
        if all(w in text for w in wanted):
            break
        assert loop.time() < deadline, text[-2000:]
        await asyncio.sleep(0.05)


async def test_inline_pipeline_may_name_its_probe_step_freely(stack, clip_3s):  # type: ignore[no-untyped-def]
    runtime, _ = stack
    job_id = await submit_job(runtime, [clip_3s], steps={
        "inspect": {"stage": "probe", "uses": [":input"]},
        "small": {"stage": "transcode", "uses": [":input", "inspect"],
                  "params": {"max_height": 180}},
    })
    record = await wait_for_job(runtime.services, job_id)
    assert record.status == "succeeded", record.error
    assert record.steps["small"].meta["height"] == 180
