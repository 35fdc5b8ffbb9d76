"""Unit tests for shared.telemetry: trace propagation, span parentage, metrics exposition."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import urllib.request

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.telemetry import Telemetry, TelemetryError, subject_kind


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def telemetry(spans: InMemorySpanExporter):
    t = Telemetry("jetcut-test", span_exporter=spans)
    yield t
    t.shutdown()


def test_inject_extract_round_trip_keeps_trace_id(telemetry: Telemetry) -> None:
    with telemetry.tracer.start_as_current_span("origin") as span:
        headers = telemetry.inject({"ce-type": "jetcut.job.submit"})
    assert headers["ce-type"] == "jetcut.job.submit"
    assert headers["traceparent"].startswith("00-")

    remote = trace.get_current_span(telemetry.extract(headers)).get_span_context()
    assert remote.is_remote
    assert remote.trace_id == span.get_span_context().trace_id
    assert remote.span_id == span.get_span_context().span_id


def test_extract_is_case_insensitive_and_tolerates_missing_headers(telemetry: Telemetry) -> None:
    with telemetry.tracer.start_as_current_span("origin") as span:
        headers = telemetry.inject({})
    upper = {"Traceparent": headers["traceparent"]}
    ctx = trace.get_current_span(telemetry.extract(upper)).get_span_context()
    assert ctx.trace_id == span.get_span_context().trace_id

    for missing in (None, {}, {"traceparent": "garbage"}):
        assert not trace.get_current_span(telemetry.extract(missing)).get_span_context().is_valid


def test_inject_outside_a_span_adds_nothing(telemetry: Telemetry) -> None:
    assert telemetry.inject({}) == {}


def test_consume_span_is_child_of_publish_span(
    telemetry: Telemetry, spans: InMemorySpanExporter
) -> None:
    with telemetry.publish_span("stages.transcode", message_id="j1:web:1"):
        headers = telemetry.inject({"Nats-Msg-Id": "j1:web:1"})

    # Simulate the consumer side: no span is current when a message arrives.
    assert not trace.get_current_span().get_span_context().is_valid
    with telemetry.consume_span("stages.transcode", headers, function="transcode",
                                consumer_group="stage-transcode") as span:
        span.set_attribute("jetcut.outcome", "ack")

    finished = {s.name: s for s in spans.get_finished_spans()}
    producer = finished["publish stages.transcode"]
    consumer = finished["process stages.transcode"]
    assert producer.kind is trace.SpanKind.PRODUCER
    assert consumer.kind is trace.SpanKind.CONSUMER
    assert producer.context is not None and consumer.context is not None
    assert consumer.context.trace_id == producer.context.trace_id
    assert consumer.parent is not None
    assert consumer.parent.span_id == producer.context.span_id
    assert consumer.attributes == {
        "messaging.system": "nats",
        "messaging.destination.name": "stages.transcode",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.message.id": "j1:web:1",
        "messaging.consumer.group.name": "stage-transcode",
        "jetcut.function": "transcode",
        "jetcut.outcome": "ack",
    }
    assert producer.attributes == {
        "messaging.system": "nats",
        "messaging.destination.name": "stages.transcode",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.message.id": "j1:web:1",
    }
    assert producer.resource.attributes["service.name"] == "jetcut-test"


def test_consume_span_without_headers_starts_a_new_trace(
    telemetry: Telemetry, spans: InMemorySpanExporter
) -> None:
    with telemetry.tracer.start_as_current_span("unrelated"):
        with telemetry.consume_span("jobs.submit", None, function="conductor"):
            pass
    consumer = next(s for s in spans.get_finished_spans() if s.name == "process jobs.submit")
    assert consumer.parent is None


def test_consume_span_records_handler_errors(
    telemetry: Telemetry, spans: InMemorySpanExporter
) -> None:
    with pytest.raises(ValueError, match="boom"):
        with telemetry.consume_span("stages.probe", {}, function="probe"):
            raise ValueError("boom")
    (span,) = spans.get_finished_spans()
    assert span.status.status_code is trace.StatusCode.ERROR
    assert any(e.name == "exception" for e in span.events)


def test_span_names_use_the_subject_kind_not_ids(
    telemetry: Telemetry, spans: InMemorySpanExporter
) -> None:
    with telemetry.publish_span("events.acme.01J9ZJOB"):
        pass
    (span,) = spans.get_finished_spans()
    assert span.name == "publish events"
    assert span.attributes is not None
    assert span.attributes["messaging.destination.name"] == "events.acme.01J9ZJOB"


def test_spans_name_the_contract_subject_and_record_the_real_one(
    telemetry: Telemetry, spans: InMemorySpanExporter
) -> None:
    # A namespaced deployment: the attribute is the subject on the wire, the name its kind.
    with telemetry.consume_span("ns.events.acme.J1", {"nats-msg-id": "status:J1:running:1.0"},
                                function="notify", contract_subject="events.acme.J1"):
        pass
    (span,) = spans.get_finished_spans()
    assert span.name == "process events"
    assert span.attributes is not None
    assert span.attributes["messaging.destination.name"] == "ns.events.acme.J1"
    assert span.attributes["messaging.message.id"] == "status:J1:running:1.0"
    assert "messaging.consumer.group.name" not in span.attributes  # none given


def test_metrics_text_has_names_and_labelled_samples(telemetry: Telemetry) -> None:
    telemetry.messages.labels("transcode", "stages.transcode", "ack").inc()
    telemetry.handler_seconds.labels("transcode", "stages.transcode", "ack").observe(42.0)
    telemetry.in_flight.labels("transcode").inc()
    telemetry.publishes.labels("jobs.stage.complete", "ok").inc()
    telemetry.jobs.labels("web", "succeeded").inc()
    telemetry.step_seconds.labels("transcode").observe(1.5)

    text = telemetry.metrics_text().decode()
    for name in (
        "jetcut_messages_total",
        "jetcut_handler_duration_seconds",
        "jetcut_in_flight_tasks",
        "jetcut_publishes_total",
        "jetcut_jobs_total",
        "jetcut_step_duration_seconds",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in text
    assert (
        'jetcut_messages_total{function="transcode",outcome="ack",'
        'subject_kind="stages.transcode"} 1.0' in text
    )
    assert 'jetcut_jobs_total{recipe="web",status="succeeded"} 1.0' in text
    # Render-sized buckets: a 42 s transcode lands below 60 s, not in +Inf.
    assert (
        'jetcut_handler_duration_seconds_bucket{function="transcode",le="60.0",'
        'outcome="ack",subject_kind="stages.transcode"} 1.0' in text
    )
    assert 'le="3600.0"' in text
    assert telemetry.metrics_content_type.startswith("text/plain")


def test_two_instances_do_not_share_registries() -> None:
    first, second = Telemetry("one"), Telemetry("two")
    try:
        first.jobs.labels("web", "failed").inc()
        assert first.registry is not second.registry
        assert b'status="failed"' in first.metrics_text()
        assert b'status="failed"' not in second.metrics_text()
    finally:
        first.shutdown()
        second.shutdown()


CONSOLE_SCRIPT = """
from shared.telemetry import Telemetry
console = Telemetry("console-test", exporter="console")
with console.publish_span("jobs.submit", message_id="j-console"):
    pass
