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
import importlib
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from functions.registry import FUNCTIONS
from tests.support.nats import running, until_http_up
from tests.support.s3 import unique_bucket

pytestmark = pytest.mark.timeout(170)

OPEN = {"allow_anonymous": True, "rate_limit_key_per_s": 0, "rate_limit_address_per_s": 0}
ST = Path(sys.executable).with_name("st")
CLIENT = "jetcut_api_client"


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


async def _generate_client(base_url: str, where: Path) -> Any:
    """A client generated from the live document, imported from ``where``."""
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        (where / "openapi.json").write_bytes((await client.get("/v1/openapi.json")).content)
    # A download is bytes of the output's own type (``*/*`` in the document), a segment
    # MPEG-TS: the client is told to read them as bytes, its one supported binary type;
    # an HLS playlist is text.
    (where / "client.json").write_text(
        '{"content_type_overrides": {"*/*": "application/octet-stream", '
        '"video/mp2t": "application/octet-stream", '
        '"application/vnd.apple.mpegurl": "text/plain"}}')
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("openapi-python-client")), "generate",
        "--path", str(where / "openapi.json"), "--output-path", str(where / CLIENT),
        "--meta", "none", "--config", str(where / "client.json"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=where,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    log = out.decode(errors="replace")
    # Every schema of the document made it into the client: the generator warns (and
    # leaves a piece out) for any it cannot read.
    assert proc.returncode == 0 and "Warning" not in log, log
    sys.path.insert(0, str(where))
    try:
        return importlib.import_module(CLIENT)
    finally:
        sys.path.remove(str(where))


async def test_a_generated_client_uploads_submits_watches_downloads_and_reads_errors(  # type: ignore[no-untyped-def]
        make_settings, http_port, clip_3s, tmp_path):
    settings = make_settings(http_port=http_port, **OPEN)
    names = ("gateway", "conductor", "probe", "thumbnail")
    async with running(settings, [FUNCTIONS[n] for n in names]):
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=30) as probe:
            await until_http_up(probe)
        jc = await _generate_client(settings.base_url, tmp_path)
        try:
            def load(name: str) -> Any:
                return importlib.import_module(f"{CLIENT}.{name}")

            # An answer the document does not declare raises: none may come.
            async with jc.Client(base_url=settings.base_url, raise_on_unexpected_status=True,
                                 timeout=httpx.Timeout(60)) as client:
                await _walk_through(client, load, clip_3s)
        finally:
            for name in [m for m in sys.modules if m == CLIENT or m.startswith(f"{CLIENT}.")]:
                del sys.modules[name]


async def _walk_through(client: Any, load: Any, clip: Path) -> None:
    """Upload, submit, watch, download, and three typed errors, through the client."""
    upload = load("api.uploads.upload")
    submit, get_job = load("api.jobs.submit"), load("api.jobs.get_job")
    events, download = load("api.jobs.job_events"), load("api.jobs.download")
    list_outputs = load("api.jobs.list_outputs")
    dlq_show = load("api.dead_letters.dlq_show")
    models, types = load("models"), load("types")

    # (Bytes, not a file: the async client cannot stream a sync file object.)
    r = await upload.asyncio_detailed(
        client=client, body=types.File(payload=clip.read_bytes()),
        filename="clip.mp4")
    assert r.status_code == 201 and isinstance(r.parsed, models.UploadView), r
    r = await submit.asyncio_detailed(client=client, body=models.JobRequest(
        recipe="thumbnails", input_=r.parsed.upload_id))
    assert r.status_code == 202 and isinstance(r.parsed, models.JobView), r
    assert r.parsed.status == "queued"
    job_id = r.parsed.job_id

    # Watch: the event stream ends with the job.
    r = await asyncio.wait_for(events.asyncio_detailed(job_id, client=client), 90)
    assert r.status_code == 200 and '"succeeded"' in r.parsed, r.parsed[-500:]
    r = await get_job.asyncio_detailed(job_id, client=client)
    assert isinstance(r.parsed, models.JobView) and r.parsed.status == "succeeded"

    r = await list_outputs.asyncio_detailed(job_id, client=client)
    assert isinstance(r.parsed, models.OutputList) and r.parsed.outputs, r
    first = r.parsed.outputs[0]
    r = await download.asyncio_detailed(job_id, first.step, first.name, client=client)
    assert r.status_code == 200 and len(r.content) > 100

    # Errors are typed: the one error body, its code, for each declared status.
    r = await submit.asyncio_detailed(client=client, body=models.JobRequest(
        recipe="no-such-recipe", input_=first.key))
    assert r.status_code == 422 and isinstance(r.parsed, models.ErrorBody), r
    assert r.parsed.error.code == "invalid_recipe"
    r = await get_job.asyncio_detailed("jnosuchjob", client=client)
    assert r.status_code == 404 and isinstance(r.parsed, models.ErrorBody)
    assert r.parsed.error.code == "not_found"
    r = await dlq_show.asyncio_detailed("0", client=client)
    assert r.status_code == 400 and isinstance(r.parsed, models.ErrorBody)
    assert r.parsed.error.code == "invalid_request"
