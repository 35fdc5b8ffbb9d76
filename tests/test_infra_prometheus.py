"""Prometheus: the alert rules behave the same under compose and Kubernetes labels.

``promtool`` (Debian's ``prometheus`` package; ``make tools`` installs it) checks both scrape
configs and the rules, and runs the rule unit tests in infra/prometheus/tests, which feed
every liveness rule series labelled the compose way and the Kubernetes way. Without promtool
those tests skip with the reason. The relabelling that produces those labels from the k8s
manifests is checked here in Python, on the real pod templates.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.infra import PROMETHEUS, k8s_kind, load_yaml

RULES = PROMETHEUS / "alerts.yml"
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*_test.yml"))


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool not installed (make tools, or apt-get install prometheus)")
    return subprocess.run(
        [found, *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_there_are_rule_unit_tests() -> None:
    assert RULE_TESTS, "no infra/prometheus/tests/*_test.yml"
    (tests,) = load_yaml(RULE_TESTS[0])
    assert tests["rule_files"] == ["../alerts.yml"]
    # Every alert in alerts.yml is exercised by at least one case.
    (rules,) = load_yaml(RULES)
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tested = {
        case["alertname"]
        for path in RULE_TESTS
        for block in load_yaml(path)[0]["tests"]
        for case in block.get("alert_rule_test", [])
    }
    assert alerts <= tested, sorted(alerts - tested)


@pytest.mark.parametrize("path", RULE_TESTS, ids=lambda p: p.name)
def test_rule_unit_tests_pass(path: Path) -> None:
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rule_unit_tests_can_fail(tmp_path: Path) -> None:
    """promtool really compares: the same tests against a rule on the compose-only label fail."""
    bad = RULES.read_text().replace(
        'absent(up{app_kubernetes_io_name="jetcut", app_kubernetes_io_component="conductor"} == 1)',
        'absent(up{job="jetcut-functions", service="conductor"} == 1)',
    )
    assert bad != RULES.read_text()
    (tmp_path / "alerts.yml").write_text(bad)
    (tmp_path / "tests").mkdir()
    for path in RULE_TESTS:
        (tmp_path / "tests" / path.name).write_text(path.read_text())
    result = promtool("test", "rules", *(str(tmp_path / "tests" / p.name) for p in RULE_TESTS))
    assert result.returncode != 0
    assert "JetcutNoConductor" in result.stdout + result.stderr


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus-k8s.yml"])
def test_scrape_config_passes_promtool_check(name: str, tmp_path: Path) -> None:
    # The configs name the rules where the container mounts them; point that here.
    text = (PROMETHEUS / name).read_text().replace("/etc/prometheus/alerts.yml", str(RULES))
    (tmp_path / name).write_text(text)
    result = promtool("check", "config", str(tmp_path / name))
    output = result.stdout + result.stderr
    if "field kubernetes_sd_configs not found" in output:
        # Debian builds Prometheus without Kubernetes discovery; the relabelling test below
        # still checks this file against the manifests.
        pytest.skip("this promtool has no kubernetes_sd (Debian's build)")
    assert result.returncode == 0, output
    assert "1 rule files found" in output


# --- the k8s relabelling gives the labels the alerts select on --------------------------


def relabel(labels: dict[str, str], configs: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus' relabelling for the actions the shipped configs use (None: dropped)."""
    labels = dict(labels)
    for cfg in configs:
        action = cfg.get("action", "replace")
        regex = re.compile(f"^(?:{cfg.get('regex', '(.*)')})$")
        if action == "labelmap":
            labels |= {regex.sub(cfg.get("replacement", "$1").replace("$", "\\"), k): v
                       for k, v in list(labels.items()) if regex.match(k)}
            continue
        value = cfg.get("separator", ";").join(labels.get(s, "") for s in cfg["source_labels"])
        match = regex.match(value)
        if action == "keep" and not match:
            return None
        if action == "drop" and match:
            return None
        if action == "replace" and match:
            labels[cfg["target_label"]] = match.expand(
                re.sub(r"\$(\d+)", r"\\\1", cfg.get("replacement", "$1"))
            )
    return {k: v for k, v in labels.items() if not k.startswith("__meta_")}


def discovered_pod(doc: dict[str, Any], container_port: int) -> dict[str, str]:
    """The meta labels Kubernetes pod discovery gives one of ``doc``'s pods."""
    meta = doc["spec"]["template"]["metadata"]
    def clean(key: str) -> str:
        return re.sub(r"[^a-zA-Z0-9_]", "_", key)
    labels = {f"__meta_kubernetes_pod_label_{clean(k)}": v for k, v in meta["labels"].items()}
    labels |= {f"__meta_kubernetes_pod_annotation_{clean(k)}": v
               for k, v in (meta.get("annotations") or {}).items()}
    return labels | {
        "__address__": f"10.1.2.3:{container_port}",
        "__meta_kubernetes_namespace": doc["metadata"]["namespace"],
        "__meta_kubernetes_pod_name": f"{doc['metadata']['name']}-5c4b-q8z",
        "__meta_kubernetes_pod_phase": "Running",
        "__metrics_path__": "/metrics",
    }


def test_k8s_scrape_config_labels_every_jetcut_pod_like_compose() -> None:
    (config,) = load_yaml(PROMETHEUS / "prometheus-k8s.yml")
    (job,) = config["scrape_configs"]
    deployments = k8s_kind("Deployment")
    assert deployments
    for doc in deployments:
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        first_port = container["ports"][0]["containerPort"]
        target = relabel(discovered_pod(doc, first_port), job["relabel_configs"])
        name = doc["metadata"]["name"]
        assert target is not None, f"{name} is not scraped"
        assert target["app_kubernetes_io_name"] == "jetcut", name
        assert target["app_kubernetes_io_component"] == name, name
        port = doc["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]
        assert target["__address__"] == f"10.1.2.3:{port}", name
        assert int(port) in {p["containerPort"] for p in container["ports"]}, name
        assert target["namespace"] == "jetcut"


def test_k8s_scrape_config_skips_pods_without_the_annotation() -> None:
    (config,) = load_yaml(PROMETHEUS / "prometheus-k8s.yml")
    (job,) = config["scrape_configs"]
    (doc,) = [d for d in k8s_kind("Deployment") if d["metadata"]["name"] == "conductor"]
    pod = discovered_pod(doc, 9100)
    pod["__meta_kubernetes_pod_annotation_prometheus_io_scrape"] = "false"
    assert relabel(pod, job["relabel_configs"]) is None
