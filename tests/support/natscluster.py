"""A 3-node JetStream cluster of real nats-server processes on loopback.

Test harness (no command or shipped feature uses it) for the tests that prove recovery on
a cluster: every node is a :class:`~shared.natsserver.NatsServer` with its own store dir,
``sync_interval: always`` and the shipped topology of ``infra/nats/cluster/`` (cluster
``jetcut``, nodes ``n1``..``n3``, every node routing to every node), on free ports that
are kept across restarts so that clients given :attr:`NatsCluster.urls` find a restarted
node where it was.

"Started" means usable, not merely listening: :meth:`NatsCluster.start` and
:meth:`NatsCluster.restart` return only once every running node agrees on one JetStream
meta leader, every running peer is current and every running node's ``/healthz`` is ok
(``start`` also waits until an R3 stream can be placed). A test that creates streams right
after a bare ``/healthz?js-enabled-only`` would race the first meta-leader election.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from shared.natsserver import NatsServer, free_ports

CLUSTER_READY_TIMEOUT_S = 30.0
PROBE_STREAM = "NATSCLUSTER_PLACEMENT_PROBE"


class NatsCluster:
    """``size`` nats-server nodes routed to each other; kill and restart nodes by index."""

    def __init__(
        self, data_dir: Path, *, size: int = 3, host: str = "127.0.0.1",
        binary: str | None = None,
    ) -> None:
        data_dir = Path(data_dir)
        # Client, monitoring and route ports of every node, all distinct (one port handed
        # out twice made a node fail to bind its route listener).
        ports = free_ports(3 * size, host)
        client, http, route_ports = ports[:size], ports[size:2 * size], ports[2 * size:]
        self.nodes: list[NatsServer] = [
            NatsServer(
                data_dir / f"n{i + 1}", host=host, port=client[i], http_port=http[i],
                server_name=f"n{i + 1}", cluster=(route_ports[i], route_ports), binary=binary,
            )
            for i in range(size)
        ]

    @property
    def urls(self) -> str:
        """Every node's client URL, comma-separated: the value for ``JETCUT_NATS_URL``."""
        return ",".join(node.url for node in self.nodes)

    @property
    def names(self) -> list[str]:
        return [node.server_name for node in self.nodes]

    def index_of(self, server_name: str) -> int:
        """The index of the node called ``server_name`` (as the server reports it)."""
        return self.names.index(server_name)

    def index_of_port(self, port: int) -> int:
        """The index of the node whose client port is ``port`` (to map a client's URL)."""
        return [node.port for node in self.nodes].index(port)

    def start(self, timeout: float = CLUSTER_READY_TIMEOUT_S) -> NatsCluster:
        """Start every node at once (each alone can never elect a leader), then wait."""
        for node in self.nodes:
            node.start(wait=False)
        try:
            for node in self.nodes:
                node.wait_ready(timeout)
                node.check_durable()
            self.wait_healthy(timeout)
            self.wait_placeable(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def kill(self, index: int) -> None:
        """SIGKILL one node: a crash, with no leader hand-off and no goodbye to clients."""
        self.nodes[index].kill()

    def restart(self, index: int, timeout: float = CLUSTER_READY_TIMEOUT_S) -> None:
        """Start a stopped or killed node on its old ports and data, and wait until it has
        rejoined: one meta leader, every peer current, every node's ``/healthz`` ok. Its
        stream replicas may still be replaying; :meth:`wait_streams_in_sync` waits for that."""
        node = self.nodes[index]
        node.stop()
        node.start(wait=False)
        node.wait_ready(timeout)
        node.check_durable()
        self.wait_healthy(timeout)

    def monitor(self, index: int, path: str, **params: str) -> dict[str, Any]:
        """One node's monitoring endpoint as JSON (``jsz``, ``healthz``, ``varz``, ...).

        Non-200 answers that carry JSON (an unhealthy ``/healthz`` is a 503) are returned,
        not raised, so callers can poll a condition.
        """
        node = self.nodes[index]
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        url = f"http://{node.host}:{node.http_port}/{path}{query}"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                data: dict[str, Any] = json.load(resp)
        except urllib.error.HTTPError as exc:
            data = json.load(exc)
        return data

    def meta_leader(self) -> str | None:
        """The JetStream meta leader every running node agrees on, else None."""
        leaders: set[str | None] = set()
        for i, node in enumerate(self.nodes):
            if not node.running:
                continue
            try:
                meta = self.monitor(i, "jsz").get("meta_cluster") or {}
            except (OSError, ValueError):
                return None
            leaders.add(meta.get("leader") or None)
        return leaders.pop() if len(leaders) == 1 else None

    def healthy(self) -> bool:
        """One agreed meta leader, every running peer current, every running node healthy."""
        leader = self.meta_leader()
        if leader is None:
            return False
        running = {node.server_name for node in self.nodes if node.running}
        try:
            meta = self.monitor(self.index_of(leader), "jsz").get("meta_cluster") or {}
            current = {r["name"] for r in meta.get("replicas") or [] if r.get("current")}
            if not running - {leader} <= current:
                return False
            return all(
                self.monitor(i, "healthz").get("status") == "ok"
                for i, node in enumerate(self.nodes) if node.running
            )
        except (OSError, ValueError):
            return False

    def wait_healthy(self, timeout: float = CLUSTER_READY_TIMEOUT_S) -> None:
        """Poll :meth:`healthy` until it holds.

        Raises:
            TimeoutError: naming each node's view of the meta group, to debug an election.
        """
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not healthy after {timeout}s: {self._views()}")
            time.sleep(0.05)

    def wait_placeable(self, timeout: float = CLUSTER_READY_TIMEOUT_S) -> None:
        """Create and delete an R{size} stream, retrying until the meta leader can place it.

        Right after its election a meta leader may not yet have heard from every peer and
        answers a stream create with 10005 "no suitable peers for placement, peer offline",
        which no monitoring endpoint shows beforehand; asking is the only sure check. Runs
        its own event loop in a thread, so it works from sync and async callers alike.
        """
        errors: list[BaseException] = []
        thread = threading.Thread(
            target=lambda: errors.extend(asyncio.run(self._place_probe(deadline_s=timeout))),
            name="natscluster-probe", daemon=True,
        )
        thread.start()
        thread.join(timeout + 10)
        if errors:
            raise TimeoutError(f"cluster cannot place R{len(self.nodes)} streams: "
                               f"{errors[-1]!r}") from errors[-1]

    async def _place_probe(self, *, deadline_s: float) -> list[BaseException]:
        import nats
        from nats.js import api
        from nats.js.errors import APIError

        nc = await nats.connect(self.urls.split(","), connect_timeout=2,
                                allow_reconnect=True, max_reconnect_attempts=-1)
        try:
            js = nc.jetstream(timeout=5)
            config = api.StreamConfig(
                name=PROBE_STREAM, subjects=[f"{PROBE_STREAM}.probe"], num_replicas=len(self.nodes),
                storage=api.StorageType.MEMORY,
            )
            deadline = time.monotonic() + deadline_s
            while True:
                try:
                    await js.add_stream(config)
                    await js.delete_stream(PROBE_STREAM)
                    return []
                except (APIError, nats.errors.TimeoutError) as exc:
                    if time.monotonic() > deadline:
                        return [exc]
                    await asyncio.sleep(0.1)
        finally:
            await nc.close()

    def stream_last_seqs(self, index: int) -> dict[str, int]:
        """Every stream's last sequence as node ``index`` stores it (all accounts)."""
        jsz = self.monitor(index, "jsz", accounts="true", streams="true")
        return {
            f"{account['name']}/{stream['name']}": int(stream["state"]["last_seq"])
            for account in jsz.get("account_details") or []
            for stream in account.get("stream_detail") or []
        }

    def wait_streams_in_sync(self, timeout: float = CLUSTER_READY_TIMEOUT_S) -> dict[str, int]:
        """Poll until every running node stores every stream up to the same sequence.

        ``/healthz`` turns ok on a restarted node before its replicas have replayed what
        they missed; this is the check that they have. Returns the agreed sequences.

        Raises:
            TimeoutError: with each node's sequences.
        """
        deadline = time.monotonic() + timeout
        while True:
            seqs = {
                node.server_name: self.stream_last_seqs(i)
                for i, node in enumerate(self.nodes) if node.running
            }
            views = list(seqs.values())
            if all(view == views[0] for view in views):
                return views[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"streams not in sync after {timeout}s: {seqs}")
            time.sleep(0.05)

    def _views(self) -> dict[str, object]:
        views: dict[str, object] = {}
        for i, node in enumerate(self.nodes):
            if not node.running:
                views[node.server_name] = "down"
                continue
            with contextlib.suppress(OSError, ValueError):
                views[node.server_name] = {
                    "meta": self.monitor(i, "jsz").get("meta_cluster"),
                    "healthz": self.monitor(i, "healthz"),
                }
        return views

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def lead_on(nc: Any, stream: str, server_name: str, *, consumer: str | None = None,
                  timeout: float = CLUSTER_READY_TIMEOUT_S) -> str:
    """Make ``server_name`` the leader of ``stream`` (or of its ``consumer``): ask the
    current leader to step down in its favour (nats-server 2.11+ honours a preferred
    placement), and repeat, plain step-downs included, until it is. For placing two
    partitions' streams on different nodes. Returns the leader it ended with.

    Raises:
        TimeoutError: when the leader is elsewhere after ``timeout`` seconds.
    """
    import nats.errors

    js = nc.jetstream(timeout=5)
    what = f"CONSUMER.LEADER.STEPDOWN.{stream}.{consumer}" if consumer else \
        f"STREAM.LEADER.STEPDOWN.{stream}"
    body = json.dumps({"placement": {"preferred": server_name}}).encode()
    deadline = time.monotonic() + timeout
    while True:
        if consumer:
            info = await js.consumer_info(stream, consumer)
        else:
            info = await js.stream_info(stream)
        leader = info.cluster.leader if info.cluster else None
        if leader == server_name:
            return leader
        if time.monotonic() > deadline:
            raise TimeoutError(f"{stream}/{consumer or ''} leads on {leader}, "
                               f"not {server_name}")
        with contextlib.suppress(nats.errors.TimeoutError, nats.errors.NoRespondersError):
            await nc.request(f"$JS.API.{what}", body, timeout=5)
        await asyncio.sleep(0.5)  # the new leader's election
