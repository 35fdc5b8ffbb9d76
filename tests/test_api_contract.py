"""The API contract is the OpenAPI document: checked from both sides against a real gateway.

* schemathesis (its CLI, every check it has) generates requests from ``/v1/openapi.json``
  and checks each answer against the document: status declared, body in the declared
  schema, content type and headers declared, schema-invalid requests refused, 405 with
  ``Allow``. Bounded in examples so the run stays well under a minute.
* a client generated from the same document by openapi-python-client, imported from a
  temporary directory, uploads, submits, watches, downloads, and gets typed errors: no
  answer it cannot parse.

The gateway runs in this test's event loop (real NATS, real store); both tools run as
child processes or in a thread, so they never block it.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import httpx
import pytest

from functions.registry import FUNCTIONS
from tests.support.nats import running, until_http_up
from tests.support.s3 import unique_bucket

pytestmark = pytest.mark.timeout(170)

OPEN = {"allow_anonymous": True, "rate_limit_key_per_s": 0, "rate_limit_address_per_s": 0}
ST = Path(sys.executable).with_name("st")


CONFIG = """
[checks]
enabled = true  # every check schemathesis has

[checks.positive_data_acceptance]
# A well-formed request can still ask for the impossible: an input that does not exist, a
# recipe that does not plan. The document declares those answers (422), so they are
# accepted here; 400 (malformed) is not.
expected-statuses = ["2xx", "3xx", 401, 403, 404, 409, 422, 429]

# Rules OpenAPI cannot state, so a schema-valid request may still be refused (400):
[[operations]]
# ``DELETE /v1/dlq`` needs ?function= or ?all=true: one of two parameters.
include-path = "/v1/dlq"
include-method = "DELETE"
checks.positive_data_acceptance.enabled = false

[[operations]]
# ``GET /v1/jobs?cursor=`` takes only a cursor this API returned (opaque by design).
include-path = "/v1/jobs"
include-method = "GET"
checks.positive_data_acceptance.enabled = false
"""


async def test_schemathesis_with_every_check_finds_nothing(  # type: ignore[no-untyped-def]
        make_settings, http_port, s3_server, tmp_path):
    # The S3 store (moto on loopback), so presigned uploads answer 201 rather than 501.
    settings = make_settings(
        http_port=http_port, store="s3", s3_endpoint=s3_server.endpoint,
        s3_access_key=s3_server.access_key, s3_secret_key=s3_server.secret_key,
        s3_region=s3_server.region, bucket=unique_bucket(), max_upload_bytes=100_000, **OPEN)
    (tmp_path / "schemathesis.toml").write_text(CONFIG)
    async with running(settings, [FUNCTIONS["gateway"], FUNCTIONS["conductor"]]) as runtime:
        await runtime.services.store.ensure_ready()
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=30) as client:
            await until_http_up(client)
        proc = await asyncio.create_subprocess_exec(
            str(ST), "run", f"{settings.base_url}/v1/openapi.json",
            "--max-examples", "12",
            "--workers", "1", "--request-timeout", "10", "--no-shrink",
            "--generation-deterministic", "--report-dir", str(tmp_path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            cwd=tmp_path, env={**os.environ, "NO_COLOR": "1"},
        )
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=150)
    report = out.decode(errors="replace")
    assert proc.returncode == 0, report[-12000:]
