"""Traces and metrics for every function, owned by the runtime rather than the handlers.

A handler never imports OpenTelemetry or ``prometheus_client``: the consumer loop and the
publisher in ``shared/`` use one :class:`Telemetry` object, built once by the process entry
point and handed down. Keeping the tracer provider and the metrics registry on that object
(instead of the global OpenTelemetry provider and the global Prometheus ``REGISTRY``) means
``jetcut dev`` can host every function in one process, and tests can build as many
instances as they like, without one instance's exporters or metrics leaking into another.

Traces follow a job across processes through W3C ``traceparent``/``tracestate`` headers on
every NATS message; we use the TraceContext propagator explicitly, not the global one, so a
library that installs a different global propagator cannot change what goes on the wire.

Metric labels are deliberately low-cardinality (function, subject kind, stage, outcome,
recipe, status). A job id, tenant or full ``events.<tenant>.<job>`` subject must never
become a label: every distinct value is a new time series kept forever by Prometheus.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Awaitable, Generator, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from opentelemetry.context import Context

__all__ = [
    "DURATION_BUCKETS",
    "OTLP_PACKAGE",
    "Exporter",
    "Telemetry",
    "TelemetryError",
    "subject_kind",
]

Exporter = Literal["none", "console", "otlp"]

OTLP_PACKAGE = "opentelemetry-exporter-otlp-proto-http"
"""The distribution that provides the OTLP/HTTP span exporter (an optional extra)."""

DURATION_BUCKETS: tuple[float, ...] = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600,
)  # fmt: skip
"""Histogram buckets for handler and ffmpeg durations.

Renders run from sub-second probes to hour-long transcodes; web-request buckets
(which stop at 10 s) would put every transcode in ``+Inf`` and make quantiles useless.
"""


class TelemetryError(RuntimeError):
    """Telemetry was configured in a way this installation cannot honour."""


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    """A header's value, its name matched case-insensitively (NATS keeps case as sent)."""
    wanted = name.lower()
    return next((v for k, v in (headers or {}).items() if k.lower() == wanted), None)


def subject_kind(subject: str) -> str:
    """Map a NATS subject to a low-cardinality label value.

    Subjects carry ids (``events.<tenant>.<job_id>``, ``dlq.<stage>``, advisories that name a
    stream and consumer); labelling metrics or naming spans with them would create one time
    series per job. The kinds keep what an operator filters on and drop the ids.

    Args:
        subject: The subject a message was published to or received on.

    Returns:
        ``jobs.<verb>`` (e.g. ``jobs.submit``, ``jobs.stage.complete``), ``stages.<stage>``,
        ``events``, ``dlq``, ``$JS.EVENT.ADVISORY.<TYPE>.<EVENT>`` for JetStream advisories,
        and the first two tokens of any other subject.

    Examples:
        >>> subject_kind("events.acme.01J9Z")
        'events'
        >>> subject_kind("stages.transcode")
        'stages.transcode'
    """
    tokens = subject.split(".")
    head = tokens[0]
    if head in ("events", "dlq"):
        return head
    if head == "jobs":
        # jobs.submit / jobs.cancel / jobs.retry / jobs.cleanup / jobs.stage.complete
        return ".".join(tokens[:3])
    if subject.startswith("$JS.EVENT.ADVISORY."):
        # $JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>: drop the names.
        return ".".join(tokens[:5])
    return ".".join(tokens[:2])


