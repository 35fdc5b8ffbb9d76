"""Gateway behaviour at the edges: idempotency, conflicts, limits, error shape."""

from __future__ import annotations

import logging

import httpx
import nats.errors
import pytest

from functions.registry import FUNCTIONS
from tests.support.nats import running, serving_http, until_http_up, upload, wait_for_job

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def gateway_only(make_settings, http_port):  # type: ignore[no-untyped-def]
    """Just the gateway: nothing consumes jobs.submit, so accepted jobs stay queued."""
    settings = make_settings(http_port=http_port, max_upload_bytes=1000)
    async with serving_http(settings, [FUNCTIONS["gateway"]]) as (runtime, client):
        yield runtime, client


async def _upload(client: httpx.AsyncClient, data: bytes = b"x" * 100) -> str:
    return await upload(client, data, "a.mp4")


async def test_repeat_with_same_key_and_body_is_the_same_job(gateway_only):  # type: ignore[no-untyped-def]
    runtime, client = gateway_only
    upload = await _upload(client)
    body = {"recipe": "web", "input": upload}
    first = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k"})
    again = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k"})
    assert first.status_code == again.status_code == 202
    assert first.json()["job_id"] == again.json()["job_id"]
    # ... and the submit is on the stream once, even though the repeat re-published it
    info = await runtime.services.bus.js.stream_info(runtime.names.jobs_stream)
    assert info.state.messages == 1


async def test_same_key_different_request_is_a_conflict(gateway_only):  # type: ignore[no-untyped-def]
    _, client = gateway_only
    upload = await _upload(client)
    await client.post("/v1/jobs", json={"recipe": "web", "input": upload},
                      headers={"Idempotency-Key": "k2"})
    r = await client.post("/v1/jobs", json={"recipe": "web", "input": upload,
                                            "params": {"max_height": 360}},
                          headers={"Idempotency-Key": "k2"})
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "conflict"


@pytest.mark.parametrize(("body", "status", "code"), [
    (b"not json", 400, "invalid_request"),
    (b'{"recipe": "web"}', 422, "invalid_request"),
    (b'{"recipe": "web", "input": "u' + b"a" * 26 + b'"}', 422, "input_not_found"),
    (b'{"recipe": "web", "input": "../etc/passwd"}', 422, "invalid_request"),
    (b'{"recipe": "nope", "input": "x"}', 422, "invalid_recipe"),
    (b'{"recipe": "web", "input": "x", "surprise": 1}', 400, "invalid_request"),
    (b'{"steps": {"a": {"stage": "probe", "uses": ["b"]}}, "input": "x"}', 422,
     "invalid_recipe"),
])
async def test_bad_job_requests_get_a_specific_error(gateway_only, body, status, code):  # type: ignore[no-untyped-def]
    _, client = gateway_only
    r = await client.post("/v1/jobs", content=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


async def test_limits_answer_413_with_payload_too_large(gateway_only):  # type: ignore[no-untyped-def]
    _, client = gateway_only
    r = await client.post("/v1/uploads", params={"filename": "big.mp4"}, content=b"x" * 1001)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    r = await client.post("/v1/jobs", content=b'{"params": "' + b"x" * 1_100_000 + b'"}')
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


async def test_unknown_job_and_route_are_404_in_the_error_shape(gateway_only):  # type: ignore[no-untyped-def]
    _, client = gateway_only
    for path in ("/v1/jobs/jnope", "/v1/jobs/jnope/outputs", "/v1/nothing-here",
                 "/v1/jobs/bad..key"):
        r = await client.get(path)
        assert r.status_code == 404, path
        assert r.json()["error"]["code"] == "not_found"


async def test_readyz_reports_each_check(gateway_only):  # type: ignore[no-untyped-def]
    _, client = gateway_only
    r = await client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"ready": True, "checks": {"nats": "ok", "store": "ok"}}


async def test_a_queued_job_is_picked_up_when_the_conductor_starts(  # type: ignore[no-untyped-def]
    make_settings, http_port, clip_3s
):
    settings = make_settings(http_port=http_port)
    async with running(settings, [FUNCTIONS["gateway"]]) as gw:
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=30) as client:
            await until_http_up(client)
            r = await client.post("/v1/uploads", params={"filename": "c.mp4"},
                                  content=clip_3s.read_bytes())
            job = await client.post("/v1/jobs", json={"recipe": "web",
                                                      "input": r.json()["upload_id"]})
            job_id = job.json()["job_id"]
        # The rest of the system starts only now: the accepted job waited in the stream.
        others = [f for name, f in FUNCTIONS.items() if name != "gateway"]
        async with running(settings, others) as rest:
            record = await wait_for_job(rest.services, job_id)
            assert record.status == "succeeded"
        assert gw.services is not None


@pytest.mark.parametrize("exc", [nats.errors.TimeoutError(), nats.errors.NoRespondersError(),
                                 nats.errors.ConnectionClosedError()])
