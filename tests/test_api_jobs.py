"""The job API through the real gateway: OpenAPI and docs, batches, listings, job detail
with queue position, presigned uploads and downloads (moto S3)."""

from __future__ import annotations

from typing import Any

import httpx
import msgspec
import pytest
from openapi_spec_validator import validate

from functions.registry import FUNCTIONS
from shared.keys import KeyStore
from tests.support.nats import running, serving_http, until_http_up, upload
from tests.support.s3 import unique_bucket
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(90)

NOOP = {"n": {"stage": "noop", "uses": [":input"]}}
OPEN = {"allow_anonymous": True, "rate_limit_key_per_s": 0, "rate_limit_address_per_s": 0}


@pytest.fixture
async def gateway(make_settings, http_port):  # type: ignore[no-untyped-def]
    """Just the gateway: nothing consumes jobs.submit, so accepted jobs stay queued."""
    settings = make_settings(http_port=http_port, max_batch=5, **OPEN)
    async with serving_http(settings, [FUNCTIONS["gateway"]]) as (runtime, client):
        yield runtime, client




async def _submits(runtime: Any) -> int:
    info = await runtime.services.bus.js.stream_info(runtime.names.jobs_stream)
    return int(info.state.messages)


async def test_openapi_document_is_valid_and_lists_every_route(gateway):  # type: ignore[no-untyped-def]
    _, client = gateway
    r = await client.get("/v1/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    validate(doc)  # raises on an invalid OpenAPI 3.1 document
    for path, method in [("/v1/jobs", "get"), ("/v1/jobs", "post"), ("/v1/jobs:batch", "post"),
                         ("/v1/jobs/{job_id}/events", "get"), ("/v1/queue", "get"),
                         ("/v1/status", "get"), ("/v1/uploads:presign", "post")]:
        assert method in doc["paths"][path], (path, method)
    submit = doc["paths"]["/v1/jobs"]["post"]
    assert "requestBody" in submit
    assert submit["responses"]["500"]["content"]["application/json"]["schema"]["$ref"] \
        == "#/components/schemas/ErrorBody"
    batch = doc["paths"]["/v1/jobs:batch"]["post"]
    assert set(batch["responses"]) >= {"202", "400", "409", "422", "503"}
    # The docs page works offline: every asset it names is served by the gateway itself.
    page = (await client.get("/v1/docs")).text
    assert "cdn." not in page and "https://" not in page.split("<body>")[0]
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "swagger-ui-standalone-preset.js"):
        assert f"/v1/docs/assets/{asset}" in page
        assert (await client.get(f"/v1/docs/assets/{asset}")).status_code == 200


async def test_every_served_route_is_in_the_openapi_document(gateway):  # type: ignore[no-untyped-def]
    runtime, client = gateway
    doc = (await client.get("/v1/openapi.json")).json()
    documented = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    from functions.gateway.app import build_app

    served = {
        (route.path.replace(":str}", "}").replace(":int}", "}"), method.lower())
        for route in build_app(runtime.services).routes
        for method in getattr(route, "methods", ())
        if method not in ("HEAD", "OPTIONS")
        and not route.path.startswith(("/v1/openapi", "/v1/docs"))
        and route.path != "/" and not route.path.startswith("/ui")  # the dashboard's pages
    }
    assert served and served <= documented, served - documented


async def test_batch_queues_every_job_in_order(gateway):  # type: ignore[no-untyped-def]
    runtime, client = gateway
    upload_id = await upload(client)
    body = {"jobs": [{"steps": NOOP, "input": upload_id} for _ in range(3)]}
    r = await client.post("/v1/jobs:batch", json=body)
    assert r.status_code == 202, r.text
    jobs = r.json()["jobs"]
    assert len(jobs) == 3 and len({j["job_id"] for j in jobs}) == 3
    assert r.json()["created"] == [True, True, True]
    assert await _submits(runtime) == 3
    for job in jobs:
        assert (await client.get(f"/v1/jobs/{job['job_id']}")).json()["status"] == "queued"


