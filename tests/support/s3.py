"""A real S3 API for tests: moto's S3 server on loopback, or MinIO when Docker answers.

Fixtures:
    s3_server:        moto's S3 server as a child process on a free loopback port (session).
                      Yields an :class:`S3Endpoint`. Needs nothing but the venv.
    minio_container:  MinIO in a container via testcontainers (session); skipped with the
                      reason when no Docker engine answers, failed instead when
                      ``REQUIRE_DOCKER=1``. Mark tests that use it ``@pytest.mark.docker``.
                      Yields an :class:`S3Endpoint`.
    s3_store_factory: ``await s3_store_factory(endpoint, **S3Store kwargs)`` -> a ready
                      :class:`~shared.store.S3Store` on a fresh bucket of its own; closed at
                      teardown (function).
    s3_store:         a ready S3Store on moto with its own bucket (function).

Every store gets its own bucket, so tests never see each other's objects.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from shared.settings import Settings
from shared.store import S3Store

READY_TIMEOUT_S = 30.0
DOCKER_PING_TIMEOUT_S = 2.0
REGION = "us-east-1"
_MOTO_PORT = re.compile(rb"Running on http://127\.0\.0\.1:(\d+)")


@dataclass(frozen=True)
class S3Endpoint:
    """Where a test S3 API listens and how to sign in to it."""

    endpoint: str
    """``host:port``, no scheme (what the minio client and JETCUT_S3_ENDPOINT take)."""
    access_key: str
    secret_key: str
    region: str = REGION
    secure: bool = False

    def store(self, bucket: str, **kwargs: Any) -> S3Store:
        """An S3Store on ``bucket`` (not created yet: call ``ensure_ready``)."""
        return S3Store(
            self.endpoint,
            self.access_key,
            self.secret_key,
            bucket,
            secure=self.secure,
            region=self.region,
            **kwargs,
        )

    def settings(self, bucket: str, **overrides: Any) -> Settings:
        """Settings selecting this endpoint, for tests that wire a whole process."""
        fields: dict[str, Any] = {
            "store": "s3",
            "s3_endpoint": self.endpoint,
            "s3_access_key": self.access_key,
            "s3_secret_key": self.secret_key,
            "s3_secure": self.secure,
            "s3_region": self.region,
            "bucket": bucket,
        }
        fields.update(overrides)
        return Settings(**fields)


def unique_bucket(prefix: str = "jetcut-test") -> str:
    """A bucket name no other test uses (valid for S3: lowercase, 3-63 chars)."""
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


# --- moto ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """moto's S3 server in a child process, on a port it picks itself (``-p 0``)."""
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log:
        # Port 0 and reading the port back from the log leaves no window in which another
        # process could take a port we picked for it.
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    try:
        port = _wait_for_moto(proc, log_path)
        yield S3Endpoint(endpoint=f"127.0.0.1:{port}", access_key="testing", secret_key="testing")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for_moto(proc: subprocess.Popen[bytes], log_path: Path) -> int:
    deadline = time.monotonic() + READY_TIMEOUT_S
    port: int | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"moto server exited with {proc.returncode}:\n{log_path.read_text()[-2000:]}"
            )
        if port is None:
            match = _MOTO_PORT.search(log_path.read_bytes())
            if match:
                port = int(match.group(1))
        if port is not None and _http_answers("127.0.0.1", port):
            return port
        time.sleep(0.05)
    raise RuntimeError(
        f"moto server not ready after {READY_TIMEOUT_S}s:\n{log_path.read_text()[-2000:]}"
    )


def _http_answers(host: str, port: int) -> bool:
    conn = http.client.HTTPConnection(host, port, timeout=2)
    try:
        conn.request("GET", "/")
        conn.getresponse().read()
        return True
    except OSError:
        return False
    finally:
        conn.close()


# --- MinIO in Docker ---------------------------------------------------------------------


def docker_unavailable_reason() -> str | None:
    """Why no Docker engine answers (``None`` when one does), in at most a few seconds.

    A raw ``GET /_ping`` on the engine's socket rather than the docker SDK: the SDK leaks
    the socket of a failed connection (a ResourceWarning, an error under ``-W error``).
    """
    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    url = urlsplit(host)
    try:
        if url.scheme == "unix":
            if not os.path.exists(url.path):
                return f"no socket at {url.path}"
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: Any = url.path
        elif url.scheme in ("tcp", "http"):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = (url.hostname or "127.0.0.1", url.port or 2375)
        else:
            # ssh://, npipe://, TLS: let testcontainers try; it reports its own errors.
            return None
        with sock:
            sock.settimeout(DOCKER_PING_TIMEOUT_S)
            sock.connect(address)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            reply = sock.recv(256)
    except OSError as exc:
        return f"{host}: {exc}"
    if not reply.startswith(b"HTTP/1.") or b" 200 " not in reply.split(b"\r\n", 1)[0]:
        return f"{host}: unexpected reply to /_ping: {reply[:60]!r}"
    return None


@pytest.fixture(scope="session")
def minio_container() -> Iterator[S3Endpoint]:
    """MinIO via testcontainers; skipped (or failed, with REQUIRE_DOCKER=1) without Docker."""
    reason = docker_unavailable_reason()
    if reason is not None:
        if os.environ.get("REQUIRE_DOCKER") == "1":
            pytest.fail(f"REQUIRE_DOCKER=1 but no Docker engine answers: {reason}")
        pytest.skip(f"no Docker engine: {reason}")
    # Imported only when an engine answers. `testcontainers.minio` is a deprecated alias
    # that raises a DeprecationWarning (an error here): import the community module.
    from testcontainers.community.minio import MinioContainer

    with MinioContainer() as container:
        config = container.get_config()
        yield S3Endpoint(
            endpoint=config["endpoint"],
            access_key=config["access_key"],
            secret_key=config["secret_key"],
        )


# --- stores ------------------------------------------------------------------------------

S3StoreFactory = Callable[..., Awaitable[S3Store]]


@pytest.fixture
async def s3_store_factory() -> AsyncIterator[S3StoreFactory]:
    """Make ready S3Stores, each on a fresh bucket; all are closed at teardown."""
    stores: list[S3Store] = []

    async def make(endpoint: S3Endpoint, **kwargs: Any) -> S3Store:
        store = endpoint.store(unique_bucket(), **kwargs)
        stores.append(store)
        await store.ensure_ready()
        return store

    yield make
    for store in stores:
        with contextlib.suppress(Exception):
            await store.close()


@pytest.fixture
async def s3_store(s3_server: S3Endpoint, s3_store_factory: S3StoreFactory) -> S3Store:
    """A ready S3Store on moto, with a bucket no other test sees."""
    return await s3_store_factory(s3_server)
