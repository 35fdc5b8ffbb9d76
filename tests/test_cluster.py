"""Every accepted job completes when one node of a 3-node JetStream cluster crashes mid-run.

Three real nats-server processes on loopback (:class:`tests.support.natscluster.NatsCluster`),
streams, consumers and the jobs KV with 3 replicas, and two jetcut processes' worth of
runtimes connected to all three seeds: the conductor in one, the stage workers (probe,
transcode, noop: real ffmpeg, real files exchanged through the store) in the other.

The crash is the worst single-node failure there is: before the jobs go in, the test moves
the leaders of the JOBS and STAGES streams, of the jobs KV stream and of every consumer to
the node the workers are connected to; with jobs in flight it SIGKILLs that node. The
workers lose their connection, every stream and consumer loses its leader at once, and
in-flight publishes, KV compare-and-sets, fetches and acks meet an election. Every job that
was submitted must still succeed, no publish may give up (the bus and the job store ride the
election out rather than fail handlers into redelivery), and every consumer must end with
nothing pending. The killed node then restarts and must catch up with the survivors.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS

from functions.registry import FUNCTIONS
from shared.function import Services
from shared.jobstore import JobNotFound
from shared.natsserver import render_config
from shared.retry import ride_out
from shared.runtime import Runtime
from shared.settings import Settings
from tests.support.media import MakeClip
from tests.support.nats import consumer_settled, running, submit_job
from tests.support.natscluster import NatsCluster

ROOT = Path(__file__).resolve().parents[1]
JOBS = 12
STEPS = {
    "inspect": {"stage": "probe", "uses": [":input"]},
    "small": {"stage": "transcode", "uses": [":input", "inspect"],
              "params": {"max_height": 72, "preset": "ultrafast"}},
    "done": {"stage": "noop", "uses": ["small"]},
}
# What the JetStream API answers while a stream or consumer elects a leader.
ELECTION_ERRORS = (
    nats.errors.TimeoutError, nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError, nats.js.errors.ServiceUnavailableError,
    nats.js.errors.APIError,
)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path / "cluster") as c:
        yield c


@pytest.fixture
async def stack(
    cluster: NatsCluster, make_settings: Callable[..., Settings]
) -> AsyncIterator[tuple[Runtime, Runtime]]:
    settings = make_settings(
        nats_url=cluster.urls, replicas=3,
        ack_wait_s=3.0,  # an ack lost with the dead leader is redelivered within 3 s
    )
    async with running(settings, [FUNCTIONS["conductor"]], name="conductor") as conductor, \
            running(settings, [FUNCTIONS[n] for n in ("probe", "transcode", "noop")],
                    name="workers") as workers:
        yield conductor, workers


def connected_node(cluster: NatsCluster, runtime: Runtime) -> int:
    assert runtime.nc is not None and runtime.nc.connected_url is not None
    port = runtime.nc.connected_url.port
    assert port is not None
    return cluster.index_of_port(port)


async def move_leader(nc: NATS, api: str, preferred: str, *, timeout: float = 20.0) -> None:
    """Ask the raft group behind ``api`` (a STREAM/CONSUMER LEADER.STEPDOWN subject) to
    hand its leadership to ``preferred``, until a stepdown says it is already there."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    body = json.dumps({"placement": {"preferred": preferred}}).encode()
    while True:
        reply = json.loads((await nc.request(api, body, timeout=5)).data)
        error = reply.get("error") or {}
        if reply.get("success") or "already" in str(error.get("description", "")).lower():
            return
        assert loop.time() < deadline, f"{api}: leader did not move to {preferred}: {reply}"
        await asyncio.sleep(0.1)


async def stream_leader(services: Services, stream: str) -> str | None:
    """The stream's leader, or None while it has none (mid-election)."""
    try:
        info = await services.bus.js.stream_info(stream)
    except ELECTION_ERRORS:
        return None
    return info.cluster.leader if info.cluster else None


async def consumer_leader(services: Services, stream: str, durable: str) -> str | None:
    try:
        info = await services.bus.js.consumer_info(stream, durable)
    except ELECTION_ERRORS:
        return None
    return info.cluster.leader if info.cluster else None


