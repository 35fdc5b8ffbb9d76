"""Bus overhead: jobs/s through a 3-step no-op pipeline, against raw nats-py and Celery.

* **jetcut**: conductor + noop functions in one in-process Runtime (as ``jetcut dev`` runs
  them), on a real nats-server. N ``JobSubmit`` events with inline steps a -> b -> c (each
  ``{"stage": "noop"}``) are published with the Bus; the clock runs from the first publish
  until the jobs KV bucket shows the last job ``succeeded``. Everything jetcut does per job is
  in: job record CAS writes, the step lease and fence, status events on the EVENTS stream
  (PubAck'd), CloudEvents/trace headers, PubAcks on every hop (noop writes no files, so no
  manifest). Then 200 jobs one at a time, for the latency of a job alone.
* **raw nats-py**: the same number of messages through three work-queue streams with durable
  pull consumers (stage1 -> stage2 -> stage3, ack each, publish to the next with a PubAck),
  on the same nats-server, with the same fetch/concurrency knobs as jetcut's noop stage and
  no job state at all: the floor any JetStream design pays. Then 200 messages one at a time.
* **Celery**: a chain of three no-op tasks per job on a local redis-server, worker as a
  subprocess; the best of a prefork and a threads pool is reported, on a redis without
  persistence (Celery's usual setup) and on one with ``appendfsync always`` (an fsync per
  write, as nats-server's ``sync_interval: always``: the durability-equal peer).

Every round also reads CPU seconds from ``/proc`` (``loadtests/cpu.py``), and the jetcut
rounds count the requests jetcut makes per job (``loadtests/roundtrips.py``). A full run
takes about 2-3 minutes on 2 cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.js import api

from loadtests import cpu, roundtrips
from loadtests.common import (
    REPO,
    VENV_BIN,
    BenchResult,
    Row,
    load_functions,
    nats_server,
    say,
    temp_dir,
)
from shared.events import InputRef, JobSubmit, StepSpec
from shared.ids import new_job_id
from shared.natsserver import NatsServer, free_port
from shared.runtime import Runtime
from shared.settings import load_settings

NAME = "bus"
PUBLISH_CONCURRENCY = 64
"""Submits in flight at once, for jetcut and both peers alike."""
STAGE_CONCURRENCY = 32
"""Messages one stage handles at once: jetcut's noop stage uses 32 (functions/noop)."""
STAGE_BATCH = 1
"""Messages per fetch: jetcut's noop stage fetches one at a time (Subscription.batch)."""
SINGLE_JOBS = 200
"""Jobs (raw: messages) sent one at a time for the latency figure."""
WAIT_LIMIT_S = 120.0
"""No run may take longer than this; a slower one is reported as a failure."""
PIPELINE = {
    "a": StepSpec(stage="noop", uses=[":input"]),
    "b": StepSpec(stage="noop", uses=["a"]),
    "c": StepSpec(stage="noop", uses=["b"]),
}


class _Status(msgspec.Struct):
    """Just enough of a JobRecord to tell whether it is finished (decoding is the cost)."""

    status: str
    created_at: float = 0.0
    finished_at: float | None = None


_status_decoder = msgspec.json.Decoder(_Status)
TERMINAL = {"succeeded", "failed", "cancelled"}


# --------------------------------------------------------------------------------------------
# jetcut


