"""Every job is one trace: HTTP request -> submit -> each stage -> each completion."""

from __future__ import annotations

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from functions.registry import FUNCTIONS
from shared.telemetry import Telemetry
from tests.support.nats import running, until_http_up, wait_for_job

pytestmark = pytest.mark.timeout(120)

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def test_a_job_is_one_trace_joining_the_callers(make_settings, http_port, clip_3s):  # type: ignore[no-untyped-def]
    exporter = InMemorySpanExporter()
    telemetry = Telemetry("trace-test", span_exporter=exporter)
    settings = make_settings(http_port=http_port)
    async with running(settings, list(FUNCTIONS.values()), telemetry=telemetry) as rt:
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=30) as client:
            await until_http_up(client)
            up = await client.post("/v1/uploads", params={"filename": "c.mp4"},
                                   content=clip_3s.read_bytes())
            r = await client.post("/v1/jobs", json={"recipe": "web",
                                                    "input": up.json()["upload_id"]},
                                  headers={"traceparent": TRACEPARENT})
            await wait_for_job(rt.services, r.json()["job_id"])
    spans = exporter.get_finished_spans()
    trace_id = int(TRACEPARENT.split("-")[1], 16)
    ours = [s for s in spans if s.context.trace_id == trace_id]
    names = {s.name for s in ours}
    for expected in ("POST /v1/jobs", "process jobs.submit", "process stages.probe",
                     "process stages.transcode", "process stages.thumbnail",
                     "process jobs.stage.complete"):
        assert expected in names, (expected, sorted(names))
    process = [s for s in ours if s.name.startswith("process ")]
    assert all(s.attributes["messaging.system"] == "nats" for s in process)
    for span in process:
        attributes = span.attributes or {}
        subject = str(attributes["messaging.destination.name"])
        assert ">" not in subject and "*" not in subject, subject  # the real subject
        assert attributes["messaging.operation.type"] == "process"
        assert attributes["messaging.message.id"], span.name
        assert attributes["messaging.consumer.group.name"], span.name
    complete = [s for s in process if s.name == "process jobs.stage.complete"]
    # Two durable consumers read completions: the conductor's, and calibrate's (the cost
    # model), each joined to the job's trace.
    assert {(s.attributes or {})["messaging.consumer.group.name"] for s in complete} \
        == {"conductor-complete", "calibrate"}
    sends = [s for s in ours if s.name.startswith("publish ")]
    assert sends and all((s.attributes or {})["messaging.operation.type"] == "send"
                         and (s.attributes or {})["messaging.message.id"] for s in sends)
    assert all(s.parent is not None for s in ours)  # nothing starts a trace of its own