async def gather_leaders_on(node: str, services: Services, consumers: list[tuple[str, str]],
                            timeout: float = 20.0) -> None:
    """Make ``node`` the leader of the three streams the jobs need and of every consumer."""
    nc, names = services.bus.nc, services.names
    streams = [names.jobs_stream, names.stages_stream, f"KV_{names.jobs_bucket}"]
    for stream in streams:
        if await stream_leader(services, stream) != node:
            await move_leader(nc, f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", node)
    for stream, durable in consumers:
        if await consumer_leader(services, stream, durable) != node:
            await move_leader(nc, f"$JS.API.CONSUMER.LEADER.STEPDOWN.{stream}.{durable}", node)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        leaders = {s: await stream_leader(services, s) for s in streams}
        for stream, durable in consumers:
            leaders[durable] = await consumer_leader(services, stream, durable)
        if set(leaders.values()) == {node}:
            return
        assert loop.time() < deadline, f"leaders did not gather on {node}: {leaders}"
        await asyncio.sleep(0.1)


async def statuses(services: Services, job_ids: list[str]) -> dict[str, str]:
    """Each job's status from the R3 KV ('-' before the conductor created its record).

    Reads go through ``JobStore``, as every function's do, and are not excused for errors:
    a read that cannot ride out the election fails the test.
    """
    found: dict[str, str] = {}
    for job_id in job_ids:
        try:
            found[job_id] = (await services.jobs.get(job_id)).status
        except JobNotFound:
            found[job_id] = "-"
    return found


async def until_statuses(services: Services, job_ids: list[str],
                         ok: Callable[[dict[str, str]], bool], *,
                         timeout: float) -> dict[str, str]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        now = await statuses(services, job_ids)
        if ok(now):
            return now
        assert loop.time() < deadline, f"gave up after {timeout}s: {now}"
        await asyncio.sleep(0.1)


def count(found: dict[str, str], status: str) -> int:
    return sum(s == status for s in found.values())


def publishes_given_up(runtimes: tuple[Runtime, ...]) -> float:
    """``jetcut_publishes_total{outcome="failed"}`` summed over the runtimes."""
    return sum(
        sample.value
        for rt in runtimes for family in rt.telemetry.registry.collect()
        for sample in family.samples
        if sample.name == "jetcut_publishes_total" and sample.labels["outcome"] == "failed"
    )


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_every_accepted_job_completes_when_a_node_crashes(
    cluster: NatsCluster, stack: tuple[Runtime, Runtime], make_clip: MakeClip
) -> None:
    conductor, workers = stack
    assert conductor.services is not None and workers.services is not None
    services = conductor.services
    consumers = [(loop.stream, loop.sub.durable) for rt in stack for loop in rt.loops]
    victim = connected_node(cluster, workers)
    await gather_leaders_on(cluster.names[victim], services, consumers)

    clip = make_clip("cluster_1s", duration=1.0, width=160, height=90)
    job_ids = [await submit_job(conductor, [clip], steps=STEPS) for _ in range(JOBS)]

    # A real condition, not a sleep: some jobs finished, the rest still on their way.
    at_kill = await until_statuses(services, job_ids, lambda s: count(s, "succeeded") >= 3,
                                   timeout=60)
    cluster.kill(victim)
    assert count(at_kill, "succeeded") < JOBS, "the kill came too late to interrupt anything"

    final = await until_statuses(
        services, job_ids, lambda s: all(v in ("succeeded", "failed") for v in s.values()),
        timeout=60,
    )
    assert final == dict.fromkeys(job_ids, "succeeded")
    for job_id in job_ids:  # real files went through the store: the transcode's output
        record = await services.jobs.get(job_id)
        assert record.steps["small"].meta["height"] == 72, record.steps["small"].meta
    # Nothing left behind: every consumer is drained and the work queue is empty.
    for stream, durable in consumers:
        assert await consumer_settled(services, stream, durable, timeout=15) == (0, 0), durable
    stages = await ride_out(lambda: services.bus.js.stream_info(services.names.stages_stream))
    assert stages.state.messages == 0
    # The election was ridden out, not papered over: no publish gave up (a handler would
    # have failed and waited for a redelivery), and the workers moved to a live seed.
    assert publishes_given_up(stack) == 0
    assert connected_node(cluster, workers) != victim

    # The killed node comes back on its old data and catches up with the survivors.
    before = cluster.stream_last_seqs((victim + 1) % 3)
    cluster.restart(victim)
    synced = cluster.wait_streams_in_sync()
    for name in (services.names.jobs_stream, services.names.stages_stream,
                 f"KV_{services.names.jobs_bucket}"):
        assert synced[f"$G/{name}"] >= before[f"$G/{name}"] > 0, name


def test_rendered_cluster_config_matches_the_shipped_one() -> None:
    """NatsCluster's nodes are infra/nats/cluster/'s topology (names, cluster, routes,
    durability), so what the test proves holds for the shipped configs."""
    shipped_text = (ROOT / "infra/nats/cluster/n1.conf").read_text()
    ours_text = render_config(
        host="127.0.0.1", port=4222, http_port=8222, store_dir=Path("/tmp/n1"),
        server_name="n1", cluster=(6222, [6222, 6223, 6224]),
    )
    shipped, ours = directives(shipped_text), directives(ours_text)
    for key in ("server_name", "listen", "http", "max_payload", "sync_interval", "name"):
        assert ours.get(key) == shipped.get(key), key
    assert ours["listen@cluster"] == shipped["listen@cluster"] == "127.0.0.1:6222"
    route = r"nats-route://[\w.:]+"
    assert re.findall(route, ours_text) == re.findall(route, shipped_text)
    assert NatsCluster(Path("/nonexistent")).names == ["n1", "n2", "n3"]


def directives(text: str) -> dict[str, str]:
    """``key: value`` lines of a nats-server config, comments cut; a key inside a block
    also appears as ``key@block`` (the cluster's ``listen`` is not the client's)."""
    found: dict[str, str] = {}
    block: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.endswith("{"):
            block.append(line[:-1].strip())
            continue
        if line == "}":
            block.pop()
            continue
        match = re.fullmatch(r"(\w+)\s*[:=]?\s*(.*)", line)
        if match and match.group(2) not in ("", "["):
            key, value = match.group(1), match.group(2).strip('"')
            found.setdefault(key, value)
            if block:
                found[f"{key}@{block[-1]}"] = value
    return found
