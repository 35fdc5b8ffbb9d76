"""shared.k8s_podcost: a worker's pod-deletion-cost follows the tasks it holds.

There is no Kubernetes API server here, so the test serves the one endpoint the module uses
(PATCH /api/v1/namespaces/<ns>/pods/<name> with a JSON merge patch) over real HTTP on
loopback, checking the bearer token and content type the way the API server does, and
applying the merge patch to the pod's annotations.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.k8s_podcost import ANNOTATION, PodDeletionCost, PodRef, pod_from_environment


class FakePodApi(ThreadingHTTPServer):
    """One pod's annotations behind the pods PATCH endpoint; records every request."""

    def __init__(self, token: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.token = token
        self.annotations: dict[str, str] = {}
        self.requests: list[dict[str, Any]] = []
        self.refuse = False

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: FakePodApi

    def do_PATCH(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.requests.append({"path": self.path, "headers": dict(self.headers),
                                     "body": json.loads(body)})
        if self.headers["Authorization"] != f"Bearer {self.server.token}":
            return self._answer(401, {"reason": "Unauthorized"})
        if self.headers["Content-Type"] != "application/merge-patch+json":
            return self._answer(415, {"reason": "UnsupportedMediaType"})
        if self.server.refuse:
            return self._answer(403, {"reason": "Forbidden"})
        if self.path != "/api/v1/namespaces/jetcut/pods/encode-part-5c4b-q8z":
            return self._answer(404, {"reason": "NotFound"})
        self.server.annotations.update(json.loads(body)["metadata"]["annotations"])
        self._answer(200, {"metadata": {"annotations": self.server.annotations}})

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def api() -> Iterator[FakePodApi]:
    server = FakePodApi(token="token-1")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def service_account(tmp_path: Path, token: str = "token-1") -> Path:
    sa = tmp_path / "serviceaccount"
    sa.mkdir(exist_ok=True)
    (sa / "token").write_text(token + "\n")
    (sa / "namespace").write_text("jetcut")
    return sa


def pod(api: FakePodApi, tmp_path: Path) -> PodRef:
    return PodRef(api_url=api.url, namespace="jetcut", name="encode-part-5c4b-q8z",
                  token_file=service_account(tmp_path) / "token")


def test_pod_is_read_from_what_the_kubelet_provides(tmp_path: Path) -> None:
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443",
           "HOSTNAME": "encode-part-5c4b-q8z"}
    # No token mounted (every non-stage pod): nothing to do.
    assert pod_from_environment(env, tmp_path / "absent") is None
    sa = service_account(tmp_path)
    ref = pod_from_environment(env, sa)
    assert ref == PodRef("https://10.96.0.1:443", "jetcut", "encode-part-5c4b-q8z",
                         sa / "token", None)
    assert ref.pod_url == "https://10.96.0.1:443/api/v1/namespaces/jetcut/pods/encode-part-5c4b-q8z"
    # Outside Kubernetes (no service host), even with a token file: nothing.
    assert pod_from_environment({"HOSTNAME": "x"}, sa) is None
    ipv6 = pod_from_environment({**env, "KUBERNETES_SERVICE_HOST": "fd00::1"}, sa)
    assert ipv6 is not None and ipv6.api_url == "https://[fd00::1]:443"


async def test_cost_follows_tasks_in_hand_and_writes_only_changes(
    api: FakePodApi, tmp_path: Path
) -> None:
    async with httpx.AsyncClient() as client:
        cost = PodDeletionCost(pod(api, tmp_path), client)
        await cost.update(1)
        assert api.annotations == {ANNOTATION: "1"}
        await cost.update(1)                      # unchanged: no API write
        assert len(api.requests) == 1
        await cost.update(0)
        assert api.annotations == {ANNOTATION: "0"}
        assert cost.written == 0
    (first, second) = api.requests
    assert first["headers"]["Content-Type"] == "application/merge-patch+json"
    assert first["body"] == {"metadata": {"annotations": {ANNOTATION: "1"}}}
    assert second["body"] == {"metadata": {"annotations": {ANNOTATION: "0"}}}


async def test_a_refused_write_is_logged_and_retried_on_the_next_change(
    api: FakePodApi, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    api.refuse = True
    async with httpx.AsyncClient() as client:
        cost = PodDeletionCost(pod(api, tmp_path), client)
        with caplog.at_level(logging.WARNING, logger="shared.k8s_podcost"):
            await cost.update(1)                  # must not raise: the task goes on
        assert "HTTP 403" in caplog.text
        assert cost.written is None and api.annotations == {}
        api.refuse = False
        await cost.update(1)                      # same value, but never written: retried
        assert api.annotations == {ANNOTATION: "1"}


async def test_rotated_token_is_used_and_an_unreachable_api_is_survived(
    api: FakePodApi, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ref = pod(api, tmp_path)
    async with httpx.AsyncClient() as client:
        cost = PodDeletionCost(ref, client)
        await cost.update(2)
        ref.token_file.write_text("token-2")     # the kubelet rotated the projected token
        api.token = "token-2"
        await cost.update(0)
        assert api.annotations == {ANNOTATION: "0"}
        closed = PodDeletionCost(PodRef("http://127.0.0.1:9", "jetcut", "p", ref.token_file),
                                 client)
        with caplog.at_level(logging.WARNING, logger="shared.k8s_podcost"):
            await closed.update(1)
        assert "could not set" in caplog.text and closed.written is None


async def test_a_stage_worker_marks_its_pod_busy_while_it_holds_a_task(
    api: FakePodApi, tmp_path: Path, make_settings: Any
) -> None:
    """The runtime wires it: a real noop task through the bus makes the cost 1, then 0."""
    from functions.registry import FUNCTIONS
    from tests.support.nats import running, submit_job, wait_for_job

    source = tmp_path / "in.bin"
    source.write_bytes(b"x" * 10)
    functions = [FUNCTIONS["conductor"], FUNCTIONS["noop"]]
    async with running(make_settings(), functions, pod=pod(api, tmp_path)) as runtime:
        assert runtime.services is not None
        job_id = await submit_job(runtime, [source],
                                  steps={"n": {"stage": "noop", "uses": [":input"]}})
        record = await wait_for_job(runtime.services, job_id)
        assert record.status == "succeeded"
    # Stopped: every write has landed (close waits for them), and the pod is idle again.
    written = [r["body"]["metadata"]["annotations"][ANNOTATION] for r in api.requests]
    assert "1" in written, written
    assert written[-1] == "0" and api.annotations == {ANNOTATION: "0"}


async def test_a_worker_outside_kubernetes_only_counts(make_settings: Any, tmp_path: Path) -> None:
    from functions.registry import FUNCTIONS
    from tests.support.nats import running

    async with running(make_settings(), [FUNCTIONS["noop"]]) as runtime:
        assert runtime.in_hand is not None and runtime.in_hand.count == 0
    async with running(make_settings(), [FUNCTIONS["conductor"]]) as runtime:
        assert runtime.in_hand is None  # no stage subscriptions: nothing to count
