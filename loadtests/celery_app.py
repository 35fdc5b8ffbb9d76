"""The Celery peer of the bus benchmark: one no-op task, chained three times per job.

The worker is started by ``loadtests.bench_bus`` as
``celery -A loadtests.celery_app worker ...`` with ``LOADTESTS_REDIS_URL`` pointing at a
throw-away redis-server on loopback; the benchmark process imports the same app as client.
"""

from __future__ import annotations

import os

from celery import Celery

REDIS_URL = os.environ.get("LOADTESTS_REDIS_URL", "redis://127.0.0.1:6379/0")


def make_app(url: str) -> Celery:
    """A Celery app on the redis at ``url``: the worker's, and a fresh one for each peer the
    client runs (an app keeps its broker connections, which must not outlive their redis)."""
    celery = Celery("loadtests", broker=url, backend=url)
    celery.conf.update(
        # JSON like jetcut's events; results kept for the chain and for the client's join.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # Defaults otherwise (acks on receipt, prefetch multiplier 4): Celery's own
        # out-of-the-box throughput, which is what its users get.
    )

    @celery.task(name="loadtests.step", shared=False)
    def step(value: int) -> int:
        """A no-op stage: hands its input to the next task of the chain."""
        return value

    return celery


app = make_app(REDIS_URL)
