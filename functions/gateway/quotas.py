"""Admission of a new job: the per-tenant cap on active jobs and queue backpressure.

**Active-job cap.** The gateway indexes each job it accepts under ``<tenant>.<job_id>`` in
the KV bucket ``active``. Counting a tenant's entries is one stream-info request (the server
counts subjects), however many jobs exist in total. Nothing has to remove an entry when a
job finishes: once a tenant's count reaches the cap, its entries are checked against the job
records (the truth) and finished or vanished jobs are pruned; only then is a submission
refused. So the usual submit costs one KV put and one count, and the check is exact because
the new entry is written *before* counting: two racing submits can both be refused at the
edge, never both let past the cap. The trade-off: pruning reads up to ``cap`` records, and
only jobs submitted through this gateway are counted (bus publishers have their own rate).

**Backpressure.** A submission is refused with 503 ``overloaded`` when a stage it needs has
``JETCUT_BACKPRESSURE_MAX_PENDING`` tasks or more in the ``STAGES`` work queue (waiting or
in flight: the stream holds a task until its ack), or the conductor has that many unread
submits. The numbers come from one stream-info and one consumer-info request, cached for
``CACHE_S`` so a burst of submissions costs the server nothing extra.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from nats.js import api
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from shared.costbook import job_backlog
from shared.errors import ErrorCode, PermanentError, TransientError
from shared.function import Services
from shared.jobstate import JobRecord
from shared.jobstore import JobNotFound
from shared.recipes import resolve
from shared.retry import ride_out

CACHE_S = 1.0
RETRY_AFTER_S = 5
SUBMIT_QUEUE = "jobs.submit"
"""How the conductor's own backlog is named in ``overloaded`` details."""
CONDUCTOR_SUBMIT = "conductor-submit"


class ActiveJobs:
    """The per-tenant index of active jobs (see the module doc)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.bucket = services.names.active_bucket
        """A KV bucket is the stream ``KV_<bucket>``; each key, a subject ``$KV.<bucket>.<key>``."""
        self._kv: KeyValue | None = None
        self._opening = asyncio.Lock()

    async def _bucket(self) -> KeyValue:
        async with self._opening:
            if self._kv is None:
                s = self.services
                try:
                    self._kv = await s.bus.js.key_value(self.bucket)
                except BucketNotFoundError:
                    # Entries outlive no job: retention deletes finished jobs after this too.
                    self._kv = await s.bus.js.create_key_value(api.KeyValueConfig(
                        bucket=self.bucket, history=1, ttl=s.settings.retention_s,
                        storage=api.StorageType.FILE, replicas=s.settings.replicas,
                        description="jetcut: each tenant's active jobs (gateway cap)",
                    ))
            return self._kv

    async def _entries(self, tenant: str) -> list[str]:
        info = await self.services.bus.js.stream_info(
            f"KV_{self.bucket}", subjects_filter=f"$KV.{self.bucket}.{tenant}.*")
        return [subject.rsplit(".", 1)[-1] for subject in (info.state.subjects or {})]

    async def _forget(self, tenant: str, job_id: str) -> None:
        # Purge the subject outright: a delete marker would still count as a subject.
        await self._bucket()
        await self.services.bus.js.purge_stream(f"KV_{self.bucket}",
                                                subject=f"$KV.{self.bucket}.{tenant}.{job_id}")

    async def _active(self, job_id: str) -> bool:
        try:
            record = await self.services.jobs.get(job_id)
        except JobNotFound:
            return False
        return not record.terminal

    async def _exists(self, job_id: str) -> bool:
        try:
            await self.services.jobs.get(job_id)
        except JobNotFound:
            return False
        return True

    async def admit(self, tenant: str, job_id: str, *, retried: bool = False) -> None:
        """Count ``job_id`` among ``tenant``'s active jobs, or refuse it over the cap.

        ``retried``: the job exists and finished, and is about to run again; unlike a repeat
        of an accepted request, it is refused over the cap.

        Raises:
            PermanentError: 429 ``too_many_active_jobs``.
        """
        cap = self.services.settings.max_active_jobs_per_tenant
        if cap == 0 and self.services.settings.cost_budget_s == 0:
            return
        kv = await self._bucket()
        await ride_out(lambda: kv.put(f"{tenant}.{job_id}", b""))
        if cap == 0:
            return  # indexed for the compute budget (CostBudget) only
        entries = await self._entries(tenant)
        if len(entries) <= cap:
            return
        for other in entries:
            if other != job_id and not await self._active(other):
                await self._forget(tenant, other)
        entries = await self._entries(tenant)
        if len(entries) <= cap or (not retried and await self._exists(job_id)):
            return  # (a repeat of a keyed request is answered with its job, never refused)
        await self.release(tenant, job_id)
        active = len(entries) - 1
        raise PermanentError(ErrorCode.TOO_MANY_ACTIVE_JOBS,
                             f"tenant {tenant!r} has {active} queued or running jobs, the "
                             f"most allowed is {cap}; submit again when some have finished",
                             details={"active": active, "limit": cap,
                                      "retry_after_s": RETRY_AFTER_S})

    async def release(self, tenant: str, job_id: str) -> None:
        """Take back an admission whose job was never queued."""
        await self._forget(tenant, job_id)

    async def job_ids(self, tenant: str) -> list[str]:
        """The tenant's indexed jobs (some may have finished since: see ``forget``)."""
        await self._bucket()
        return await self._entries(tenant)

    async def forget(self, tenant: str, job_id: str) -> None:
        """Drop a finished job from the index."""
        await self._forget(tenant, job_id)