class Telemetry:
    """One process's tracer and metrics; created by the entry point and handed down.

    Attributes:
        service_name: ``service.name`` on every span (e.g. ``jetcut-transcode``).
        tracer: Tracer from this instance's own ``TracerProvider``.
        registry: This instance's Prometheus registry; ``metrics_text()`` exposes it.
        messages: ``jetcut_messages_total{function, subject_kind, outcome}``; outcome is
            how the message was settled: ``ack``, ``nak``, ``term``, ``dead_letter`` or
            ``retry_later``.
        handler_seconds: ``jetcut_handler_duration_seconds{function, subject_kind, outcome}``.
        in_flight: ``jetcut_in_flight_tasks{function}``; a worker that has fetched work but
            not settled it. Zero everywhere while stage backlogs grow means no worker is alive.
        publishes: ``jetcut_publishes_total{subject_kind, outcome}``; outcome ``ok``,
            ``retried`` (a publish attempt failed and is being repeated with the same
            ``Nats-Msg-Id``) or ``failed`` (gave up without a PubAck).
        jobs: ``jetcut_jobs_total{recipe, status}``; jobs reaching a terminal status.
        step_seconds: ``jetcut_step_duration_seconds{stage}``; wall time of one step (or part):
            inputs in, the stage's work, outputs and manifest out.
        admission_waits: ``jetcut_admission_waits_total{function, reason}``; a consumer
            stopped fetching (reason ``memory``, ``disk`` or ``store``), counted once per wait.
        store_breaker_open: ``jetcut_store_breaker_open``; 1 while the store's circuit
            breaker holds this process's consumers.
        janitor_actions: ``jetcut_janitor_actions_total{action}``; what the janitor did:
            jobs for ``redrive_stuck``, ``expire_job`` and ``delete_job``, objects for
            ``delete_intermediates`` and ``delete_upload``, directories for
            ``remove_temp_dir``.
    """

    def __init__(
        self,
        service_name: str,
        *,
        exporter: Exporter = "none",
        otlp_endpoint: str = "http://127.0.0.1:4318",
        span_exporter: SpanExporter | None = None,
    ) -> None:
        """Build a tracer provider and a metrics registry private to this instance.

        Args:
            service_name: Reported as the ``service.name`` resource attribute.
            exporter: ``none`` records spans (so trace ids still propagate) but exports
                nothing; ``console`` prints finished spans; ``otlp`` sends them over
                OTLP/HTTP to ``otlp_endpoint`` (needs ``opentelemetry-exporter-otlp-proto-http``).
            otlp_endpoint: Collector base URL (Jaeger, OTel Collector); ``/v1/traces`` is added.
            span_exporter: An extra exporter fed synchronously, in addition to ``exporter``;
                tests pass an ``InMemorySpanExporter`` to read spans as soon as they end.

        Raises:
            TelemetryError: ``exporter="otlp"`` but the OTLP/HTTP exporter is not installed,
                or ``exporter`` is not one of the known values.
        """
        self.service_name = service_name
        self._propagator = TraceContextTextMapPropagator()
        self._provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        if exporter == "console":
            self._provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif exporter == "otlp":
            self._provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(otlp_endpoint)))
        elif exporter != "none":
            raise TelemetryError(f"unknown span exporter {exporter!r}: use none, console or otlp")
        if span_exporter is not None:
            self._provider.add_span_processor(SimpleSpanProcessor(span_exporter))
        self.tracer: trace.Tracer = self._provider.get_tracer("jetcut")

        self.registry = CollectorRegistry(auto_describe=True)
        self.messages = Counter(
            "jetcut_messages_total",
            "Messages handled, by how they were settled.",
            ("function", "subject_kind", "outcome"),
            registry=self.registry,
        )
        self.handler_seconds = Histogram(
            "jetcut_handler_duration_seconds",
            "Time from receiving a message to settling it.",
            ("function", "subject_kind", "outcome"),
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "jetcut_in_flight_tasks",
            "Messages fetched and not yet settled.",
            ("function",),
            registry=self.registry,
        )
        self.publishes = Counter(
            "jetcut_publishes_total",
            "JetStream publish attempts, by result.",
            ("subject_kind", "outcome"),
            registry=self.registry,
        )
        self.jobs = Counter(
            "jetcut_jobs_total",
            "Jobs that reached a terminal status.",
            ("recipe", "status"),
            registry=self.registry,
        )
        self.step_seconds = Histogram(
            "jetcut_step_duration_seconds",
            "Wall time of one step or part: download, the stage's work, upload.",
            ("stage",),
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.janitor_actions = Counter(
            "jetcut_janitor_actions_total",
            "Cleanup, retention and re-drive actions taken by the janitor.",
            ("action",),
            registry=self.registry,
        )
        self.admission_waits = Counter(
            "jetcut_admission_waits_total",
            "Times a consumer stopped fetching to wait for headroom or the store.",
            ("function", "reason"),
            registry=self.registry,
        )
        self.store_breaker_open = Gauge(
            "jetcut_store_breaker_open",
            "1 while the object-store circuit breaker stops this process fetching work.",
            registry=self.registry,
        )
        self._metrics_server: WSGIServer | None = None
        self._metrics_thread: threading.Thread | None = None
        self._shut_down = False

    # --- trace context on the wire ---------------------------------------------------

    def inject(self, headers: dict[str, str]) -> dict[str, str]:
        """Write the current trace context into message headers.

        Args:
            headers: Headers of a message about to be published; updated in place.

        Returns:
            The same dict, with ``traceparent`` (and ``tracestate`` when set) added when a
            span is current; unchanged otherwise.
        """
        self._propagator.inject(headers)
        return headers

    def extract(self, headers: Mapping[str, str] | None) -> Context:
        """Read a trace context from received message headers.

        Header names are matched case-insensitively: NATS keeps header case as sent, and
        services in other languages may write ``Traceparent``.

        Args:
            headers: The message's headers, or ``None`` for a message without any.

        Returns:
            A context whose current span is the remote parent; an empty context (a new
            trace will start) when the headers carry no valid ``traceparent``.
        """
        carrier = {k.lower(): v for k, v in (headers or {}).items()}
        return self._propagator.extract(carrier, context=otel_context.Context())

    @contextmanager
    def consume_span(
        self, subject: str, headers: Mapping[str, str] | None, *, function: str,
        consumer_group: str | None = None, contract_subject: str | None = None,
    ) -> Iterator[trace.Span]:
        """Open the ``process <subject kind>`` span around handling one message.

        The span's parent is the producer span carried in the headers, so a job's trace
        runs gateway → conductor → each stage even though they are separate processes.
        An exception escaping the block is recorded on the span and marks it as an error.
        Attributes follow the OpenTelemetry messaging conventions (v1.27+).

        Args:
            subject: The subject the message arrived on, not the consumer's filter
                (``messaging.destination.name``, where cardinality does not matter).
            headers: The message's headers; its ``Nats-Msg-Id`` becomes
                ``messaging.message.id``.
            function: The consuming function's name (``jetcut.function``).
            consumer_group: The durable consumer (``messaging.consumer.group.name``).
            contract_subject: ``subject`` without the deployment's namespace, which names
                the span by its kind (default: ``subject``).

        Yields:
            The current span, so the caller can add attributes such as the outcome.
        """
        kind = subject_kind(contract_subject or subject)
        attributes: dict[str, str] = {
            "messaging.system": "nats",
            "messaging.destination.name": subject,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "jetcut.function": function,
        }
        message_id = _header(headers, "Nats-Msg-Id")
        if message_id:
            attributes["messaging.message.id"] = message_id
        if consumer_group:
            attributes["messaging.consumer.group.name"] = consumer_group
        with self.tracer.start_as_current_span(
            f"process {kind}", context=self.extract(headers), kind=trace.SpanKind.CONSUMER,
            attributes=attributes,
        ) as span:
            yield span

    @contextmanager
    def publish_span(
        self, subject: str, *, message_id: str | None = None,
        contract_subject: str | None = None,
    ) -> Iterator[trace.Span]:
        """Open the ``publish <subject kind>`` span; call :meth:`inject` inside it.

        Injecting inside the span makes the consumer's span a child of this one, so the
        trace shows each hop (and each publish retry) rather than one flat list.

        Args:
            subject: The subject being published to (``messaging.destination.name``).
            message_id: Its ``Nats-Msg-Id`` (``messaging.message.id``).
            contract_subject: ``subject`` without the deployment's namespace, which names
                the span by its kind (default: ``subject``).

        Yields:
            The current span.
        """
        attributes = {
            "messaging.system": "nats",
            "messaging.destination.name": subject,
            "messaging.operation.type": "send",
            "messaging.operation.name": "publish",
        }
        if message_id:
            attributes["messaging.message.id"] = message_id
        with self.tracer.start_as_current_span(
            f"publish {subject_kind(contract_subject or subject)}",
            kind=trace.SpanKind.PRODUCER, attributes=attributes,
        ) as span:
            yield span

    # --- metrics exposition ----------------------------------------------------------

    metrics_content_type: str = CONTENT_TYPE_LATEST
    """``Content-Type`` to serve :meth:`metrics_text` with."""

    def metrics_text(self) -> bytes:
        """Render this instance's metrics in the Prometheus text exposition format."""
        return generate_latest(self.registry)

    def start_metrics_server(self, host: str, port: int) -> Awaitable[None]:
        """Serve ``/metrics`` from a background thread (``jetcut run``'s scrape target).

        The gateway serves :meth:`metrics_text` on its own HTTP port instead; stage
        functions have no HTTP server, so they get this small one (``JETCUT_METRICS_PORT``).

        The socket is bound before this returns (binding is immediate and serving runs on
        a daemon thread, so the event loop never blocks). Sync callers, such as an
        on-ready callback, just call it; async callers may ``await`` the result, which is
        already complete.

        Args:
            host: Address to bind (``0.0.0.0`` in containers).
            port: Port to bind; ``0`` picks a free one (see :attr:`metrics_port`).

        Returns:
            A completed awaitable, so ``await telemetry.start_metrics_server(...)`` works too.

        Raises:
            TelemetryError: A metrics server is already running on this instance.
            OSError: The address cannot be bound.
        """
        if self._metrics_server is not None:
            raise TelemetryError("the metrics server is already running")
        self._metrics_server, self._metrics_thread = start_http_server(
            port, addr=host, registry=self.registry
        )
        return _DONE

    @property
    def metrics_port(self) -> int | None:
        """The port the metrics server is bound to, or ``None`` when it is not running."""
        if self._metrics_server is None:
            return None
        return int(self._metrics_server.server_address[1])

    def shutdown(self) -> None:
        """Stop the metrics server and flush and close span exporters.

        Call at process exit: batched spans not yet exported would be lost otherwise.
        Calling it again does nothing.
        """
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        if self._metrics_thread is not None:
            self._metrics_thread.join(timeout=5)
            self._metrics_thread = None
        if not self._shut_down:
            self._shut_down = True
            self._provider.shutdown()


class _Done:
    """An awaitable that is already complete (``await`` on it returns ``None`` at once)."""

    def __await__(self) -> Generator[None, None, None]:
        return
        yield  # pragma: no cover - makes this a generator function


_DONE = _Done()


def _otlp_exporter(endpoint: str) -> SpanExporter:
    """Build the OTLP/HTTP span exporter, which is an optional dependency."""
    try:
        module = importlib.import_module("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    except ImportError as exc:
        raise TelemetryError(
            f"JETCUT_OTEL_EXPORTER=otlp needs the {OTLP_PACKAGE!r} package: "
            f"pip install {OTLP_PACKAGE}"
        ) from exc
    exporter: SpanExporter = module.OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")
    return exporter
