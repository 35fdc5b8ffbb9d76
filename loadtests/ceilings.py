"""Ceilings: how fast one KV bucket and one stream go on this machine, and two partitions.

``python -m loadtests.ceilings [--quick] [--no-partitions]`` measures, with
``sync_interval: always`` (an fsync per write, as every shipped topology runs):

* **one KV bucket's compare-and-set writes/s**: ``kv.update(key, value, last=revision)``
  on many keys at once (each writer owns its keys, so no write loses a race: the figure is
  the bucket's, not contention's), a job-record-sized value (1 KiB);
* **one stream's PubAck'd publishes/s**: ``js.publish`` with a ``Nats-Msg-Id`` (as every
  jetcut publish has), a window of publishes in flight, a task-sized payload (512 B);

each on an embedded single server (R1) and on the 3-node loopback cluster
(``tests/support/natscluster.py``, R3). The load comes from several client processes
(Python's client costs CPU per request; one process alone would measure itself). Then
(unless ``--no-partitions``) ``loadtests/partitions.py`` runs the 3-step no-op pipeline on
the cluster with one partition vs two. The report goes to ``loadtests/reports/scaling.md``.

Bounded: every measurement runs for a fixed number of seconds; the whole run takes a few
minutes (``--quick``: well under one). Loopback only; servers and temp dirs are removed.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests.common import REPORTS, machine_info, nats_server, now, say, temp_dir

KV_VALUE = b"x" * 1024
"""About one job record (a 3-step job's JSON is 1-2 KiB)."""
STREAM_PAYLOAD = b"y" * 512
"""About one StageTask."""
CLIENT_PROCESSES = 2
IN_FLIGHT = 128
"""Requests in flight per client process (KV writers, or publishes awaiting a PubAck)."""


@dataclass(frozen=True)
class Ceiling:
    what: str
    topology: str
    ops_per_s: float
    ops: int
    seconds: float
    errors: int


def _client(kind: str, urls: str, target: str, index: int, seconds: float,
            in_flight: int) -> tuple[int, int, float]:
    """One client process: (ops done, errors, seconds measured)."""
    return asyncio.run(_client_async(kind, urls, target, index, seconds, in_flight))


async def _client_async(kind: str, urls: str, target: str, index: int, seconds: float,
                        in_flight: int) -> tuple[int, int, float]:
    import nats

    nc = await nats.connect(urls.split(","), name=f"ceiling-{kind}-{index}")
    js = nc.jetstream(timeout=10.0)
    done = errors = 0
    stop_at = 0.0
    try:
        if kind == "kv":
            kv = await js.key_value(target)

            async def writer(slot: int) -> None:
                nonlocal done, errors
                key = f"k{index}_{slot}"
                revision = await kv.put(key, KV_VALUE)
                while time.monotonic() < stop_at:
                    try:
                        revision = await kv.update(key, KV_VALUE, last=revision)
                        done += 1
                    except Exception:
                        errors += 1
                        revision = (await kv.get(key)).revision or 0
            work = writer
        else:
            async def publisher(slot: int) -> None:
                nonlocal done, errors
                seq = 0
                while time.monotonic() < stop_at:
                    seq += 1
                    try:
                        await js.publish(f"{target.lower()}.x", STREAM_PAYLOAD,
                                         headers={"Nats-Msg-Id": f"{index}.{slot}.{seq}"})
                        done += 1
                    except Exception:
                        errors += 1
            work = publisher
        started = time.monotonic()
        stop_at = started + seconds
        await asyncio.gather(*(work(slot) for slot in range(in_flight)))
        return done, errors, time.monotonic() - started
    finally:
        await nc.close()


async def _provision(urls: str, replicas: int, prefix: str, parts: int,
                     leaders: list[str] | None) -> None:
    """``parts`` KV buckets and streams; with ``leaders``, partition i's on ``leaders[i]``."""
    import nats
    from nats.js import api

    from tests.support.natscluster import lead_on

    nc = await nats.connect(urls.split(","), name="ceiling-setup")
    try:
        js = nc.jetstream(timeout=10.0)
        for part in range(parts):
            bucket, stream = f"{prefix}{part}", f"{prefix.upper()}{part}"
            await js.create_key_value(api.KeyValueConfig(
                bucket=bucket, history=5, storage=api.StorageType.FILE, replicas=replicas))
            await js.add_stream(api.StreamConfig(
                name=stream, subjects=[f"{stream.lower()}.>"], storage=api.StorageType.FILE,
                num_replicas=replicas, duplicate_window=120.0,
                retention=api.RetentionPolicy.LIMITS))
            if leaders:
                await lead_on(nc, f"KV_{bucket}", leaders[part])
                await lead_on(nc, stream, leaders[part])
    finally:
        await nc.close()


def measure(urls: str, topology: str, replicas: int, *, seconds: float, parts: int = 1,
            leaders: list[str] | None = None, processes: int = CLIENT_PROCESSES,
            in_flight: int = IN_FLIGHT) -> list[Ceiling]:
    """The KV CAS and the stream PubAck ceilings on the servers at ``urls``: of one bucket
    and one stream, or of ``parts`` of each (client process i loads partition i % parts)."""
    prefix = f"ceil{parts}p"
    asyncio.run(_provision(urls, replicas, prefix, parts, leaders))
    out = []
    context = multiprocessing.get_context("spawn")  # no inherited event loop or sockets
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        for kind, what in (("kv", "KV compare-and-set writes"),
                           ("stream", "stream publishes with PubAck")):
            targets = [f"{prefix}{i % parts}" if kind == "kv" else f"{prefix.upper()}{i % parts}"
                       for i in range(processes)]
            results = list(pool.map(_client, [kind] * processes, [urls] * processes,
                                    targets, range(processes),
                                    [seconds] * processes, [in_flight] * processes))
            ops = sum(r[0] for r in results)
            errors = sum(r[1] for r in results)
            span = max(r[2] for r in results)
            ceiling = Ceiling(what=what, topology=topology, ops_per_s=ops / span, ops=ops,
                              seconds=span, errors=errors)
            say(f"  {topology}: {what}: {ceiling.ops_per_s:,.0f}/s ({ops} in {span:.1f}s, "
                f"{errors} errors)")
            out.append(ceiling)
    return out


def measure_all(work: Path, *, seconds: float) -> list[Ceiling]:
    from tests.support.natscluster import NatsCluster

    out: list[Ceiling] = []
    say("ceilings: embedded single server (R1)")
    with nats_server(work / "single", name="jetcut-ceiling") as server:
        out += measure(server.url, "single server, R1", 1, seconds=seconds)
    say("ceilings: 3-node loopback cluster (R3)")
    with NatsCluster(work / "cluster") as cluster:
        out += measure(cluster.urls, "3-node cluster, R3", 3, seconds=seconds,
                       leaders=cluster.names[:1])
        out += measure(cluster.urls, "3-node cluster, R3, 2 partitions (leaders n1, n2)", 3,
                       seconds=seconds, parts=2, leaders=cluster.names[:2])
    return out


def report(ceilings: list[Ceiling], partitions: dict[str, Any] | None, *, quick: bool,
           seconds: float, elapsed_s: float) -> str:
    machine = machine_info()
    lines = [
        "# Scaling ceilings (loadtests/ceilings.py)",
        "",
        f"- run: {now().isoformat(timespec='seconds')} — mode **{'quick' if quick else 'full'}**"
        f", {elapsed_s:.0f} s in all",
        f"- machine: {machine['nproc']} x {machine['cpu_model']}, {machine['mem_gib']} GiB, "
        f"Linux {machine['kernel']}, Python {machine['python']}, {machine['nats_server']}",
        "- every server: file storage, `sync_interval: always`, loopback; "
        f"{CLIENT_PROCESSES} client processes x {IN_FLIGHT} requests in flight, "
        f"{seconds:g} s per figure",
        "- taken on a shared machine under CPU contention from other work: read them as "
        "orders of magnitude, not as this hardware's best",
        "",
        "| what | topology | per second | ops | errors |",
        "|---|---|---|---|---|",
    ]
    for c in ceilings:
        lines.append(f"| {c.what} | {c.topology} | {c.ops_per_s:,.0f} | {c.ops:,} | "
                     f"{c.errors} |")
    lines += [
        "",
        "KV writes: `kv.update(key, 1 KiB, last=revision)`, every writer on its own keys (the "
        "bucket's ceiling, not a race's). Publishes: `js.publish` of 512 B with a "
        "`Nats-Msg-Id`, each awaiting its PubAck. With 2 partitions, each client process "
        "loads its own bucket and stream, whose leaders sit on different nodes; the figure "
        "is the sum.",
        "",
    ]
    if partitions is not None:
        from loadtests.partitions import markdown

        lines += markdown(partitions)
    lines.append("What these figures mean for jetcut: docs/scaling.md.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.ceilings", description=__doc__)
    p.add_argument("--quick", action="store_true", help="short measurements: a smoke run")
    p.add_argument("--no-partitions", action="store_true",
                   help="skip the one vs two partitions run on the cluster")
    p.add_argument("--report", type=Path, default=REPORTS / "scaling.md")
    args = p.parse_args(argv)
    seconds = 2.0 if args.quick else 6.0
    began = time.monotonic()
    partitions: dict[str, Any] | None = None
    with temp_dir("ceilings") as work:
        ceilings = measure_all(work, seconds=seconds)
        if not args.no_partitions:
            from loadtests.partitions import run_partitions

            partitions = run_partitions(work / "partitions", quick=args.quick)
    text = report(ceilings, partitions, quick=args.quick, seconds=seconds,
                  elapsed_s=time.monotonic() - began)
    args.report.write_text(text)
    print(text)
    say(f"report: {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
