"""The dashboard: static pages at ``/ui/`` (``/`` redirects there) and each job's step graph.

The page and its assets are public: they hold no tenant's data, and a browser cannot send an
API key with a plain navigation. Everything the page shows comes from the ``/v1`` API,
called with the key the user types into the page (kept in the tab's ``sessionStorage``
unless they ask to remember it), so the dashboard sees exactly what that key may see.
Keys never go into URLs: server-sent events are read with ``fetch`` and a stream reader,
which can send the ``Authorization`` header that ``EventSource`` cannot.

The assets are plain files under ``functions/gateway/ui/`` (ES modules, one stylesheet; no
build step, no CDN) and ship in the wheel as package data. They are served with a strict
Content-Security-Policy: scripts and styles only from the gateway itself.

``GET /v1/jobs/{id}/graph`` gives the job's DAG, laid out in layers, for the detail view's
diagram (the job view has each step's state but not its ``uses``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import msgspec
from litestar import Response, get
from litestar.datastructures import CacheControlHeader
from litestar.response import Redirect
from litestar.static_files import create_static_files_router

from shared.jobstate import JobRecord, input_ref_index

UI_DIR = Path(__file__).with_name("ui")
UI_PATH = "/ui"

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       # Outputs may be presigned S3 URLs on another origin (JETCUT_PRESIGN_OUTPUTS).
       "img-src 'self' blob: data: http: https:; media-src 'self' blob: http: https:; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


async def _secure(response: Response[Any]) -> Response[Any]:
    """Every dashboard asset: no framing, no foreign scripts, no MIME sniffing."""
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    return response


@get("/", include_in_schema=False, opt={"public": True}, sync_to_thread=False)
def home() -> Redirect:
    """A person who opens the gateway's address lands on the dashboard."""
    return Redirect(f"{UI_PATH}/", status_code=307)


class GraphNode(msgspec.Struct):
    id: str
    """A step name, or ``:input`` / ``:input/<n>`` for the job's inputs."""
    kind: Literal["input", "step"]
    label: str
    """The step's stage, or the input's file name."""
    status: str | None
    """The step's status (``null`` for an input)."""
    layer: int
    """Inputs are layer 0; a step is one past the deepest node it uses."""
    uses: list[str]


class JobGraph(msgspec.Struct):
    job_id: str
    status: str
    nodes: list[GraphNode]
    """Inputs first, then steps in plan order (stable within a layer)."""
    edges: list[tuple[str, str]]
    """``(from, to)``: ``to`` uses ``from``."""
    layers: int


def job_graph(record: JobRecord) -> JobGraph:
    """The job's DAG with a layer per node (empty of steps until the conductor plans it)."""
    nodes = [GraphNode(id=":input" if i == 0 else f":input/{i}", kind="input",
                       label=ref.filename or ref.key.rsplit("/", 1)[-1], status=None,
                       layer=0, uses=[])
             for i, ref in enumerate(record.inputs)]
    layers: dict[str, int] = {n.id: 0 for n in nodes}

    def layer(name: str, seen: frozenset[str]) -> int:
        if name in layers:
            return layers[name]
        state = record.steps.get(name)
        if state is None or name in seen:  # not in this plan (or a cycle): draw it flat
            return 0
        deps = [":input" if input_ref_index(u) == 0 else u for u in state.uses]
        layers[name] = 1 + max((layer(d, seen | {name}) for d in deps), default=0)
        return layers[name]

    edges: list[tuple[str, str]] = []
    for name, state in record.steps.items():
        nodes.append(GraphNode(id=name, kind="step", label=state.stage, status=str(state.status),
                               layer=layer(name, frozenset()), uses=list(state.uses)))
        for used in state.uses:
            source = ":input" if input_ref_index(used) == 0 else used
            if source in layers or source in record.steps:
                edges.append((source, name))
    return JobGraph(job_id=record.job_id, status=str(record.status), nodes=nodes, edges=edges,
                    layers=1 + max((n.layer for n in nodes), default=0))


DASHBOARD_ROUTES: list[Any] = [
    home,
    create_static_files_router(
        path=UI_PATH, directories=[UI_DIR], html_mode=True, name="dashboard",
        opt={"public": True}, include_in_schema=False, after_request=_secure,
        # Revalidate every load (ETag): an upgraded gateway serves its new page at once.
        cache_control=CacheControlHeader(no_cache=True),
    ),
]
