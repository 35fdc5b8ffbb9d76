"""Readers for the shipped deployment files (docker-compose.yml, infra/), shared by the infra tests.

Pure parsing, no Docker or cluster: the tests that use these cross-check the files against
each other, against the code, and against the tools' own validators.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
COMPOSE = ROOT / "docker-compose.yml"
K8S = INFRA / "k8s"
PROMETHEUS = INFRA / "prometheus"


def load_yaml(path: Path) -> list[Any]:
    """Every document in a YAML file (a k8s manifest may hold several); a fresh copy each call."""
    return copy.deepcopy(_parsed(path, path.stat().st_mtime_ns))


@functools.cache
def _parsed(path: Path, mtime_ns: int) -> list[Any]:
    # Parametrised tests read the same manifests hundreds of times; parse each version once.
    with path.open() as f:
        return list(yaml.safe_load_all(f))


def compose() -> dict[str, Any]:
    """docker-compose.yml as a mapping."""
    (doc,) = load_yaml(COMPOSE)
    assert isinstance(doc, dict)
    return doc


def compose_functions() -> dict[str, dict[str, Any]]:
    """Compose services built from our image, by service name."""
    return {
        name: svc
        for name, svc in compose()["services"].items()
        if "infra/Dockerfile" in str((svc.get("build") or {}).get("dockerfile", ""))
    }


def interpolate(value: object) -> str:
    """Compose's ${VAR:-default} with the defaults (what a bare `docker compose up` uses)."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", str(value))


def k8s_docs() -> list[dict[str, Any]]:
    """Every object in infra/k8s/*.yaml (the Helm values file is not an object)."""
    return [
        doc
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "nats-values.yaml"
        for doc in load_yaml(path)
        if doc
    ]


def k8s_kind(kind: str) -> list[dict[str, Any]]:
    """The objects of one kind in infra/k8s."""
    return [doc for doc in k8s_docs() if doc.get("kind") == kind]