class Backlog:
    """Per-stage queue depth, cached for ``CACHE_S``."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self._depth: dict[str, int] = {}
        self._at = float("-inf")
        self._refreshing = asyncio.Lock()

    async def depth(self) -> dict[str, int]:
        """Tasks per stage (waiting or in flight) and the conductor's unread submits."""
        async with self._refreshing:
            if time.monotonic() - self._at < CACHE_S:
                return self._depth
            s = self.services
            info = await s.bus.js.stream_info(s.names.stages_stream,
                                              subjects_filter=s.names.all("stages"))
            depth: dict[str, int] = {}
            for subject, count in (info.state.subjects or {}).items():
                # Both lanes of a stage (fair share: ``stages.<stage>.bulk``) count.
                stage = s.names.strip(subject).removeprefix("stages.").removesuffix(".bulk")
                depth[stage] = depth.get(stage, 0) + count
            try:
                consumer = await s.bus.js.consumer_info(s.names.jobs_stream, CONDUCTOR_SUBMIT)
                depth[SUBMIT_QUEUE] = consumer.num_pending or 0
            except NotFoundError:
                pass  # no conductor has ever run: nothing to measure yet
            self._depth, self._at = depth, time.monotonic()
            return depth

    async def check(self, stages: Iterable[str]) -> None:
        """Refuse a job whose stages (or the conductor) are too far behind.

        Raises:
            TransientError: 503 ``overloaded`` with ``Retry-After``.
        """
        limit = self.services.settings.backpressure_max_pending
        if limit == 0:
            return
        depth = await self.depth()
        for queue in (SUBMIT_QUEUE, *sorted(set(stages))):
            pending = depth.get(queue, 0)
            if pending >= limit:
                raise TransientError(f"the {queue} queue is {pending} deep (the limit is "
                                     f"{limit}); retry in {RETRY_AFTER_S}s",
                                     code=ErrorCode.OVERLOADED,
                                     details={"queue": queue, "pending": pending,
                                              "limit": limit, "retry_after_s": RETRY_AFTER_S})


class CostBudget:
    """A tenant's predicted compute-seconds still to run, against ``JETCUT_COST_BUDGET_S``.

    The backlog is summed over the tenant's active jobs (the ``active`` index, which the
    active-job cap keeps) with the calibrated cost model (``shared.costbook``); a job not yet
    probed counts each of its steps at the stage's fixed cost, since its media is unknown.
    So the budget caps work already queued: a tenant over it is refused until enough of its
    queued compute has run. Two submits at the same moment can both pass (each sees the
    other's job not yet indexed): a budget, not an exact cap.
    """

    def __init__(self, services: Services, active_jobs: ActiveJobs) -> None:
        self.services = services
        self.active_jobs = active_jobs

    async def check(self, tenant: str, job_id: str) -> None:
        """Refuse a new job of a tenant whose queued compute exceeds the budget.

        Raises:
            PermanentError: 429 ``over_budget`` (``retry_after_s``: about when enough of
                the backlog will have run, with one worker).
        """
        budget = self.services.settings.cost_budget_s
        if budget == 0:
            return
        now, backlog = time.time(), 0.0
        for other in await self.active_jobs.job_ids(tenant):
            if other == job_id:
                continue
            try:
                record = await self.services.jobs.get(other)
            except JobNotFound:
                record = None
            if record is None or record.terminal:
                await self.active_jobs.forget(tenant, other)  # keeps the index short
                continue
            backlog += await job_backlog(self.services.costs, record, now)
        if backlog <= budget:
            return
        raise PermanentError(ErrorCode.OVER_BUDGET,
                             f"tenant {tenant!r} has {backlog:.0f} predicted compute-seconds "
                             f"queued or running, the budget is {budget:g}; submit again "
                             f"when some of it has run",
                             details={"backlog_s": round(backlog, 1), "budget_s": budget,
                                      "retry_after_s": max(RETRY_AFTER_S,
                                                           round(backlog - budget))})


class Admission:
    """Whether a job may be queued now: backpressure, its tenant's compute budget, then its
    tenant's active-job cap."""

    def __init__(self, services: Services) -> None:
        self.active_jobs = ActiveJobs(services)
        self.backlog = Backlog(services)
        self.budget = CostBudget(services, self.active_jobs)

    async def admit(self, record: JobRecord, *, retried: bool = False) -> None:
        """Admission of one validated job: backpressure on the stages it needs, then its
        tenant's active-job cap. Call it before the job's record is created.

        Raises:
            JetcutError: 503 ``overloaded``, 429 ``over_budget`` or 429
                ``too_many_active_jobs``.
        """
        steps = resolve(record.recipe, record.pipeline, record.params, len(record.inputs))
        await self.backlog.check(spec.stage for spec in steps.values())
        await self.budget.check(record.tenant, record.job_id)
        await self.active_jobs.admit(record.tenant, record.job_id, retried=retried)

    async def release(self, record: JobRecord) -> None:
        """Take back an admission whose job was never queued."""
        await self.active_jobs.release(record.tenant, record.job_id)
