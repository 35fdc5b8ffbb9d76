"""Per-function NATS users (infra/nats/auth): real functions work under them, and are refused
what they were not given.

The shipped config is rendered with free ports, a temp store dir and test passwords, and a
real nats-server runs it. The conductor, the probe stage and ingest then each run as their
own user and take a MinIO notification (published as the ``minio`` user) and a CloudEvent
(requested as the ``service`` user) through to finished jobs; a stage user's attempts to
submit jobs, read the submit stream or open another KV bucket are refused by the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.errors import NoRespondersError

from functions.conductor import function as conductor
from functions.ingest import function as ingest
from functions.probe import function as probe
from shared.natsserver import free_ports
from shared.runtime import Runtime
from shared.settings import Settings, load_settings
from tests.support.nats import running, wait_for_job
from tests.support.waiting import eventually
from tests.test_infra_configs import _wait_json, nats_server_bin, with_store_dir

ROOT = Path(__file__).resolve().parents[1]
AUTH = ROOT / "infra" / "nats" / "auth"
CONF = AUTH / "nats-server.conf"
FIXTURE = Path(__file__).parent / "fixtures" / "minio_put_event.json"
DROPPED_KEY = "incoming/my video (1).mp4"


def password(user: str) -> str:
    return f"pw-{user}"


@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[str]:
    """The shipped auth config on loopback ports; its client URL."""
    port, http_port = free_ports(2)
    text = with_store_dir(CONF, tmp_path / "js")
    text, n = re.subn(r"^port:.*$", f"listen: 127.0.0.1:{port}", text, flags=re.M)
    assert n == 1
    text, n = re.subn(r"^http_port:.*$", f"http: 127.0.0.1:{http_port}", text, flags=re.M)
    assert n == 1
    conf = tmp_path / "auth.conf"
    conf.write_text(text)
    env = {**os.environ, **{var: password(var.removeprefix("NATS_PASSWORD_").lower()
                                          .replace("_", "-"))
                            for var in set(re.findall(r"\$(NATS_PASSWORD_[A-Z_]+)", text))}}
    log = tmp_path / "nats.log"
    with subprocess.Popen([nats_server_bin(), "-c", str(conf), "-l", str(log)],
                          env=env) as proc:
        try:
            _wait_json(f"http://127.0.0.1:{http_port}/healthz?js-enabled-only=true", proc)
            yield f"nats://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def settings_for(user: str, url: str, tmp_path: Path, **overrides: Any) -> Settings:
    (tmp_path / "work").mkdir(exist_ok=True)
    return load_settings(
        {}, nats_url=url, nats_user=user, nats_password=password(user), namespace="",
        data_dir=str(tmp_path / "data"), store="local", store_dir=str(tmp_path / "store"),
        work_dir=str(tmp_path / "work"), fetch_timeout_s=0.5, drain_grace_s=5.0,
        **overrides,
    )


@contextlib.asynccontextmanager
async def client(url: str, user: str) -> AsyncIterator[tuple[nats.NATS, list[str]]]:
    """A plain connection as ``user`` and the errors the server sent it."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(url, user=user, password=password(user), error_cb=on_error,
                            max_reconnect_attempts=0)
    try:
        yield nc, errors
    finally:
        await nc.close()


def refused(errors: list[str], what: str) -> bool:
    """The server answered ``-ERR 'Permissions Violation for <what>'`` (nats-py lowercases)."""
    return any(f"permissions violation for {what}".lower() in e.lower() for e in errors)


def test_committed_files_are_the_renderers_output() -> None:
    result = subprocess.run([sys.executable, str(AUTH / "render.py"), "--check"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


def test_every_consumer_of_every_function_has_a_user() -> None:
    """A new function or durable without permissions would fail only in an auth deployment."""
    from functions.registry import FUNCTIONS

    text = CONF.read_text()
    for name, fn in FUNCTIONS.items():
        assert f"{{user: {name}, " in text, f"no NATS user for function {name!r}"
        for sub in fn.subscriptions:
            assert f".{sub.durable}" in text, f"{name}: consumer {sub.durable} not permitted"


async def test_functions_run_as_their_own_users_and_are_refused_the_rest(  # type: ignore[no-untyped-def]
        auth_server, tmp_path, clip_3s) -> None:
    url = auth_server
    rules = [{"prefix": "incoming/", "steps": {"probe": {"stage": "probe",
                                                         "uses": [":input"]}}}]
    async with contextlib.AsyncExitStack() as stack:
        runtimes: dict[str, Runtime] = {}
        for fn in (conductor, probe, ingest):
            settings = settings_for(fn.name, url, tmp_path, ingest_rules=rules)
            runtimes[fn.name] = await stack.enter_async_context(
                running(settings, [fn], name=fn.name))
        services = runtimes["conductor"].services
        assert services is not None
        await services.store.put_file(DROPPED_KEY, clip_3s)
        await services.store.put_file("uploads/default/u/clip.mp4", clip_3s)

        # MinIO, as its own user, may publish its notifications (and gets the PubAck).
        async with client(url, "minio") as (nc, errors):
            ack = await nc.jetstream().publish("ingest.minio", FIXTURE.read_bytes())
            assert ack.stream == "INGEST"
            await nc.publish("jobs.submit", b"{}")
            await nc.flush()
            await eventually(lambda: refused(errors, 'publish to "jobs.submit"'),
                             what="minio refused jobs.submit")

        # Another service, as `service`, asks ingest for a job and gets its id back.
        event = {"specversion": "1.0", "type": "io.jetcut.job.request", "source": "urn:t",
                 "id": "1", "data": {"steps": rules[0]["steps"],
                                     "input": "uploads/default/u/clip.mp4"}}
        async with client(url, "service") as (nc, _):
            replies: list[bytes] = []

            async def answered() -> bool:
                try:
                    msg = await nc.request("ingest.request", json.dumps(event).encode(),
                                           timeout=15)
                except NoRespondersError:
                    return False  # ingest's responder is not subscribed yet
                replies.append(msg.data)
                return True

            await eventually(answered, what="ingest answering")
        requested = json.loads(replies[0])["job_id"]

        async def two_jobs() -> bool:
            return len(await services.jobs.job_ids()) == 2

        await eventually(two_jobs, timeout=15, what="the notification's job and the request's")
        for job_id in await services.jobs.job_ids():
            record = await wait_for_job(services, job_id)
            assert record.status == "succeeded", (job_id, record.error)
        assert requested in await services.jobs.job_ids()

        # A stage's user: its own work is allowed, anything else is refused by the server.
        async with client(url, "probe") as (nc, errors):
            js = nc.jetstream(timeout=1)
            ack = await js.publish("events.default.jx", b"{}")  # progress events: allowed
            assert ack.stream == "EVENTS"
            await nc.publish("jobs.submit", b"{}")
            await nc.subscribe("jobs.submit")
            with pytest.raises((nats.errors.TimeoutError, asyncio.TimeoutError)):
                await js.key_value("keys")  # another bucket: the API call never gets through
            await nc.flush()
            for what in ('publish to "jobs.submit"', 'subscription to "jobs.submit"',
                         'publish to "$JS.API.STREAM.INFO.KV_keys"'):
                await eventually(lambda w=what: refused(errors, w),  # type: ignore[misc]
                                 what=f"refusal: {what}")