async def test_one_bad_item_rejects_the_batch_and_queues_nothing(gateway):  # type: ignore[no-untyped-def]
    runtime, client = gateway
    upload_id = await upload(client)
    body = {"jobs": [
        {"steps": NOOP, "input": upload_id},
        {"recipe": "nope", "input": upload_id},
        {"steps": NOOP, "input": upload_id, "colour": "red"},
        {"steps": NOOP, "input": "u" + "a" * 26},
    ]}
    r = await client.post("/v1/jobs:batch", json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_request"
    items = error["details"]["items"]
    assert items[0] is None
    assert items[1]["code"] == "invalid_recipe"
    assert items[2]["code"] == "invalid_request" and "colour" in items[2]["message"]
    assert items[3]["code"] == "input_not_found"
    assert await _submits(runtime) == 0
    assert await runtime.services.jobs.job_ids() == []


@pytest.mark.parametrize(("body", "status"), [
    (b"not json", 400), (b'{"jobs": []}', 422), (b'{"jobs": "x"}', 400),
    (b'{"jobs": [{}, {}, {}, {}, {}, {}]}', 422), (b'{"jobs": [], "extra": 1}', 400),
])
async def test_malformed_batches_get_specific_errors(gateway, body, status):  # type: ignore[no-untyped-def]
    runtime, client = gateway
    r = await client.post("/v1/jobs:batch", content=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == "invalid_request"
    assert await _submits(runtime) == 0


async def test_batch_idempotency_by_header_and_per_item(gateway):  # type: ignore[no-untyped-def]
    runtime, client = gateway
    upload_id = await upload(client)
    body = {"jobs": [{"steps": NOOP, "input": upload_id},
                     {"steps": NOOP, "input": upload_id, "idempotency_key": "item-b"}]}
    first = await client.post("/v1/jobs:batch", json=body, headers={"Idempotency-Key": "b1"})
    again = await client.post("/v1/jobs:batch", json=body, headers={"Idempotency-Key": "b1"})
    assert first.status_code == again.status_code == 202, again.text
    ids = [j["job_id"] for j in first.json()["jobs"]]
    assert [j["job_id"] for j in again.json()["jobs"]] == ids
    assert await _submits(runtime) == 2  # the repeat re-published; the stream deduplicated
    # A single submit with the item's key names the same job.
    single = await client.post("/v1/jobs", json={"steps": NOOP, "input": upload_id},
                               headers={"Idempotency-Key": "item-b"})
    assert single.json()["job_id"] == ids[1]
    # The same key for a different batch is a conflict, item by item, and queues nothing.
    other = {"jobs": [{"steps": NOOP, "input": upload_id, "params": {"x": 1}}]}
    r = await client.post("/v1/jobs:batch", json=other, headers={"Idempotency-Key": "b1"})
    assert r.status_code == 409 and r.json()["error"]["details"]["items"][0]["code"] == "conflict"
    dup = {"jobs": [{"steps": NOOP, "input": upload_id, "idempotency_key": "k"}] * 2}
    r = await client.post("/v1/jobs:batch", json=dup)
    assert r.status_code == 409, r.text
    assert await _submits(runtime) == 2


async def test_list_filters_and_pages_without_gaps_or_repeats(gateway):  # type: ignore[no-untyped-def]
    runtime, client = gateway
    upload_id = await upload(client)
    made = []
    for i in range(7):
        body = {"recipe": "web", "input": upload_id} if i % 3 == 0 else \
            {"steps": NOOP, "input": upload_id}
        made.append((await client.post("/v1/jobs", json=body)).json())
    # Another tenant's job never shows.
    await runtime.services.jobs.create(msgspec.convert(
        {"job_id": "jothertenant", "tenant": "other", "status": "queued"},
        type=__import__("shared.jobstate", fromlist=["JobRecord"]).JobRecord))
    newest_first = [j["job_id"] for j in sorted(made, key=lambda j: (j["created_at"],
                                                                     j["job_id"]), reverse=True)]
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get("/v1/jobs", params=params)).json()
        seen += [j["job_id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        # A job made between pages is newer: it never shifts the pages being read.
        await client.post("/v1/jobs", json={"steps": NOOP, "input": upload_id})
    assert seen == newest_first

    web = (await client.get("/v1/jobs", params={"recipe": "web"})).json()["jobs"]
    assert {j["job_id"] for j in web} == {j["job_id"] for j in made if j["recipe"] == "web"}
    inline = (await client.get("/v1/jobs", params={"recipe": "inline", "limit": 100})).json()
    assert all(j["recipe"] is None for j in inline["jobs"]) and len(inline["jobs"]) == 6
    middle = made[3]["created_at"]
    after = (await client.get("/v1/jobs", params={"created_after": middle,
                                                  "status": "queued,running"})).json()["jobs"]
    assert made[3]["job_id"] not in {j["job_id"] for j in after}
    assert {j["job_id"] for j in made[4:]} <= {j["job_id"] for j in after}
    assert (await client.get("/v1/jobs", params={"status": "failed"})).json() == \
        {"jobs": [], "next_cursor": None}


@pytest.mark.parametrize("params", [
    {"status": "done"}, {"limit": 0}, {"limit": 100000}, {"cursor": "garbage!"},
    {"created_after": "yesterday"},
])
async def test_bad_list_queries_are_400(gateway, params):  # type: ignore[no-untyped-def]
    _, client = gateway
    r = await client.get("/v1/jobs", params=params)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_request"


async def test_listing_is_scoped_to_the_callers_tenant(make_settings, http_port):  # type: ignore[no-untyped-def]
    settings = make_settings(http_port=http_port, rate_limit_key_per_s=0,
                             rate_limit_address_per_s=0)
    async with running(settings, [FUNCTIONS["gateway"]]) as runtime:
        services = runtime.services
        keys = await KeyStore.open(services.bus.js, services.names, settings)
        key_a, _ = await keys.create("alpha")
        key_b, _ = await keys.create("beta")
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=30) as client:
            await until_http_up(client)
            a = {"Authorization": f"Bearer {key_a}"}
            b = {"Authorization": f"Bearer {key_b}"}
            r = await client.post("/v1/uploads", params={"filename": "a.bin"},
                                  content=b"x" * 10, headers=a)
            job = await client.post("/v1/jobs", headers=a, json={
                "steps": NOOP, "input": r.json()["upload_id"]})
            job_id = job.json()["job_id"]
            mine = (await client.get("/v1/jobs", headers=a)).json()["jobs"]
            theirs = (await client.get("/v1/jobs", headers=b)).json()["jobs"]
            assert [j["job_id"] for j in mine] == [job_id] and theirs == []
            assert (await client.get(f"/v1/jobs/{job_id}/events", headers=b)).status_code == 404


async def test_queued_job_shows_its_place_and_step_timings(make_settings, http_port):  # type: ignore[no-untyped-def]
    settings = make_settings(http_port=http_port, **OPEN)
    # Gateway and conductor, no noop worker: planned tasks wait in stages.noop.
    async with running(settings, [FUNCTIONS["gateway"], FUNCTIONS["conductor"]]) as runtime:
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=30) as client:
            await until_http_up(client)
            upload_id = await upload(client)
            ids = [(await client.post("/v1/jobs", json={"steps": NOOP, "input": upload_id}))
                   .json()["job_id"] for _ in range(3)]

            async def planned() -> bool:
                return all([(await runtime.services.jobs.get(i)).planned for i in ids])

            await eventually(planned, what="the conductor planned every job")
            jobs = [(await client.get(f"/v1/jobs/{i}")).json() for i in ids]
    assert [j["queue"] for j in jobs] == [
        {"stage": "noop", "ahead": n, "capped": False} for n in range(3)]
    step = jobs[2]["steps"]["n"]
    assert step["status"] == "ready" and step["attempt"] == 1
    assert step["ready_at"] is not None and step["waited_s"] >= 0
    assert step["elapsed_s"] is None and jobs[2]["percent"] == 0.0
    assert jobs[2]["links"]["events"].endswith(f"/v1/jobs/{ids[2]}/events")


async def test_a_finished_job_has_timings_and_no_queue(make_settings, http_port):  # type: ignore[no-untyped-def]
    settings = make_settings(http_port=http_port, **OPEN)
    functions = [FUNCTIONS[n] for n in ("gateway", "conductor", "noop")]
    async with running(settings, functions):
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=30) as client:
            await until_http_up(client)
            upload_id = await upload(client)
            job_id = (await client.post("/v1/jobs", json={"steps": NOOP, "input": upload_id})
                      ).json()["job_id"]

            async def done() -> bool:
                return (await client.get(f"/v1/jobs/{job_id}")).json()["status"] == "succeeded"

            await eventually(done, what="the job succeeded")
            job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["queue"] is None and job["percent"] == 100.0
    step = job["steps"]["n"]
    assert step["elapsed_s"] is not None and step["elapsed_s"] >= 0
    assert step["waited_s"] is not None and step["deliveries"] == 1