def test_nats_trouble_anywhere_in_a_request_is_a_503_not_a_500(exc: Exception) -> None:
    # Seen for real in the chaos run: a KV write timing out while nats-server restarted.
    from functions.gateway.errors import on_error

    class Req:
        method, url = "POST", type("U", (), {"path": "/v1/jobs"})()

    response = on_error(Req(), exc)  # type: ignore[arg-type]
    assert response.status_code == 503
    assert response.content["error"]["code"] == "bus_unavailable"
    assert response.headers["Retry-After"] == "1"


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/dlq/999999999999999999999999999999"),  # NATS refuses the number
    ("DELETE", "/v1/dlq/%C2%B2"),  # "²".isdigit() is true, int("²") fails
    ("POST", "/v1/dlq/%C2%B2:replay"),
    ("GET", "/v1/dlq/0"),
    ("GET", "/v1/dlq/-1"),
    ("GET", "/v1/dlq?after=999999999999999999999999999999"),
    ("GET", "/v1/dlq?after=-1"),
    ("GET", "/v1/dlq?limit=0"),
    ("GET", "/v1/jobs?limit=999999999999999999999999999999"),
    ("GET", "/v1/jobs/jnope/events?last_event_id=999999999999999999999999999999"),
])
async def test_bad_path_and_query_parameters_are_400_at_the_edge(  # type: ignore[no-untyped-def]
        gateway_only, caplog, method, path):
    _, client = gateway_only
    with caplog.at_level(logging.WARNING):
        r = await client.request(method, path)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_request"
    # A client's mistake is no server error: nothing logged, no trace anywhere.
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR], caplog.text
    assert "Traceback" not in caplog.text and "Traceback" not in r.text


async def test_the_largest_sequence_is_a_plain_404(gateway_only):  # type: ignore[no-untyped-def]
    _, client = gateway_only
    r = await client.get(f"/v1/dlq/{10**15 - 1}")
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "not_found"


def test_an_unexpected_error_is_logged_once_with_its_trace_id(caplog) -> None:  # type: ignore[no-untyped-def]
    from opentelemetry.sdk.trace import TracerProvider

    from functions.gateway.errors import on_error

    class Req:
        method, url = "GET", type("U", (), {"path": "/v1/jobs"})()

    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("GET /v1/jobs") as span, \
            caplog.at_level(logging.ERROR, logger="jetcut.gateway"):
        response = on_error(Req(), RuntimeError("secret detail"))  # type: ignore[arg-type]
    trace_id = format(span.get_span_context().trace_id, "032x")
    assert response.status_code == 500
    assert response.content["error"]["code"] == "internal"
    assert response.content["error"]["details"] == {"trace_id": trace_id}
    assert "secret detail" not in str(response.content)
    logged = [rec for rec in caplog.records if rec.name == "jetcut.gateway"]
    assert len(logged) == 1 and trace_id in logged[0].getMessage()
    assert logged[0].exc_info is not None  # the trace is in the log, for the operator


async def test_a_wrong_method_is_405_with_allow_and_options_lists_every_method(  # type: ignore[no-untyped-def]
        gateway_only):
    _, client = gateway_only
    r = await client.put("/v1/jobs")
    assert r.status_code == 405, r.text
    assert {m.strip() for m in r.headers["allow"].split(",")} >= {"GET", "POST"}
    assert r.json()["error"]["code"] == "invalid_request"
    # Every method the path serves, though its handlers come from one controller each.
    for path, methods in (("/v1/jobs", {"GET", "POST"}),
                          ("/v1/jobs/jnope", {"GET", "POST", "DELETE"}),
                          ("/v1/dlq/1", {"GET", "POST", "DELETE"})):
        r = await client.options(path)
        assert r.status_code == 204, r.text
        assert {m.strip() for m in r.headers["allow"].split(",")} == methods | {"OPTIONS"}


def test_every_error_code_has_an_http_status() -> None:
    from functions.gateway.errors import STATUS, status_of
    from shared.errors import ErrorCode, JetcutError, MalformedRequest, PermanentError

    # A code added to shared/errors.py gets its status in the one table, or this fails;
    # the exceptions are codes only a step or job carries, never an HTTP answer.
    missing = set(ErrorCode) - set(STATUS) - {ErrorCode.CANCELLED, ErrorCode.LEASE_LOST,
                                              ErrorCode.TIMEOUT, ErrorCode.FFMPEG_FAILED,
                                              ErrorCode.RETRIES_EXHAUSTED, ErrorCode.DISK_FULL,
                                              ErrorCode.HANDED_BACK, ErrorCode.OUTPUT_CHECK_FAILED}
    assert not missing, missing
    assert status_of(MalformedRequest("x")) == 400
    assert status_of(PermanentError(ErrorCode.INVALID_REQUEST, "x")) == 422
    assert status_of(JetcutError("x", code=ErrorCode.BUS_UNAVAILABLE)) == 503
