"""infra/k8s: valid Kubernetes objects that keep renders through scale-down and disruption.

No cluster here: every object is validated against the Kubernetes API's JSON schemas (as the
kubernetes-validate package ships them, strict: unknown fields are errors), and the rules that
matter for jetcut are checked on the parsed manifests: disruption budgets and spread for the
always-on services, disk for the workers, a grace period that covers the drain, the
pod-deletion-cost permission, and a trace collector that matches what the pods send to.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import kubernetes_validate
import pytest

from shared.settings import load_settings
from tests.support.infra import INFRA, K8S, k8s_docs, k8s_kind, load_yaml

# The oldest Kubernetes the manifests claim (kustomization.yaml): matchLabelKeys in
# topology spread constraints is 1.27+.
K8S_VERSION = "1.27.0"
CRD_GROUPS = ("keda.sh/",)
ALWAYS_ON = ("gateway", "conductor")


def deployments() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in k8s_kind("Deployment")}


def stage_names() -> set[str]:
    return {so["spec"]["scaleTargetRef"]["name"] for so in k8s_kind("ScaledObject")}


def pod_spec(name: str) -> dict[str, Any]:
    spec: dict[str, Any] = deployments()[name]["spec"]["template"]["spec"]
    return spec


def gib(quantity: str) -> float:
    match = re.fullmatch(r"(\d+)(Gi|Mi)", quantity)
    assert match, f"unexpected quantity {quantity!r}"
    return int(match[1]) / (1024 if match[2] == "Mi" else 1)


def object_id(doc: dict[str, Any]) -> str:
    return f"{doc['kind']}/{doc.get('metadata', {}).get('name', '-')}"


def api_objects() -> list[dict[str, Any]]:
    """Objects of the Kubernetes API itself (not KEDA's CRDs, not kustomize's input)."""
    return [d for d in k8s_docs()
            if not d["apiVersion"].startswith((*CRD_GROUPS, "kustomize.config.k8s.io/"))]


def test_only_keda_objects_go_unvalidated() -> None:
    """kubernetes-validate has no schema for CRDs: say exactly which objects that leaves out."""
    left_out = {d["kind"] for d in k8s_docs() if d["apiVersion"].startswith(CRD_GROUPS)}
    assert left_out == {"ScaledObject"}
    assert len(api_objects()) > 30


@pytest.mark.parametrize("doc", api_objects(), ids=object_id)
def test_object_matches_the_kubernetes_schema(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_schema_check_rejects_a_misspelt_field() -> None:
    """The check above can fail: a typo the API server would refuse is refused here."""
    doc = copy.deepcopy(deployments()["gateway"])
    doc["spec"]["template"]["spec"]["topologySpreadConstraint"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# --- always-on services survive node drains and zone loss -------------------------------


@pytest.mark.parametrize("name", ALWAYS_ON)
def test_always_on_service_has_a_disruption_budget(name: str) -> None:
    deployment = deployments()[name]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    (pdb,) = [p for p in k8s_kind("PodDisruptionBudget") if p["metadata"]["name"] == name]
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    # It selects this Deployment's pods only (a budget spanning two would mislead).
    for other_name, other in deployments().items():
        if other_name != name:
            other_labels = other["spec"]["template"]["metadata"]["labels"]
            assert not selector.items() <= other_labels.items(), other["metadata"]["name"]
    # A drain can always proceed (one pod at a time) and never takes the last one.
    assert 1 <= pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]


@pytest.mark.parametrize("name", ALWAYS_ON)
def test_always_on_service_spreads_over_nodes_and_zones(name: str) -> None:
    spec = pod_spec(name)
    pod_labels = deployments()[name]["spec"]["template"]["metadata"]["labels"]
    constraints = {c["topologyKey"]: c for c in spec["topologySpreadConstraints"]}
    assert constraints["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule"
    assert "topology.kubernetes.io/zone" in constraints
    for c in constraints.values():
        assert c["maxSkew"] == 1
        assert c["labelSelector"]["matchLabels"].items() <= pod_labels.items()
        assert c["matchLabelKeys"] == ["pod-template-hash"]


# --- disk: every byte a pod may write is requested and limited ---------------------------


@pytest.mark.parametrize("name", sorted(deployments()))
def test_ephemeral_storage_covers_every_empty_dir(name: str) -> None:
    spec = pod_spec(name)
    empty_dirs = {v["name"]: v["emptyDir"] for v in spec["volumes"] if "emptyDir" in v}
    assert all("sizeLimit" in d for d in empty_dirs.values()), f"{name}: unbounded emptyDir"
    total = sum(gib(d["sizeLimit"]) for d in empty_dirs.values())
    (container,) = spec["containers"]
    request = gib(container["resources"]["requests"]["ephemeral-storage"])
    limit = gib(container["resources"]["limits"]["ephemeral-storage"])
    # emptyDirs count against the pod's ephemeral-storage limit: it must hold all of them
    # at their limits, plus room for logs, or the kubelet evicts a worker that stays
    # inside every sizeLimit.
    assert limit > total, name
    assert request <= limit, name


def test_workers_request_their_whole_work_dir() -> None:
    """A 50 GiB encode is only scheduled where 50 GiB of node disk is free."""
    for name in stage_names():
        spec = pod_spec(name)
        (work,) = [v["emptyDir"] for v in spec["volumes"] if v["name"] == "work"]
        (container,) = spec["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert env["JETCUT_WORK_DIR"] == mounts["work"], name
        request = gib(container["resources"]["requests"]["ephemeral-storage"])
        assert request >= gib(work["sizeLimit"]), name
    assert gib(pod_spec("transcode")["volumes"][0]["emptyDir"]["sizeLimit"]) == 50


# --- scale-down and drain ----------------------------------------------------------------


def container_settings(name: str) -> Any:
    (configmap,) = [c for c in k8s_kind("ConfigMap") if c["metadata"]["name"] == "jetcut"]
    (container,) = pod_spec(name)["containers"]
    env = dict(configmap["data"])
    env |= {e["name"]: e["value"] for e in container.get("env", [])}
    return load_settings(env)


@pytest.mark.parametrize("name", sorted(stage_names() | set(ALWAYS_ON)))
def test_grace_period_covers_the_drain(name: str) -> None:
    """SIGKILL comes only after the worker had its whole drain grace and time to settle."""
    settings = container_settings(name)
    grace = pod_spec(name)["terminationGracePeriodSeconds"]
    assert grace >= settings.drain_grace_s + settings.fetch_timeout_s + 10, (name, grace)


def test_encode_part_drains_long_enough_to_finish_its_part() -> None:
    assert container_settings("encode-part").drain_grace_s >= 120


def test_stage_workers_may_set_their_pod_deletion_cost() -> None:
    (role,) = [r for r in k8s_kind("Role") if r["metadata"]["name"] == "jetcut-pod-deletion-cost"]
    (rule,) = role["rules"]
    assert rule == {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"]}
    (binding,) = k8s_kind("RoleBinding")
    assert binding["roleRef"]["name"] == "jetcut-pod-deletion-cost"
    (subject,) = binding["subjects"]
    for name in stage_names():
        spec = pod_spec(name)
        assert spec["serviceAccountName"] == subject["name"], name
        assert spec["automountServiceAccountToken"] is True, name
    # Nothing else gets an API token.
    for name in set(deployments()) - stage_names():
        assert pod_spec(name).get("serviceAccountName") is None, name
        assert pod_spec(name)["automountServiceAccountToken"] is False, name


# --- traces: the collector the pods send to is shipped, with the compose config ----------


def test_otel_collector_is_shipped_and_is_where_pods_send_traces() -> None:
    (configmap,) = [c for c in k8s_kind("ConfigMap") if c["metadata"]["name"] == "jetcut"]
    endpoint = configmap["data"]["JETCUT_OTEL_ENDPOINT"]
    match = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", endpoint)
    assert match, endpoint
    (service,) = [s for s in k8s_kind("Service") if s["metadata"]["name"] == match[1]]
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == int(match[2])]
    collector = deployments()[match[1]]
    pod_labels = collector["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (container,) = collector["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[port["targetPort"]] == 4318
    # The same Jaeger v2 config compose runs, byte for byte, and the same image.
    (collector_cm,) = [c for c in k8s_kind("ConfigMap") if c["metadata"]["name"] == match[1]]
    assert collector_cm["data"]["config.yaml"] == (INFRA / "jaeger" / "config.yaml").read_text()
    (compose,) = load_yaml(INFRA.parent / "docker-compose.yml")
    assert container["image"] == compose["services"]["jaeger"]["image"]
    assert container["args"] == compose["services"]["jaeger"]["command"]


def test_kustomization_ships_the_collector() -> None:
    (kustomization,) = load_yaml(K8S / "kustomization.yaml")
    assert {"otel-collector.yaml", "rbac.yaml"} <= set(kustomization["resources"])


# --- KEDA objects, checked against the field names in KEDA's source (v2.20) ---------------

# apis/keda/v1alpha1/scaledobject_types.go, ScaledObjectSpec's json names.
SCALED_OBJECT_SPEC = {"scaleTargetRef", "pollingInterval", "initialCooldownPeriod",
                      "cooldownPeriod", "idleReplicaCount", "minReplicaCount",
                      "maxReplicaCount", "advanced", "triggers", "fallback"}
# pkg/scalers/nats_jetstream_scaler.go, the `keda:"name=..."` tags (trigger metadata).
NATS_JETSTREAM_METADATA = {"account", "accountID", "stream", "consumer", "lagThreshold",
                           "activationLagThreshold", "useHttps",
                           "natsServerMonitoringEndpoint"}
NATS_JETSTREAM_REQUIRED = {"stream", "consumer", "natsServerMonitoringEndpoint"}


@pytest.mark.parametrize("so", k8s_kind("ScaledObject"), ids=object_id)
def test_scaled_object_uses_only_fields_keda_knows(so: dict[str, Any]) -> None:
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert set(so["spec"]) <= SCALED_OBJECT_SPEC, sorted(set(so["spec"]) - SCALED_OBJECT_SPEC)
    assert so["spec"]["scaleTargetRef"]["name"] in deployments()
    assert 0 <= so["spec"]["minReplicaCount"] < so["spec"]["maxReplicaCount"]
    for trigger in so["spec"]["triggers"]:
        meta = trigger["metadata"]
        assert trigger["type"] == "nats-jetstream"
        assert set(meta) <= NATS_JETSTREAM_METADATA, sorted(set(meta) - NATS_JETSTREAM_METADATA)
        assert NATS_JETSTREAM_REQUIRED <= set(meta)
        # KEDA parses these as integers; metadata values are strings in the manifest.
        for key in ("lagThreshold", "activationLagThreshold"):
            assert isinstance(meta[key], str) and int(meta[key]) >= 0, key


# --- the Jaeger v2 (collector) config refers only to components it defines ---------------


def test_jaeger_config_pipelines_use_defined_components() -> None:
    """What the collector refuses at start: a pipeline or extension naming an undefined id."""
    (config,) = load_yaml(INFRA / "jaeger" / "config.yaml")
    service = config["service"]
    assert set(service["extensions"]) == set(config["extensions"])
    for pipeline in service["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            assert set(pipeline.get(kind, [])) <= set(config.get(kind) or {}), kind
    storage = set(config["extensions"]["jaeger_storage"]["backends"])
    assert config["extensions"]["jaeger_query"]["storage"]["traces"] in storage
    assert config["exporters"]["jaeger_storage_exporter"]["trace_storage"] in storage