async def run_jetcut(server: NatsServer, work: Path, *, n: int, warmup: int,
                     rounds: int) -> dict[str, Any]:
    """Start conductor + noop in-process and time ``rounds`` batches of ``n`` jobs."""
    settings = load_settings(
        {}, nats_url=server.url, namespace="benchbus", data_dir=str(work / "data"),
        store="local", store_dir=str(work / "store"), work_dir=str(work / "work"), http_port=0,
    )
    (work / "work").mkdir(parents=True, exist_ok=True)
    runtime = Runtime(settings, load_functions(["conductor", "noop"]), service_name="bench-bus")
    services = await runtime.start()
    try:
        key = "uploads/default/ubenchinput/input.bin"
        await services.store.put_bytes(key, b"jetcut", "application/octet-stream")
        inputs = [InputRef(key=key, filename="input.bin", size=6)]
        await _jetcut_batch(services, inputs, warmup)
        runs = []
        with roundtrips.counting() as counts:
            for index in range(rounds):
                run = await _metered(server, _jetcut_batch(services, inputs, n), n)
                say(f"  jetcut round {index + 1}: {run['jobs_per_s']:.1f} jobs/s "
                    f"({run['succeeded']}/{n} succeeded in {run['wall_s']:.2f}s, "
                    f"{_ms(run['cpu_per_job_s'])} CPU/job)")
                runs.append(run)
        per_job = roundtrips.per_job(counts, n * rounds)
        say(f"  jetcut per job: {per_job}")
        single = await _jetcut_single(services, inputs, SINGLE_JOBS)
        say(f"  jetcut one job at a time: p50 {_ms(single['p50_s'])}, "
            f"p99 {_ms(single['p99_s'])} ({single['succeeded']}/{SINGLE_JOBS})")
        return {"runs": runs, "per_job": per_job, "single": single, "settings": {
            "conductor_concurrency": 32, "conductor_batch": 32,
            "noop_concurrency": STAGE_CONCURRENCY, "noop_batch": STAGE_BATCH,
            "max_ack_pending": settings.max_ack_pending,
            "publish_concurrency": PUBLISH_CONCURRENCY,
        }}
    finally:
        await runtime.stop()


async def _jetcut_batch(services: Any, inputs: list[InputRef], n: int) -> dict[str, Any]:
    bus, names = services.bus, services.names
    job_ids = [new_job_id() for _ in range(n)]
    wanted = set(job_ids)
    finished: dict[str, _Status] = {}
    all_done = asyncio.Event()
    last_terminal = 0.0
    # One watch over the whole bucket (what a dashboard does), started before the first
    # submit so that no transition is missed; only this batch's jobs count.
    watcher = await services.jobs.kv.watchall(ignore_deletes=True)

    async def watch() -> None:
        nonlocal last_terminal
        async for entry in watcher:
            if entry is None or entry.value is None or entry.key not in wanted:
                continue
            record = _status_decoder.decode(entry.value)
            if record.status in TERMINAL and entry.key not in finished:
                finished[entry.key] = record
                last_terminal = time.perf_counter()
                if len(finished) == n:
                    all_done.set()
                    return

    watching = asyncio.create_task(watch())
    gate = asyncio.Semaphore(PUBLISH_CONCURRENCY)

    async def submit(job_id: str) -> None:
        async with gate:
            event = JobSubmit(job_id=job_id, tenant="default", steps=PIPELINE, inputs=inputs)
            await bus.publish(names.submit, event, msg_id=job_id)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(submit(job_id) for job_id in job_ids))
        published = time.perf_counter()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_done.wait(), WAIT_LIMIT_S)
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watching
        with contextlib.suppress(Exception):
            await watcher.stop()
    wall = (last_terminal or time.perf_counter()) - started
    succeeded = sum(1 for r in finished.values() if r.status == "succeeded")
    latencies = sorted(
        (r.finished_at - r.created_at) for r in finished.values() if r.finished_at is not None
    )
    return {
        "jobs": n, "succeeded": succeeded, "terminal": len(finished), "wall_s": wall,
        "publish_s": published - started,
        "jobs_per_s": succeeded / wall if wall > 0 else 0.0,
        "latency_p50_s": _pct(latencies, 50), "latency_p99_s": _pct(latencies, 99),
    }


