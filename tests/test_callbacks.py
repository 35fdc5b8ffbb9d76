"""Job callbacks (webhooks) end to end: the real gateway, conductor, noop stage and notify
function on a real nats-server, POSTing to a real HTTP receiver on loopback.

The receiver runs ``http.server`` in a thread; it records every request and answers with
the status its plan says (500 for the first N requests, or always). Waiting is on what
the receiver saw or on the metric, never on time.
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import msgspec
import pytest

from functions.registry import FUNCTIONS
from shared.callbacks import signature_header, verify
from shared.events import InputRef, JobSubmit, StepSpec
from shared.ids import new_job_id, new_upload_id
from shared.runtime import Runtime
from shared.settings import Settings
from tests.support.nats import consumer_settled, running, serving_http, until_http_up
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(90)

SECRET = "s3cret-s3cret-s3cret"
STEPS = {"n": {"stage": "noop", "uses": [":input"]}}


class Receiver:
    """A real HTTP server that records callbacks and fails the first ``fail_first``."""

    def __init__(self, fail_first: int = 0, always_fail: bool = False) -> None:
        self.fail_first = fail_first
        self.always_fail = always_fail
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    n = len(receiver.requests)
                    failed = receiver.always_fail or n < receiver.fail_first
                    receiver.requests.append({"path": self.path, "headers": dict(self.headers),
                                              "body": body, "answered": 500 if failed else 204})
                self.send_response(500 if failed else 204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/jetcut?src=test"

    def events(self, *, answered: int | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(r["body"]) for r in self.requests
                    if answered is None or r["answered"] == answered]

    def delivered(self, status: str) -> bool:
        return any(e["status"] == status for e in self.events(answered=204))


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


def _settings(make_settings: Callable[..., Settings], http_port: int,
              **overrides: Any) -> Settings:
    policy = {"notify": {"max_deliver": 3, "backoff_base_s": 0.05, "backoff_max_s": 0.1}}
    base: dict[str, Any] = {"http_port": http_port, "allow_anonymous": True,
                            "callback_allow_private": True, "retry_policy": policy}
    return make_settings(**{**base, **overrides})


@pytest.fixture
async def stack(make_settings: Callable[..., Settings],
                http_port: int) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient]]:
    settings = _settings(make_settings, http_port)
    functions = [FUNCTIONS[n] for n in ("gateway", "conductor", "noop", "notify")]
    async with serving_http(settings, functions) as (runtime, client):
        yield runtime, client


async def _submit(client: httpx.AsyncClient, **fields: Any) -> httpx.Response:
    r = await client.post("/v1/uploads", params={"filename": "a.bin"}, content=b"x" * 100)
    assert r.status_code == 201, r.text
    return await client.post("/v1/jobs", json={"steps": STEPS, "input": r.json()["upload_id"],
                                                **fields})


def _metric(runtime: Runtime, outcome: str) -> float:
    assert runtime.services is not None
    value = runtime.services.telemetry.registry.get_sample_value(
        "jetcut_callbacks_total", {"outcome": outcome})
    return value or 0.0


async def test_status_changes_arrive_signed(stack: tuple[Runtime, httpx.AsyncClient],
                                            receiver: Receiver) -> None:
    runtime, client = stack
    r = await _submit(client, callback_url=receiver.url, callback_secret=SECRET)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert "callback_secret" not in r.text  # the API never shows the secret back

    await eventually(lambda: receiver.delivered("succeeded"), timeout=30,
                     what="the succeeded callback")
    with receiver.lock:
        requests = list(receiver.requests)
    assert {json.loads(q["body"])["status"] for q in requests} >= {"queued", "succeeded"}
    for q in requests:
        headers = {k.lower(): v for k, v in q["headers"].items()}
        assert q["path"] == "/hooks/jetcut?src=test"
        assert headers["content-type"] == "application/json"
        assert headers["host"] == f"127.0.0.1:{receiver.server.server_address[1]}"
        assert verify(SECRET, headers["x-jetcut-signature"], q["body"])
        assert not verify("another-secret-entirely", headers["x-jetcut-signature"], q["body"])
        assert not verify(SECRET, headers["x-jetcut-signature"], q["body"] + b" ")
        body = json.loads(q["body"])
        assert body["job_id"] == job_id and body["type"] == "job.status"
        assert headers["x-jetcut-event-id"] == body["id"]
    assert _metric(runtime, "delivered") >= 2


async def test_a_failing_receiver_gets_the_event_on_retry(
    stack: tuple[Runtime, httpx.AsyncClient], receiver: Receiver
) -> None:
    runtime, client = stack
    receiver.fail_first = 2
    r = await _submit(client, callback_url=receiver.url, callback_secret=SECRET)
    assert r.status_code == 202, r.text

    await eventually(lambda: receiver.delivered("succeeded") and receiver.delivered("queued"),
                     timeout=30, what="both callbacks delivered after failures")
    failed = receiver.events(answered=500)
    assert len(failed) == 2
    # Each failed event comes again. Not only queued's: the first two POSTs may have been
    # queued's and running's, and running's retry can land after succeeded's delivery.
    await eventually(lambda: {e["id"] for e in failed}
                     <= {e["id"] for e in receiver.events(answered=204)},
                     timeout=30, what="every failed event delivered on a retry")
    assert max(e["attempt"] for e in receiver.events(answered=204)) >= 2
    assert _metric(runtime, "retried") == 2


async def test_a_receiver_that_always_fails_is_given_up_on(
    stack: tuple[Runtime, httpx.AsyncClient], receiver: Receiver
) -> None:
    runtime, client = stack
    receiver.always_fail = True
    r = await _submit(client, callback_url=receiver.url, callback_secret=SECRET)
    assert r.status_code == 202, r.text

    def succeeded_attempts() -> list[int]:
        return [e["attempt"] for e in receiver.events() if e["status"] == "succeeded"]

    await eventually(lambda: len(succeeded_attempts()) >= 3, timeout=30,
                     what="three attempts at the succeeded callback")
    assert runtime.services is not None
    pending = await consumer_settled(runtime.services, runtime.names.events_stream,
                                     "notify-events", timeout=10)
    assert pending == (0, 0)  # given up and acked: nothing left to redeliver
    assert sorted(succeeded_attempts()) == [1, 2, 3]  # bounded: max_deliver 3, no more
    await eventually(lambda: _metric(runtime, "given_up") >= 1, what="the given_up metric")


@pytest.mark.parametrize(("url", "reason"), [
    ("http://127.0.0.1:9/hook", "private_address"),
    ("http://localhost:8080/hook", "private_address"),
    ("http://10.1.2.3/hook", "private_address"),
    ("http://169.254.169.254/latest/meta-data", "private_address"),
    ("http://[::1]/hook", "private_address"),
    ("http://[::ffff:127.0.0.1]/hook", "private_address"),
    ("http://100.64.0.1/hook", "private_address"),
    ("file:///etc/passwd", "scheme"),
    ("gopher://example.com/", "scheme"),
    ("http://user:pw@example.com/hook", "credentials"),
    ("http://@example.com/hook", "credentials"),
    ("http:///nohost", "malformed"),
    ("http://example.com:99999/", "malformed"),
])
async def test_refused_callback_urls_are_422_at_submit(
    make_settings: Callable[..., Settings], http_port: int, url: str, reason: str
) -> None:
    settings = _settings(make_settings, http_port, callback_allow_private=False)
    async with running(settings, [FUNCTIONS["gateway"]]):
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=30) as client:
            await until_http_up(client)
            r = await _submit(client, callback_url=url, callback_secret=SECRET)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_callback" and error["details"]["reason"] == reason, error


async def test_a_callback_needs_a_secret_to_sign_with(
    stack: tuple[Runtime, httpx.AsyncClient], receiver: Receiver
) -> None:
    _, client = stack
    r = await _submit(client, callback_url=receiver.url)
    assert r.status_code == 422 and r.json()["error"]["details"]["reason"] == "secret", r.text
    r = await _submit(client, callback_url=receiver.url, callback_secret="short")
    assert r.status_code == 422 and r.json()["error"]["details"]["reason"] == "secret", r.text


async def test_send_time_check_refuses_what_the_gateway_never_saw(
    make_settings: Callable[..., Settings], http_port: int, receiver: Receiver
) -> None:
    # A JobSubmit published straight on the bus names a loopback URL: notify checks the
    # addresses again when it sends, and calls nobody.
    settings = _settings(make_settings, http_port, callback_allow_private=False,
                         callback_secret=SECRET)
    functions = [FUNCTIONS[n] for n in ("conductor", "noop", "notify")]
    async with running(settings, functions) as runtime:
        services = runtime.services
        assert services is not None
        key = f"uploads/default/{new_upload_id()}/a.bin"
        await services.store.put_bytes(key, b"x" * 10, "application/octet-stream")
        job_id = new_job_id()
        event = JobSubmit(job_id=job_id, inputs=[InputRef(key=key, filename="a.bin", size=10)],
                          steps=msgspec.convert(STEPS, dict[str, StepSpec]),
                          callback_url=receiver.url)
        await services.bus.publish(services.names.submit, event, msg_id=job_id)
        await eventually(lambda: _metric(runtime, "refused") >= 2, timeout=30,
                         what="queued and succeeded callbacks refused")
    assert receiver.requests == []


def test_signature_verification() -> None:
    body = b'{"status":"succeeded"}'
    header = signature_header(SECRET, body, timestamp=1_700_000_000)
    assert header.startswith("t=1700000000,v1=")
    assert verify(SECRET, header, body, now=1_700_000_100)
    assert not verify(SECRET, header, body, now=1_700_000_000 + 301)  # replayed too late
    assert not verify(SECRET, header, body.replace(b"succeeded", b"failed"), now=1_700_000_000)
    assert not verify(SECRET, "t=abc,v1=00", body)
    assert not verify(SECRET, "", body)