async def test_presign_is_501_on_the_local_store(gateway):  # type: ignore[no-untyped-def]
    _, client = gateway
    r = await client.post("/v1/uploads:presign", params={"filename": "x.mp4"})
    assert r.status_code == 501
    assert r.json()["error"]["code"] == "not_supported"


async def test_presigned_upload_and_download_round_trip_on_s3(  # type: ignore[no-untyped-def]
    make_settings, http_port, s3_server
):
    bucket = unique_bucket()
    settings = make_settings(
        http_port=http_port, store="s3", s3_endpoint=s3_server.endpoint,
        s3_access_key=s3_server.access_key, s3_secret_key=s3_server.secret_key,
        s3_region=s3_server.region, bucket=bucket, presign_expiry_s=120,
        max_upload_bytes=1000, **OPEN)
    functions = [FUNCTIONS[n] for n in ("gateway", "conductor", "noop")]
    async with running(settings, functions) as runtime:
        await runtime.services.store.ensure_ready()
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=30) as client:
            await until_http_up(client)
            r = await client.post("/v1/uploads:presign", params={"filename": "../My Clip.mp4"})
            assert r.status_code == 201, r.text
            grant = r.json()
            assert grant["method"] == "PUT" and grant["filename"] == "My_Clip.mp4"
            assert "X-Amz-Expires=120" in grant["url"]
            put = await client.put(grant["url"], content=b"clip bytes")
            assert put.status_code == 200, put.text
            job = await client.post("/v1/jobs", json={"steps": NOOP,
                                                      "input": grant["upload_id"]})
            assert job.status_code == 202, job.text
            job_id = job.json()["job_id"]
            record = await runtime.services.jobs.get(job_id)
            assert record.inputs[0].key == grant["key"] and record.inputs[0].size == 10

            async def done() -> bool:
                return (await runtime.services.jobs.get(job_id)).status == "succeeded"

            await eventually(done, what="the job on the presigned upload succeeded")

            # Too big for JETCUT_MAX_UPLOAD_BYTES: the PUT cannot be capped, the job can.
            big = (await client.post("/v1/uploads:presign", params={"filename": "b"})).json()
            assert (await client.put(big["url"], content=b"x" * 1001)).status_code == 200
            r = await client.post("/v1/jobs", json={"steps": NOOP, "input": big["upload_id"]})
            assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

            # Outputs: presigned GET URLs on request, gateway URLs otherwise.
            key = f"jobs/{job_id}/n/out.txt"
            await runtime.services.store.put_bytes(key, b"output!")
            await runtime.services.jobs.update(
                job_id, lambda rec: rec.steps["n"].outputs.update({"out": key}))
            plain = (await client.get(f"/v1/jobs/{job_id}/outputs")).json()["outputs"][0]
            assert plain["url"].startswith(settings.base_url) and plain["expires_at"] is None
            direct = (await client.get(f"/v1/jobs/{job_id}/outputs",
                                       params={"presign": "true"})).json()["outputs"][0]
            assert direct["url"].startswith(f"http://{s3_server.endpoint}/")
            assert direct["expires_at"] is not None
            got = await client.get(direct["url"])
            assert got.status_code == 200 and got.content == b"output!"
            assert 'filename="out.txt"' in got.headers["content-disposition"]


async def test_every_documented_operation_has_a_section_in_the_api_doc(gateway):  # type: ignore[no-untyped-def]
    """docs/api.md covers every endpoint: its table lists each method and path."""
    from pathlib import Path

    _, client = gateway
    doc = (await client.get("/v1/openapi.json")).json()
    text = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    for path, ops in doc["paths"].items():
        for method in ops:
            if method in ("get", "post", "delete", "put", "patch"):
                assert f"{method.upper()} {path}" in text, f"docs/api.md lacks {method} {path}"