async def _jetcut_single(services: Any, inputs: list[InputRef], n: int) -> dict[str, Any]:
    """Latency of one job alone: submit, wait until the record says succeeded, repeat."""
    bus, names = services.bus, services.names
    watcher = await services.jobs.kv.watchall(ignore_deletes=True)
    done: dict[str, asyncio.Event] = {}
    status: dict[str, str] = {}

    async def watch() -> None:
        async for entry in watcher:
            if entry is None or entry.value is None or entry.key not in done:
                continue
            record = _status_decoder.decode(entry.value)
            if record.status in TERMINAL:
                status[entry.key] = record.status
                done[entry.key].set()

    watching = asyncio.create_task(watch())
    latencies: list[float] = []
    try:
        for _ in range(n):
            job_id = new_job_id()
            done[job_id] = asyncio.Event()
            event = JobSubmit(job_id=job_id, tenant="default", steps=PIPELINE, inputs=inputs)
            started = time.perf_counter()
            await bus.publish(names.submit, event, msg_id=job_id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done[job_id].wait(), 30)
            if status.get(job_id) == "succeeded":
                latencies.append(time.perf_counter() - started)
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watching
        with contextlib.suppress(Exception):
            await watcher.stop()
    return _latency(latencies, n)


def _latency(latencies: list[float], n: int) -> dict[str, Any]:
    latencies.sort()
    return {"jobs": n, "succeeded": len(latencies), "p50_s": _pct(latencies, 50),
            "p99_s": _pct(latencies, 99)}


async def _metered(server: NatsServer, work: Any, n: int) -> dict[str, Any]:
    """Run one round (``work``: a coroutine returning its figures) and add the CPU seconds
    per job of this process (conductor and stages, or the raw peer) and of nats-server."""
    own, broker = cpu.Meter([os.getpid()]), cpu.Meter([server.pid])
    own.start()
    broker.start()
    run: dict[str, Any] = await work
    return {**run, "cpu_per_job_s": _per(own.stop(), n),
            "broker_cpu_per_job_s": _per(broker.stop(), n)}


def _per(total: float | None, n: int) -> float | None:
    return None if total is None else total / n


