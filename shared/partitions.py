"""Which partition a job belongs to: one stable hash of its id over the partitions' namespaces.

A partition is a whole jetcut namespace (docs/design.md, amendment 1): its own ``JOBS``,
``STAGES`` and ``EVENTS`` streams and its own jobs KV bucket, served by its own conductors
and stage workers, with its streams' leaders on whichever cluster node it is placed on. A
job lives in exactly one partition for its whole life, so nothing crosses partitions and
every guarantee (PubAck commit points, the CAS fence with its lease) holds inside each one
unchanged. The only shared decision is this function: whoever submits a job and whoever
reads it later (the gateway's ``GET /v1/jobs/{id}``) must compute the same partition from
the job id alone. Keyed submissions get a job id derived from their idempotency key
(``shared/submission.py``), so a retried request lands in the same partition and its
deduplication still works. See docs/scaling.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def partition_of(job_id: str, partitions: Sequence[str]) -> str:
    """The namespace of ``job_id``'s partition among ``partitions`` (order matters).

    SHA-256 rather than Python's ``hash`` (randomised per process): every process, in any
    language, must agree. Changing the list re-homes jobs, so partitions are only added
    with a migration, never on the fly.

    Raises:
        ValueError: when ``partitions`` is empty.
    """
    if not partitions:
        raise ValueError("at least one partition is needed")
    digest = hashlib.sha256(job_id.encode()).digest()
    return partitions[int.from_bytes(digest[:8], "big") % len(partitions)]