console.shutdown()  # flushes the batch processor
"""


def test_console_exporter_prints_finished_spans() -> None:
    # In a process of its own: the exporter writes to the stdout it found at import.
    done = subprocess.run([sys.executable, "-c", CONSOLE_SCRIPT], capture_output=True,
                          text=True, timeout=60, check=True)
    assert '"name": "publish jobs.submit"' in done.stdout
    assert '"messaging.message.id": "j-console"' in done.stdout
    assert '"service.name": "console-test"' in done.stdout


class _TraceReceiver(http.server.BaseHTTPRequestHandler):
    """A stand-in OTLP/HTTP collector: records what is POSTed to it."""

    received: list[tuple[str, str, bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.received.append((self.path, self.headers.get("Content-Type", ""), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return


def test_otlp_exporter_needs_its_package_and_sends_spans() -> None:
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
    except ImportError:
        with pytest.raises(TelemetryError, match="opentelemetry-exporter-otlp-proto-http"):
            Telemetry("otlp", exporter="otlp")
        return
    # Installed: the spans really reach a collector at the endpoint, on /v1/traces.
    _TraceReceiver.received = []
    server = http.server.HTTPServer(("127.0.0.1", 0), _TraceReceiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        otlp = Telemetry("otlp-test", exporter="otlp",
                         otlp_endpoint=f"http://127.0.0.1:{server.server_port}")
        with otlp.publish_span("jobs.submit", message_id="j-otlp"):
            pass
        otlp.shutdown()  # flushes the batch processor
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
    assert [(path, ctype) for path, ctype, _ in _TraceReceiver.received] == [
        ("/v1/traces", "application/x-protobuf")]
    body = _TraceReceiver.received[0][2]
    assert b"publish jobs.submit" in body and b"j-otlp" in body and b"otlp-test" in body


def test_unknown_exporter_is_rejected() -> None:
    with pytest.raises(TelemetryError, match="unknown span exporter"):
        Telemetry("bad", exporter="zipkin")  # type: ignore[arg-type]


def test_metrics_server_serves_the_registry(telemetry: Telemetry) -> None:
    telemetry.in_flight.labels("probe").set(3)
    telemetry.start_metrics_server("127.0.0.1", 0)  # sync callers need not await
    port = telemetry.metrics_port
    assert port
    with pytest.raises(TelemetryError, match="already running"):
        telemetry.start_metrics_server("127.0.0.1", 0)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        body = resp.read().decode()
    assert 'jetcut_in_flight_tasks{function="probe"} 3.0' in body
    telemetry.shutdown()
    assert telemetry.metrics_port is None
    telemetry.shutdown()  # idempotent


async def test_metrics_server_can_be_awaited(telemetry: Telemetry) -> None:
    await telemetry.start_metrics_server("127.0.0.1", 0)
    assert telemetry.metrics_port


@pytest.mark.parametrize(
    ("subject", "kind"),
    [
        ("jobs.submit", "jobs.submit"),
        ("jobs.cancel", "jobs.cancel"),
        ("jobs.stage.complete", "jobs.stage.complete"),
        ("stages.transcode", "stages.transcode"),
        ("stages.thumbnail", "stages.thumbnail"),
        ("events.acme.01J9ZJOB", "events"),
        ("events.t2.another-job", "events"),
        ("dlq.probe", "dlq"),
        ("minio.events", "minio.events"),
        (
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.STAGES.stage-probe",
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES",
        ),
    ],
)
def test_subject_kind(subject: str, kind: str) -> None:
    assert subject_kind(subject) == kind