def _pct(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    index = min(len(values) - 1, max(0, round(pct / 100 * len(values)) - 1))
    return values[index]


# --------------------------------------------------------------------------------------------
# raw nats-py


async def run_raw(server: NatsServer, *, n: int, warmup: int, rounds: int) -> dict[str, Any]:
    """Three work-queue streams with durable pull consumers, no state: the JetStream floor."""
    nc = await nats.connect(server.url, name="bench-raw")
    try:
        js = nc.jetstream(timeout=5.0)
        await _raw_batch(js, "rawwarm", warmup)
        runs = []
        for index in range(rounds):
            run = await _metered(server, _raw_batch(js, f"raw{index}", n), n)
            say(f"  raw nats-py round {index + 1}: {run['jobs_per_s']:.1f} jobs/s "
                f"({run['succeeded']}/{n} in {run['wall_s']:.2f}s, "
                f"{_ms(run['cpu_per_job_s'])} CPU/job)")
            runs.append(run)
        single = await _raw_batch(js, "rawsingle", SINGLE_JOBS, one_at_a_time=True)
        say(f"  raw nats-py one message at a time: p50 {_ms(single['p50_s'])}")
        return {"runs": runs, "single": single, "settings": {
            "stage_concurrency": STAGE_CONCURRENCY, "stage_batch": STAGE_BATCH,
            "max_ack_pending": 256, "publish_concurrency": PUBLISH_CONCURRENCY,
            "storage": "file (same server: sync_interval always)",
        }}
    finally:
        await nc.drain()


async def _raw_batch(js: Any, prefix: str, n: int, *,
                     one_at_a_time: bool = False) -> dict[str, Any]:
    """``n`` messages through the three stages: all at once (throughput), or one at a time
    (latency: each injected when the previous left the last stage)."""
    stages = [f"{prefix}.s{i}" for i in (1, 2, 3)]
    for index, subject in enumerate(stages, start=1):
        stream = f"{prefix.upper()}_S{index}"
        await js.add_stream(api.StreamConfig(
            name=stream, subjects=[subject], retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE, num_replicas=1,
        ))
        await js.add_consumer(stream, api.ConsumerConfig(
            durable_name="worker", ack_policy=api.AckPolicy.EXPLICIT, ack_wait=30.0,
            max_deliver=5, max_ack_pending=256, filter_subject=subject,
        ))
    done = 0
    all_done = asyncio.Event()
    one_done = asyncio.Event()
    last = 0.0
    stop = asyncio.Event()

    async def handle(msg: Any, next_subject: str | None) -> None:
        nonlocal done, last
        if next_subject is not None:
            await js.publish(next_subject, msg.data)
        await msg.ack()
        if next_subject is None:
            done += 1
            last = time.perf_counter()
            one_done.set()
            if done == n:
                all_done.set()

    async def worker(index: int) -> None:
        stream = f"{prefix.upper()}_S{index + 1}"
        sub = await js.pull_subscribe_bind(durable="worker", stream=stream)
        next_subject = stages[index + 1] if index + 1 < len(stages) else None
        inflight: set[asyncio.Task[None]] = set()
        while not stop.is_set():
            free = STAGE_CONCURRENCY - len(inflight)
            if free <= 0:
                await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                msgs = await sub.fetch(min(free, STAGE_BATCH), timeout=0.5)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                task = asyncio.create_task(handle(msg, next_subject))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
        if inflight:
            await asyncio.gather(*inflight, return_exceptions=True)
        with contextlib.suppress(Exception):
            await sub.unsubscribe()

    workers = [asyncio.create_task(worker(i)) for i in range(3)]
    gate = asyncio.Semaphore(PUBLISH_CONCURRENCY)
    payload = b'{"job":%d,"step":"a"}'

    async def inject(i: int) -> None:
        async with gate:
            await js.publish(stages[0], payload % i)

    latencies: list[float] = []
    started = time.perf_counter()
    try:
        if one_at_a_time:
            for i in range(n):
                one_done.clear()
                began = time.perf_counter()
                await inject(i)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(one_done.wait(), 30)
                    latencies.append(time.perf_counter() - began)
        else:
            await asyncio.gather(*(inject(i) for i in range(n)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_done.wait(), WAIT_LIMIT_S)
    finally:
        stop.set()
        await asyncio.gather(*workers, return_exceptions=True)
    if one_at_a_time:
        return _latency(latencies, n)
    wall = (last or time.perf_counter()) - started
    return {"jobs": n, "succeeded": done, "wall_s": wall,
            "jobs_per_s": done / wall if wall > 0 else 0.0}


# --------------------------------------------------------------------------------------------
# Celery on redis


def ensure_redis() -> str | None:
    """Path of redis-server, installing Debian's package if missing; None if impossible."""
    found = shutil.which("redis-server")
    if found:
        return found
    say("redis-server is missing; installing it with loadtests/ensure_redis.sh (apt-get)")
    try:
        proc = subprocess.run(["bash", str(REPO / "loadtests" / "ensure_redis.sh")],
                              capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        say(f"  could not run ensure_redis.sh: {exc!r}")
        return None
    if proc.returncode != 0:
        say(f"  ensure_redis.sh failed: {proc.stderr.strip()[-300:]}")
        return None
    return shutil.which("redis-server")


@contextlib.contextmanager
def redis_server(binary: str, work: Path, *, fsync: bool = False):  # type: ignore[no-untyped-def]
    """A throw-away redis-server on a free loopback port: (its URL, its pid).

    Without persistence by default (Celery's usual broker); ``fsync`` turns on the
    append-only file with ``appendfsync always``, an fsync per write like nats-server's
    ``sync_interval: always``: the durability-equal peer.
    """
    import redis

    port = free_port()
    work.mkdir(parents=True, exist_ok=True)
    persistence = ["--appendonly", "yes", "--appendfsync", "always"] if fsync else [
        "--appendonly", "no"]
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *persistence,
         "--dir", str(work), "--daemonize", "no", "--protected-mode", "yes",
         "--logfile", str(work / "redis.log")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/0", proc.pid
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM the child's own process group (a prefork worker's pool children too), then
    SIGKILL whatever is left of it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_celery(work: Path, *, n: int, warmup: int, rounds: int,
               fsync: bool = False) -> dict[str, Any]:
    """Time ``n`` three-task chains on each worker pool (on a redis that fsyncs every write
    when ``fsync``); raises RuntimeError to skip."""
    try:
        import celery  # noqa: F401
        import redis  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"celery[redis] is not installed ({exc}); make install adds it") \
            from None
    binary = ensure_redis()
    if binary is None:
        raise RuntimeError("redis-server is not available and could not be installed")
    pools = [("prefork", 2), ("threads", STAGE_CONCURRENCY)]
    out: dict[str, Any] = {"pools": {}}
    with redis_server(binary, work / "redis", fsync=fsync) as (url, redis_pid):
        from loadtests.celery_app import make_app

        app = make_app(url)

        # The worker stores every task's result in redis (its state tracking); the client
        # reads the chains' final results straight from redis (one MGET per poll) instead
        # of Celery's pub/sub result consumer, which stalled now and then on this workload.
        app.conf.update(broker_url=url, result_backend="disabled")
        try:
            for pool, concurrency in pools:
                out["pools"][f"{pool} -c {concurrency}"] = _celery_pool(
                    app, url, redis_pid, pool, concurrency, n=n, warmup=warmup,
                    rounds=rounds)
        finally:
            # Close the client's broker connections while redis still answers.
            with contextlib.suppress(Exception):
                app.close()
    return out


def _celery_pool(app: Any, url: str, redis_pid: int, pool: str, concurrency: int, *, n: int,
                 warmup: int, rounds: int) -> dict[str, Any]:
    import redis
    from celery import chain

    step = app.signature("loadtests.step")

    env = {**os.environ, "LOADTESTS_REDIS_URL": url}
    argv = [str(VENV_BIN / "celery"), "-A", "loadtests.celery_app", "worker",
            f"--pool={pool}", "-c", str(concurrency), "--loglevel=WARNING",
            "--without-gossip", "--without-mingle", "--without-heartbeat"]
    log_path = Path(tempfile.gettempdir()) / f"jetcut-bench-celery-{pool}-{os.getpid()}.log"
    log = log_path.open("wb")
    worker = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    rc = redis.Redis.from_url(url)
    try:
        _wait_for_worker(app, worker, log_path)
        app.control.purge()

        def batch(count: int, base: int) -> dict[str, Any]:
            # CPU of the client (this process, as for jetcut and the raw peer) and the
            # worker with its pool; redis apart, as nats-server is.
            own = cpu.Meter([os.getpid()], trees=[worker.pid])
            broker = cpu.Meter([redis_pid])
            own.start()
            broker.start()
            started = time.perf_counter()
            results = [chain(step.clone((base + i,)), step.clone(), step.clone()).apply_async()
                       for i in range(count)]
            published = time.perf_counter()
            pending = {f"celery-task-meta-{r.id}": base + i for i, r in enumerate(results)}
            ok = 0
            last = started
            deadline = time.monotonic() + WAIT_LIMIT_S
            while pending and time.monotonic() < deadline:
                keys = list(pending)
                for key, raw in zip(keys, rc.mget(keys), strict=True):
                    if raw is None:
                        continue
                    meta = json.loads(raw)
                    if meta.get("status") in ("SUCCESS", "FAILURE", "REVOKED"):
                        ok += meta.get("result") == pending.pop(key)
                        last = time.perf_counter()
                if pending:
                    time.sleep(0.002)
            if pending:
                tail = log_path.read_text(errors="replace")[-800:]
                raise RuntimeError(f"{pool} pool: {len(pending)}/{count} chains unfinished "
                                   f"after {WAIT_LIMIT_S:.0f}s; worker log: {tail}")
            wall = last - started
            return {"jobs": count, "succeeded": ok, "wall_s": wall,
                    "publish_s": published - started,
                    "jobs_per_s": ok / wall if wall > 0 else 0.0,
                    "cpu_per_job_s": _per(own.stop(), count),
                    "broker_cpu_per_job_s": _per(broker.stop(), count)}

        # The warm-up also waits for the worker to come up (imports, pool start).
        batch(warmup, 1_000_000)
        runs = []
        for index in range(rounds):
            run = batch(n, index * n)
            say(f"  celery {pool} -c {concurrency} round {index + 1}: "
                f"{run['jobs_per_s']:.1f} jobs/s ({run['succeeded']}/{n} in {run['wall_s']:.2f}s, "
                f"{_ms(run['cpu_per_job_s'])} CPU/job)")
            runs.append(run)
        return {"runs": runs, "median_jobs_per_s": statistics.median(
            r["jobs_per_s"] for r in runs), **_cpu_medians(runs)}
    finally:
        rc.close()
        _stop(worker)
        log.close()
        log_path.unlink(missing_ok=True)


def _wait_for_worker(app: Any, worker: subprocess.Popen[bytes], log_path: Path) -> None:
    """Until the worker answers a ping (it is consuming), or fail with its log's tail."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            break
        if app.control.ping(timeout=0.5):
            return
    tail = log_path.read_text(errors="replace")[-800:]
    raise RuntimeError(f"the Celery worker did not come up: {tail}")


# --------------------------------------------------------------------------------------------


def median_rate(runs: list[dict[str, Any]]) -> float:
    return statistics.median(r["jobs_per_s"] for r in runs)


def _cpu_medians(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in ("cpu_per_job_s", "broker_cpu_per_job_s"):
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    return out


def _cpu_note(figures: dict[str, Any], broker: str) -> str:
    """``CPU/job: 4.1 ms (+ nats-server 1.2 ms)`` from a run's medians."""
    return (f"CPU/job {_ms(figures.get('cpu_per_job_s'))} "
            f"(+ {broker} {_ms(figures.get('broker_cpu_per_job_s'))})")


def run(*, quick: bool) -> BenchResult:
    n = 50 if quick else 200
    rounds = 1 if quick else 3
    warmup = 10 if quick else 20
    result = BenchResult(name=NAME)
    result.raw["n_jobs"] = n
    result.raw["rounds"] = rounds
    with temp_dir("bus") as work, nats_server(work / "nats") as server:
        say(f"bus: raw nats-py peer, {rounds} x {n} jobs, then {SINGLE_JOBS} one at a time")
        raw = asyncio.run(run_raw(server, n=n, warmup=warmup, rounds=rounds))
        say(f"bus: jetcut (conductor + noop in-process), {rounds} x {n} jobs, then "
            f"{SINGLE_JOBS} one at a time")
        jet = asyncio.run(run_jetcut(server, work / "jetcut", n=n, warmup=warmup, rounds=rounds))
    result.raw["raw_nats"] = raw
    result.raw["jetcut"] = jet
    jet_rate = median_rate(jet["runs"])
    jet_cpu = _cpu_note(_cpu_medians(jet["runs"]), "nats-server")
    metric = f"3-step no-op pipeline, {n} jobs (median of {rounds})"
    incomplete = [r for r in jet["runs"] if r["succeeded"] != n]
    result.rows.append(Row(
        benchmark=NAME, metric=metric, unit="jobs/s", jetcut=jet_rate,
        peer_name="raw nats-py (3 work-queue streams)", peer=median_rate(raw["runs"]),
        target_op=">=", target=0.5,
        note=f"jetcut {jet_cpu}; raw {_cpu_note(_cpu_medians(raw['runs']), 'nats-server')}"
             + ("; incomplete runs" if incomplete else ""),
    ))
    if incomplete:
        result.notes.append(f"{len(incomplete)} jetcut round(s) did not finish every job "
                            f"within {WAIT_LIMIT_S:.0f}s; their rate counts succeeded jobs only")
    result.rows.append(Row(
        benchmark=NAME, metric=f"one job at a time, 3 no-op steps, p50 of {SINGLE_JOBS}",
        unit="ms", jetcut=_in_ms(jet["single"]["p50_s"]),
        peer_name="raw nats-py: one message through 3 stages",
        peer=_in_ms(raw["single"]["p50_s"]), target_op="<=", target=3.0,
        note=f"p99 jetcut {_ms(jet['single']['p99_s'])}, raw {_ms(raw['single']['p99_s'])}",
    ))

    for fsync, label in ((False, "no persistence"), (True, "appendfsync always")):
        say(f"bus: Celery peer (redis, {label}), {rounds} x {n} jobs per pool")
        key = "celery_fsync" if fsync else "celery"
        try:
            with temp_dir("celery") as work:
                cel = run_celery(work, n=n, warmup=warmup, rounds=rounds, fsync=fsync)
        except Exception as exc:
            say(f"  Celery peer ({label}) skipped: {exc}")
            result.notes.append(f"Celery peer ({label}) skipped: {exc}")
            result.raw[key] = {"skipped": str(exc)}
            result.rows.append(Row(benchmark=NAME, metric=metric, unit="jobs/s",
                                   jetcut=jet_rate, peer_name=f"Celery ({label}): skipped",
                                   target_op=">=", target=3.0))
            continue
        result.raw[key] = cel
        best_pool, best = max(cel["pools"].items(), key=lambda kv: kv[1]["median_jobs_per_s"])
        result.rows.append(Row(
            benchmark=NAME, metric=metric, unit="jobs/s", jetcut=jet_rate,
            peer_name=f"Celery chain on redis, {label} ({best_pool})",
            peer=best["median_jobs_per_s"], target_op=">=", target=3.0,
            note=f"jetcut {jet_cpu}; Celery {_cpu_note(best, 'redis-server')}",
        ))
        others = ", ".join(f"{pool}: {data['median_jobs_per_s']:.1f} jobs/s"
                           for pool, data in cel["pools"].items())
        result.notes.append(f"Celery ({label}) pools tried (best one reported): {others}.")
    last = jet["runs"][-1]
    per_job = jet["per_job"]
    result.notes += [
        f"jetcut job latency under load (submit -> succeeded, last round): p50 "
        f"{_s(last['latency_p50_s'])}, p99 {_s(last['latency_p99_s'])}.",
        f"Knobs: {PUBLISH_CONCURRENCY} submits in flight for every system; jetcut's noop stage "
        f"and the raw stages handle {STAGE_CONCURRENCY} messages at once and fetch "
        f"{STAGE_BATCH} per pull; the conductor handles 32 at once, fetching 1 per pull.",
        f"Per job, measured (loadtests/roundtrips.py): jetcut makes {per_job['round_trips']} "
        f"request/reply round trips to nats-server ({per_job.get('kv_get', 0)} job-record KV "
        f"reads, {per_job.get('kv_write', 0)} compare-and-set writes, "
        f"{per_job.get('publish_acked', 0)} publishes awaiting a PubAck: the submit, tasks, "
        f"completions, durable status announcements and the cleanup request) besides "
        f"{per_job.get('fetch', 0)} fetches, {per_job.get('ack', 0)} acks and "
        f"{per_job.get('fire_and_forget', 0)} fire-and-forget step events; the raw peer makes "
        "3 publishes, 3 fetches and 3 acks. Both use the same nats-server with "
        "sync_interval: always (an fsync per stored write).",
        "CPU/job is user+system time from /proc over each round: for jetcut and the raw peer "
        "the benchmark process (it hosts conductor and noop, or the raw stages, and the "
        "submitter), for Celery the client process plus the worker and its pool; the "
        "broker (nats-server, redis-server) is given apart.",
        "See loadtests/reports/bus-profile.md for the py-spy profile before and after the "
        "hot-path cuts.",
    ]
    return result


def _in_ms(value: float | None) -> float | None:
    return None if value is None else value * 1000


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value * 1000:.1f} ms"


def _s(value: float | None) -> str:
    return "—" if value is None else f"{value * 1000:.0f} ms"
