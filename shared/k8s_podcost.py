"""Tell Kubernetes which stage workers are busy, so a scale-down removes idle ones first.

KEDA lowers a stage Deployment's replica count; the ReplicaSet then picks which pods to
delete, and without a hint a busy worker is as likely as an idle one. The hint is the pod
annotation ``controller.kubernetes.io/pod-deletion-cost`` (on by default since Kubernetes
1.22): pods with a lower cost are deleted first. A worker keeps its own pod's cost equal to
the number of tasks it holds, so idle pods (0) go before busy ones, and KEDA's lag
(num_pending + num_ack_pending) never asks for fewer pods than there are busy ones.

The annotation is a hint, not a guarantee (the ReplicaSet also weighs readiness and node
spreading), and every change is an API write, so this writes only when the number changes.
A failed write is logged and never fails a task: the drain on SIGTERM still keeps the work.

The runtime wires it: a process that serves stage subscriptions makes one
:class:`TasksInHand` from ``pod_from_environment(os.environ)`` (``None`` outside a pod that
mounts an API token: then it only counts), and every stage consumer loop reports each task it
takes and each it settles. infra/k8s/rbac.yaml gives the stage pods the right to do so.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# The annotation is an int32; a worker never holds anywhere near this many tasks.
MAX_COST = 2**31 - 1

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PodRef:
    """Where this pod lives in the Kubernetes API, and the credentials to patch it.

    Attributes:
        api_url: Base URL of the API server (``https://host:port``).
        namespace: The pod's namespace.
        name: The pod's name.
        token_file: The service-account token, re-read on every write (kubelet rotates it).
        ca_file: CA bundle to verify the API server, or ``None`` to use the system's.
    """

    api_url: str
    namespace: str
    name: str
    token_file: Path
    ca_file: Path | None = None

    @property
    def pod_url(self) -> str:
        """The pod's own API path."""
        return f"{self.api_url}/api/v1/namespaces/{self.namespace}/pods/{self.name}"


def pod_from_environment(
    environ: Mapping[str, str], service_account_dir: Path = SERVICE_ACCOUNT_DIR
) -> PodRef | None:
    """This pod, as the kubelet describes it, or ``None`` when not in a pod with an API token.

    The kubelet sets ``KUBERNETES_SERVICE_HOST``/``_PORT`` in every container and the
    hostname to the pod name (jetcut's manifests never set ``hostname``), and mounts the
    namespace, token and CA under ``service_account_dir`` when the pod has
    ``automountServiceAccountToken: true`` (only stage pods do). No jetcut setting is
    needed: a pod that may not patch itself simply has no token.
    """
    host = environ.get("KUBERNETES_SERVICE_HOST")
    name = environ.get("HOSTNAME")
    token = service_account_dir / "token"
    if not host or not name or not token.is_file():
        return None
    port = environ.get("KUBERNETES_SERVICE_PORT", "443")
    if ":" in host:  # an IPv6 service address
        host = f"[{host}]"
    ca = service_account_dir / "ca.crt"
    return PodRef(
        api_url=f"https://{host}:{port}",
        namespace=(service_account_dir / "namespace").read_text().strip(),
        name=name,
        token_file=token,
        ca_file=ca if ca.is_file() else None,
    )


class PodDeletionCost:
    """Keeps this pod's deletion cost equal to the number of tasks it holds.

    Args:
        pod: Which pod to annotate (``pod_from_environment``).
        client: The HTTP client to use; build it with ``client_for(pod)``. The caller owns
            it and closes it at shutdown.
    """

    def __init__(self, pod: PodRef, client: httpx.AsyncClient) -> None:
        self.pod = pod
        self._client = client
        self._lock = asyncio.Lock()
        self._wanted = 0
        self._written: int | None = None

    @property
    def written(self) -> int | None:
        """The cost the API server last accepted (``None`` before the first write)."""
        return self._written

    async def update(self, tasks_in_hand: int) -> None:
        """Record that this worker now holds ``tasks_in_hand`` tasks; write it if it changed.

        Concurrent calls are serialised and the last value wins, so the annotation never
        ends on a stale count. Errors are logged, not raised.
        """
        self._wanted = max(0, min(tasks_in_hand, MAX_COST))
        async with self._lock:
            wanted = self._wanted
            if wanted == self._written:
                return
            try:
                response = await self._client.patch(
                    self.pod.pod_url,
                    content=json.dumps({"metadata": {"annotations": {ANNOTATION: str(wanted)}}}),
                    headers={
                        "Authorization": f"Bearer {self.pod.token_file.read_text().strip()}",
                        "Content-Type": "application/merge-patch+json",
                    },
                )
            except (httpx.HTTPError, OSError) as exc:
                log.warning("could not set %s=%d on pod %s: %s", ANNOTATION, wanted,
                            self.pod.name, exc)
                return
            if response.is_success:
                self._written = wanted
            else:
                log.warning("could not set %s=%d on pod %s: HTTP %d %s", ANNOTATION, wanted,
                            self.pod.name, response.status_code, response.text[:200])


def client_for(pod: PodRef, timeout_s: float = 5.0) -> httpx.AsyncClient:
    """An HTTP client that verifies the API server with the pod's CA bundle."""
    context = ssl.create_default_context(cafile=str(pod.ca_file) if pod.ca_file else None)
    return httpx.AsyncClient(verify=context, timeout=timeout_s)


class TasksInHand:
    """Counts the stage tasks this process holds and keeps its pod's deletion cost in step.

    ``changed`` is called synchronously by the consumer loops (a task taken: +1, settled: -1);
    the API write runs in the background, serialised by :class:`PodDeletionCost` (the last
    count wins), so a slow or absent API server never delays a task.
    """

    def __init__(self, pod: PodRef | None) -> None:
        self.count = 0
        self._client = client_for(pod) if pod is not None else None
        self._cost = (PodDeletionCost(pod, self._client)
                      if pod is not None and self._client is not None else None)
        self._writes: set[asyncio.Task[None]] = set()

    def changed(self, delta: int) -> None:
        self.count += delta
        if self._cost is not None:
            write = asyncio.create_task(self._cost.update(self.count))
            self._writes.add(write)
            write.add_done_callback(self._writes.discard)

    def settled(self, _task: object = None) -> None:
        """A task's done-callback: it is no longer in hand."""
        self.changed(-1)

    async def close(self) -> None:
        """Let the last write land (it says 0 after a clean drain), then close the client."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
