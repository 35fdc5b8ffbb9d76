"""API keys and tenants through the real gateway: who may call, and what each tenant sees.

Keys are minted in the real KV bucket (``shared.keys``, or the ``jetcut keys`` CLI as a real
subprocess); every request goes over HTTP to the gateway served in-process.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from functions.registry import FUNCTIONS
from shared.function import Services
from shared.jobstate import JobRecord, JobStatus, StepState, StepStatus
from shared.keys import KeyStore
from shared.settings import Settings, env_name
from tests.support.nats import running, until_http_up

pytestmark = pytest.mark.timeout(90)

JETCUT = str(Path(sys.executable).parent / "jetcut")


class Gateway:
    """A gateway with API keys required, and a way to mint keys for it."""

    def __init__(self, settings: Settings, services: Services, client: httpx.AsyncClient):
        self.settings = settings
        self.services = services
        self.client = client

    async def keys(self) -> KeyStore:
        return await KeyStore.open(self.services.bus.js, self.services.names, self.settings)

    async def key(self, tenant: str, *, admin: bool = False) -> dict[str, str]:
        key, _ = await (await self.keys()).create(tenant, admin=admin)
        return {"Authorization": f"Bearer {key}"}

    async def upload(self, headers: dict[str, str], data: bytes = b"x" * 100) -> dict[str, Any]:
        r = await self.client.post("/v1/uploads", params={"filename": "a.mp4"}, content=data,
                                   headers=headers)
        assert r.status_code == 201, r.text
        return dict(r.json())

    async def submit(self, headers: dict[str, str]) -> str:
        upload = await self.upload(headers)
        r = await self.client.post("/v1/jobs", json={"recipe": "web",
                                                     "input": upload["upload_id"]},
                                   headers=headers)
        assert r.status_code == 202, r.text
        return str(r.json()["job_id"])


@pytest.fixture
async def gateway(make_settings, http_port) -> AsyncIterator[Gateway]:  # type: ignore[no-untyped-def]
    """Just the gateway, keys required: accepted jobs stay queued (nothing consumes them)."""
    settings = make_settings(http_port=http_port, allow_anonymous=False)
    async with running(settings, [FUNCTIONS["gateway"]]) as runtime:
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=30) as client:
            await until_http_up(client)
            assert runtime.services is not None
            yield Gateway(settings, runtime.services, client)


def _assert_401(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "unauthorized"
    assert r.headers["www-authenticate"].startswith('Bearer realm="jetcut"')


async def test_requests_without_a_valid_key_are_401(gateway: Gateway) -> None:
    client = gateway.client
    real = (await gateway.key("acme"))["Authorization"].removeprefix("Bearer ")
    key_id = real.split("_")[1]
    wrong_secret = f"jc_{key_id}_{'A' * 43}"
    unknown_id = f"jc_{'a' * 16}_{real.split('_', 2)[2]}"
    for headers in ({}, {"Authorization": "Bearer nonsense"},
                    {"Authorization": f"Bearer {wrong_secret}"},
                    {"Authorization": f"Bearer {unknown_id}"},
                    {"Authorization": f"Basic {real}"},
                    {"Authorization": "Bearer"},
                    {"X-API-Key": "jc_" + "x" * 200}):
        for method, path in (("GET", "/v1/jobs/jnope"), ("POST", "/v1/jobs"),
                             ("POST", "/v1/uploads"), ("GET", "/v1/dlq")):
            _assert_401(await client.request(method, path, headers=headers))
    # the same key, valid, works both ways of sending it
    assert (await client.get("/v1/jobs/jnope", headers={"Authorization": f"Bearer {real}"})
            ).status_code == 404
    assert (await client.get("/v1/jobs/jnope", headers={"X-API-Key": real})).status_code == 404
    assert "error=" not in (await client.get("/v1/jobs/x")).headers["www-authenticate"]


async def test_a_revoked_key_is_refused_at_once(gateway: Gateway) -> None:
    headers = await gateway.key("acme")
    job_id = await gateway.submit(headers)
    assert (await gateway.client.get(f"/v1/jobs/{job_id}", headers=headers)).status_code == 200
    key_id = headers["Authorization"].split("_")[1]
    revoked = await (await gateway.keys()).revoke(key_id)
    assert revoked is not None and revoked.revoked_at is not None
    _assert_401(await gateway.client.get(f"/v1/jobs/{job_id}", headers=headers))


async def test_the_key_store_keeps_only_a_hash(gateway: Gateway) -> None:
    store = await gateway.keys()
    key, record = await store.create("acme", name="ci")
    stored = await store.kv.get(record.key_id)
    assert stored.value is not None
    assert key.encode() not in stored.value and key.split("_", 2)[2].encode() not in stored.value
    assert record.sha256.encode() in stored.value


async def test_another_tenants_job_is_404_on_every_route(gateway: Gateway) -> None:
    client = gateway.client
    acme, globex = await gateway.key("acme"), await gateway.key("globex")
    queued = await gateway.submit(acme)
    # A finished job of acme's with a real output object, so the download route has
    # something to hide.
    upload = await gateway.upload(acme, b"output bytes")
    done = "jdoneacme"
    await gateway.services.jobs.create(JobRecord(
        job_id=done, tenant="acme", status=JobStatus.FAILED,
        steps={"copy": StepState(stage="noop", status=StepStatus.DONE,
                                 outputs={"file": upload["key"]})}))
    assert (await client.get(f"/v1/jobs/{done}/outputs/copy/file", headers=acme)
            ).content == b"output bytes"

    missing = "jnosuchjob"
    for job_id in (queued, done):
        for method, path in (("GET", "/v1/jobs/{}"), ("DELETE", "/v1/jobs/{}"),
                             ("POST", "/v1/jobs/{}:retry"), ("GET", "/v1/jobs/{}/outputs"),
                             ("GET", "/v1/jobs/{}/outputs/copy/file")):
            theirs = await client.request(method, path.format(job_id), headers=globex)
            nothing = await client.request(method, path.format(missing), headers=globex)
            assert theirs.status_code == nothing.status_code == 404, (method, path, theirs.text)
            assert theirs.json()["error"]["code"] == "not_found"
            # the body says no more than a missing job's does
            assert theirs.text.replace(job_id, missing) == nothing.text
    # ...and the owner still sees both, untouched
    assert (await client.get(f"/v1/jobs/{queued}", headers=acme)).json()["status"] == "queued"
    assert (await client.get(f"/v1/jobs/{done}/outputs", headers=acme)).status_code == 200


async def test_uploads_are_scoped_to_the_callers_tenant(gateway: Gateway) -> None:
    acme, globex = await gateway.key("acme"), await gateway.key("globex")
    upload = await gateway.upload(acme)
    assert upload["key"].startswith("uploads/acme/")
    for ref, code in ((upload["upload_id"], "input_not_found"),
                      (upload["key"], "invalid_request")):
        r = await gateway.client.post("/v1/jobs", json={"recipe": "web", "input": ref},
                                      headers=globex)
        assert r.status_code == 422 and r.json()["error"]["code"] == code, r.text


async def test_dead_letters_need_an_admin_key(gateway: Gateway) -> None:
    client = gateway.client
    tenant, admin = await gateway.key("acme"), await gateway.key("ops", admin=True)
    for method, path in (("GET", "/v1/dlq"), ("GET", "/v1/dlq/1"), ("POST", "/v1/dlq/1:replay"),
                         ("DELETE", "/v1/dlq/1"), ("DELETE", "/v1/dlq?all=true")):
        r = await client.request(method, path, headers=tenant)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.text
    r = await client.get("/v1/dlq", headers=admin)
    assert r.status_code == 200 and r.json()["entries"] == []
    assert (await client.get("/v1/dlq/1", headers=admin)).status_code == 404


async def test_probes_and_metrics_need_no_key(gateway: Gateway) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await gateway.client.get(path)).status_code == 200, path


async def test_anonymous_access_only_when_enabled(make_settings, http_port) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(http_port=http_port, allow_anonymous=True)
    async with running(settings, [FUNCTIONS["gateway"]]):
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=30) as client:
            await until_http_up(client)
            r = await client.post("/v1/uploads", params={"filename": "a.mp4"}, content=b"x")
            assert r.status_code == 201 and r.json()["key"].startswith("uploads/default/")
            assert (await client.get("/v1/dlq")).status_code == 200  # dev mode is admin
            # a key that is presented must still be valid
            _assert_401(await client.get("/v1/jobs/x", headers={"X-API-Key": "nope"}))


async def _jetcut(settings: Settings, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETCUT_")}
    env.update({env_name("nats_url"): settings.nats_url,
                env_name("namespace"): settings.namespace})
    proc = await asyncio.create_subprocess_exec(
        JETCUT, *args, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_keys_cli_creates_lists_and_revokes(gateway: Gateway) -> None:
    settings, client = gateway.settings, gateway.client
    code, out, err = await _jetcut(settings, "keys", "create", "--tenant", "acme",
                                   "--name", "ci runner")
    assert code == 0, err
    key = out.strip()
    assert key.startswith("jc_") and "shown only this once" in err
    key_id = key.split("_")[1]
    headers = {"Authorization": f"Bearer {key}"}
    upload = await gateway.upload(headers)
    assert upload["key"].startswith("uploads/acme/")

    code, out, err = await _jetcut(settings, "keys", "create", "--tenant", "ops", "--admin")
    assert code == 0, err
    assert (await client.get("/v1/dlq", headers={"X-API-Key": out.strip()})).status_code == 200

    code, out, _ = await _jetcut(settings, "keys", "list")
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith(key_id))
    assert "acme" in line and "active" in line and "ci runner" in line
    assert key.split("_", 2)[2] not in out  # no secret, ever
    assert len(out.strip().splitlines()) == 2

    code, out, _ = await _jetcut(settings, "keys", "revoke", key_id)
    assert code == 0 and "revoked" in out
    _assert_401(await client.get("/v1/jobs/x", headers=headers))
    code, out, _ = await _jetcut(settings, "keys", "list", "--tenant", "acme")
    assert "revoked" in out and key_id in out

    code, _, err = await _jetcut(settings, "keys", "revoke", "nosuchkey")
    assert code == 1 and "no key" in err
    code, _, err = await _jetcut(settings, "keys", "create", "--tenant", "bad.tenant")
    assert code == 2 and "tenant" in err
