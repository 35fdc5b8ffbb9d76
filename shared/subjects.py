"""Names of every stream, subject, consumer and bucket: the bus contract in one place.

With an empty namespace these are exactly the names in docs/design.md. A namespace prefixes
all of them, so several deployments (or tests) can share one NATS server without interference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

Family = Literal["jobs", "stages", "events", "dlq", "ingest", "advisories"]
"""A stream, by the family of subjects it keeps: one stream per family (``Names.stream``)."""
FAMILIES: tuple[Family, ...] = get_args(Family)


def check_token(kind: str, value: str) -> str:
    """A value used inside a subject or KV key must be one safe token (no ``.``, ``*``, ``>``)."""
    if not TOKEN_RE.match(value):
        raise ValueError(f"{kind} {value!r} must match {TOKEN_RE.pattern}")
    return value


@dataclass(frozen=True)
class Names:
    namespace: str = ""

    def _s(self, subject: str) -> str:
        return f"{self.namespace}.{subject}" if self.namespace else subject

    def _n(self, name: str) -> str:
        return f"{self.namespace.upper()}_{name}" if self.namespace else name

    # streams
    @property
    def jobs_stream(self) -> str:
        return self._n("JOBS")

    @property
    def stages_stream(self) -> str:
        return self._n("STAGES")

    @property
    def events_stream(self) -> str:
        return self._n("EVENTS")

    @property
    def dlq_stream(self) -> str:
        return self._n("DLQ")

    @property
    def ingest_stream(self) -> str:
        """Where MinIO bucket notifications wait for the ingest function (``ingest.minio``)."""
        return self._n("INGEST")

    @property
    def advisories_stream(self) -> str:
        """Where JetStream's max-deliveries advisories for our streams are kept (deadletter)."""
        return self._n("ADVISORIES")

    def stream(self, family: Family) -> str:
        """The stream that keeps ``family``'s subjects (where its consumers live)."""
        return {
            "jobs": self.jobs_stream, "stages": self.stages_stream,
            "events": self.events_stream, "dlq": self.dlq_stream,
            "ingest": self.ingest_stream, "advisories": self.advisories_stream,
        }[family]

    @property
    def jobs_bucket(self) -> str:
        return f"{self.namespace}_jobs" if self.namespace else "jobs"

    @property
    def keys_bucket(self) -> str:
        """API keys (hashed) and their tenants: ``shared.keys``."""
        return f"{self.namespace}_keys" if self.namespace else "keys"

    @property
    def active_bucket(self) -> str:
        """The gateway's index of each tenant's active jobs (the per-tenant cap)."""
        return f"{self.namespace}_active" if self.namespace else "active"

    @property
    def costs_bucket(self) -> str:
        """Cost-model coefficients per (stage, class), kept by ``calibrate``
        (``shared.costbook``)."""
        return f"{self.namespace}_costs" if self.namespace else "costs"

    # subjects
    @property
    def submit(self) -> str:
        return self._s("jobs.submit")

    @property
    def cancel(self) -> str:
        return self._s("jobs.cancel")

    @property
    def retry(self) -> str:
        return self._s("jobs.retry")

    @property
    def cleanup(self) -> str:
        return self._s("jobs.cleanup")

    @property
    def stage_complete(self) -> str:
        return self._s("jobs.stage.complete")

    @property
    def minio_notifications(self) -> str:
        """MinIO's NATS target publishes here (JetStream on): kept in ``INGEST``."""
        return self._s("ingest.minio")

    @property
    def ingest_request(self) -> str:
        """Request/reply submits (JobSubmit or CloudEvent) answered by ingest with the job id.
        Plain NATS, deliberately outside every stream: a stream capturing it would answer
        the requester with its PubAck before ingest could."""
        return self._s("ingest.request")

    def stage(self, stage: str) -> str:
        return self._s(f"stages.{check_token('stage', stage)}")

    def events(self, tenant: str, job_id: str) -> str:
        return self._s(f"events.{check_token('tenant', tenant)}.{check_token('job id', job_id)}")

    def dlq(self, function: str) -> str:
        return self._s(f"dlq.{check_token('function', function)}")

    @staticmethod
    def max_deliveries(stream: str) -> str:
        """JetStream's advisory subject when a consumer of ``stream`` gives up on a message
        (any consumer: the last token is its name). Stream names carry the namespace."""
        return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.*"

    def all(self, family: str) -> str:
        """Wildcard for one family: ``jobs``, ``stages``, ``events`` or ``dlq``."""
        return self._s(f"{family}.>")

    def strip(self, subject: str) -> str:
        """The contract subject without the namespace prefix (for metrics and logs)."""
        prefix = f"{self.namespace}." if self.namespace else ""
        return subject[len(prefix) :] if prefix and subject.startswith(prefix) else subject

    def qualify(self, subject: str) -> str:
        """The inverse of ``strip``: a contract subject (as DLQ entries store it) with this
        deployment's namespace prefix, ready to publish on."""
        return self._s(subject)
