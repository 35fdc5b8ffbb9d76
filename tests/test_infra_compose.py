"""docker-compose.yml starts as a whole: valid compose, a MinIO ARN that exists, all scraped.

There is no Docker engine here, so each check is done against the rule of the tool that
would refuse the file: the compose-spec JSON schema (the one ``docker compose`` validates
with, as check-jsonschema ships it), MinIO's target-id rule, Prometheus' scrape list.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from shared.settings import load_settings
from tests.support.infra import (
    COMPOSE,
    INFRA,
    PROMETHEUS,
    ROOT,
    compose,
    compose_functions,
    interpolate,
    load_yaml,
)

# --- the compose file is valid compose ---------------------------------------------------


def compose_schema() -> dict[str, Any]:
    """The compose-spec schema as vendored (with its licence) by check-jsonschema."""
    vendor = resources.files("check_jsonschema") / "builtin_schemas" / "vendor"
    schema: dict[str, Any] = json.loads((vendor / "compose-spec.json").read_text())
    return schema


def compose_errors(doc: object) -> list[str]:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)  # its $schema: 2020-12
    return [
        f"{'/'.join(map(str, err.absolute_path)) or '<root>'}: {err.message}"
        for err in validator.iter_errors(doc)
    ]


def test_compose_file_matches_the_compose_spec_schema() -> None:
    assert compose_errors(compose()) == []


def test_compose_schema_check_rejects_a_misspelt_key() -> None:
    """The check above can fail: a typo compose would refuse is refused here too."""
    doc = compose()
    doc["services"]["gateway"]["helthcheck"] = doc["services"]["gateway"].pop("healthcheck")
    doc["services"]["nats"]["depends_on"] = {"minio": {"condition": "service_healthy_please"}}
    errors = compose_errors(doc)
    assert any("helthcheck" in e for e in errors), errors
    assert any(e.startswith("services/nats/depends_on") for e in errors), errors


def test_images_are_pinned_to_exact_release_tags() -> None:
    for name, svc in compose()["services"].items():
        image = svc.get("image", "")
        assert image, f"{name} has no image"
        if name in compose_functions():
            assert image == "jetcut:dev", name  # built here, from infra/Dockerfile
            continue
        _, sep, tag = image.rpartition(":")
        assert sep and tag, f"{name}: {image} has no tag"
        assert tag != "latest" and not tag.startswith("latest-"), f"{name}: {image}"
        # A full version (x.y.z) or MinIO's RELEASE.<timestamp>: never a floating major.
        assert re.fullmatch(r"v?\d+\.\d+\.\d+(-[a-z0-9]+)?|RELEASE\.[0-9TZ-]+", tag), image


def test_depends_on_names_existing_services() -> None:
    services = compose()["services"]
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        assert set(deps) <= set(services), f"{name} waits for {set(deps) - set(services)}"


# --- MinIO's notification target and the ARN minio-setup attaches ------------------------

NATS_ENABLE = "MINIO_NOTIFY_NATS_ENABLE"
ARN = re.compile(r"arn:minio:sqs:[A-Za-z0-9_:.-]*")


def minio_nats_targets(env: dict[str, Any]) -> set[str]:
    """NATS target ids MinIO registers from its environment.

    MinIO's rule (internal/config/config.go ``Merge`` and notify/parse.go ``GetNotifyNATS``
    at RELEASE.2025-09-07T16-13-09Z): for every variable named MINIO_NOTIFY_NATS_ENABLE_<id>
    the id is the suffix exactly as written (no case folding); the bare name is the
    default target ``_``. A target counts only when its enable value is on.
    """
    targets = set()
    for key, value in env.items():
        if not key.startswith(NATS_ENABLE) or str(value).lower() not in {"on", "true", "yes"}:
            continue
        targets.add("_" if key == NATS_ENABLE else key.removeprefix(NATS_ENABLE + "_"))
    return targets


def arn_errors(arn: str, targets: set[str]) -> list[str]:
    """Why MinIO would refuse ``arn`` for a bucket notification (empty: it accepts it).

    event.parseARN wants arn:minio:sqs:<region>:<id>:<type>; Queue.Validate then looks
    TargetID{id, type} up in a Go map: an exact, case-sensitive match.
    """
    tokens = arn.split(":")
    if len(tokens) != 6 or not tokens[4] or not tokens[5]:
        return [f"{arn}: not arn:minio:sqs:<region>:<id>:<type>"]
    errors = []
    if tokens[5] != "nats":
        errors.append(f"{arn}: type {tokens[5]!r} is not nats")
    if tokens[4] not in targets:
        errors.append(f"{arn}: no NATS target {tokens[4]!r}; MinIO has {sorted(targets)}")
    return errors


def minio_env() -> dict[str, Any]:
    return {k: interpolate(v) for k, v in compose()["services"]["minio"]["environment"].items()}


def env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines()
             if line and not line.startswith("#") and "=" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def test_minio_registers_one_nats_target() -> None:
    assert minio_nats_targets(minio_env()) == {"JETCUT"}
    # The env file for a MinIO outside compose registers the same target.
    assert minio_nats_targets(env_file(INFRA / "minio" / "notify-nats.env")) == {"JETCUT"}


def test_minio_setup_attaches_an_arn_minio_knows() -> None:
    """minio-setup's `mc event add` ARN names the target MinIO registers, case and all.

    Every function service waits for minio-setup to succeed, so a refused ARN stops the
    whole stack.
    """
    targets = minio_nats_targets(minio_env())
    script = "\n".join(compose()["services"]["minio-setup"]["command"])
    (event_add,) = [line for line in script.splitlines() if "mc event add" in line]
    (arn,) = ARN.findall(event_add)
    assert arn_errors(arn, targets) == []
    for service in compose_functions().values():
        assert service["depends_on"]["minio-setup"]["condition"] == (
            "service_completed_successfully"
        )


@pytest.mark.parametrize(
    "path",
    [INFRA / "minio" / "notify-nats.env", ROOT / "docs" / "ingest.md", COMPOSE],
    ids=lambda p: p.relative_to(ROOT).as_posix(),
)
def test_every_documented_arn_exists(path: Path) -> None:
    arns = ARN.findall(path.read_text())
    assert arns, f"{path.name} shows no ARN"
    targets = minio_nats_targets(minio_env())
    assert [e for arn in arns for e in arn_errors(arn, targets)] == []


def test_arn_check_refuses_a_case_mismatch() -> None:
    """The lower-case ARN the stack used to attach is exactly what MinIO refuses."""
    targets = minio_nats_targets({"MINIO_NOTIFY_NATS_ENABLE_JETCUT": "on"})
    assert arn_errors("arn:minio:sqs::jetcut:nats", targets)
    assert arn_errors("arn:minio:sqs::JETCUT:webhook", targets)
    assert arn_errors("arn:minio:sqs::JETCUT:nats", targets) == []
    # A bare ENABLE variable is the default target `_`; a disabled one registers nothing.
    assert minio_nats_targets({NATS_ENABLE: "on", NATS_ENABLE + "_X": "off"}) == {"_"}


# --- every service that serves metrics is scraped ----------------------------------------


def scraped_targets() -> set[tuple[str, int]]:
    """(host, port) of every target in the compose Prometheus config."""
    (config,) = load_yaml(PROMETHEUS / "prometheus.yml")
    found: set[tuple[str, int]] = set()
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            found |= {(name, int(sd["port"])) for name in sd["names"]}
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                found.add((host, int(port)))
    return found


def metrics_endpoints() -> set[tuple[str, int]]:
    """(service, port) of every compose service that serves Prometheus metrics.

    A jetcut function serves them on JETCUT_METRICS_PORT, the gateway on its HTTP port
    (read through Settings, as the process would); other services say so with the label
    io.jetcut.metrics-port.
    """
    endpoints = set()
    for name, svc in compose()["services"].items():
        if name in compose_functions():
            settings = load_settings({k: interpolate(v) for k, v in svc["environment"].items()})
            port = settings.http_port if name == "gateway" else settings.metrics_port
            assert port, f"{name} serves no metrics (JETCUT_METRICS_PORT unset)"
            endpoints.add((name, port))
        elif "io.jetcut.metrics-port" in (svc.get("labels") or {}):
            endpoints.add((name, int(svc["labels"]["io.jetcut.metrics-port"])))
    return endpoints


def test_prometheus_scrapes_exactly_the_services_that_serve_metrics() -> None:
    scraped, served = scraped_targets(), metrics_endpoints()
    assert not served - scraped, f"never scraped: {sorted(served - scraped)}"
    assert not scraped - served, f"scraped but not served: {sorted(scraped - served)}"
    # Every function, not just a sample: 21 jetcut services in compose today.
    assert {name for name, _ in served} >= set(compose_functions())


def test_jetcut_targets_carry_the_kubernetes_labels_the_alerts_select_on() -> None:
    """Compose targets are labelled like Kubernetes pods, so alerts.yml works in both."""
    (config,) = load_yaml(PROMETHEUS / "prometheus.yml")
    for job in config["scrape_configs"]:
        if not job["job_name"].startswith("jetcut-"):
            continue
        relabels = job["relabel_configs"]
        assert {"source_labels": ["__meta_dns_name"],
                "target_label": "app_kubernetes_io_component"} in relabels
        assert {"target_label": "app_kubernetes_io_name", "replacement": "jetcut"} in relabels


# --- traces ------------------------------------------------------------------------------


def test_functions_send_traces_to_the_jaeger_v2_otlp_receiver() -> None:
    services = compose()["services"]
    jaeger = services["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/jaeger:2.")
    (config,) = load_yaml(INFRA / "jaeger" / "config.yaml")
    mount = f"./{(INFRA / 'jaeger' / 'config.yaml').relative_to(ROOT).as_posix()}:"
    (volume,) = [v for v in jaeger["volumes"] if v.startswith(mount)]
    assert jaeger["command"] == ["--config", volume.split(":")[1]]
    http = config["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert config["service"]["pipelines"]["traces"]["receivers"] == ["otlp"]
    for name, svc in compose_functions().items():
        endpoint = load_settings(
            {k: interpolate(v) for k, v in svc["environment"].items()}
        ).otel_endpoint
        assert endpoint == f"http://jaeger:{http.rpartition(':')[2]}", name
    # The UI port published on the host is the one jaeger_query serves.
    query = config["extensions"]["jaeger_query"]["http"]["endpoint"]
    assert f"{query.rpartition(':')[2]}:{query.rpartition(':')[2]}" in jaeger["ports"]
    # Grafana's Jaeger data source reads the same query API.
    (sources,) = load_yaml(INFRA / "grafana" / "provisioning" / "datasources" / "datasources.yml")
    (ds,) = [d for d in sources["datasources"] if d["type"] == "jaeger"]
    assert ds["url"] == f"http://jaeger:{query.rpartition(':')[2]}"


# --- the README's section says what the file does ----------------------------------------


def readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Run it with Docker Compose")
    return text[start:text.index("\n## ", start + 1)]


def test_readme_compose_section_matches_the_file() -> None:
    section = readme_section()
    published = {
        int(port.split(":")[0])
        for svc in compose()["services"].values()
        for port in svc.get("ports", [])
    }
    shown = {int(p) for p in re.findall(r"localhost:(\d+)", section)}
    assert shown and shown <= published, sorted(shown - published)
    # Every published UI or API is in the table (4222/8222/9000 are not for browsers).
    assert published - shown == {4222, 8222, 9000}
    (count,) = re.findall(r"each of the (\d+) functions", section)
    assert int(count) == len(compose_functions())
    defaults = compose()["services"]["minio"]["environment"]
    assert f"`{interpolate(defaults['MINIO_ROOT_USER'])}` / " \
           f"`{interpolate(defaults['MINIO_ROOT_PASSWORD'])}`" in section
    assert "Jaeger v2" in section and "jaegertracing/jaeger:2." in compose()["services"][
        "jaeger"]["image"]
    commands = re.findall(r"^docker compose (\w+)(.*?)\s*(?:#.*)?$", section, re.MULTILINE)
    assert commands
    for verb, rest in commands:
        if verb == "up":
            assert set(re.findall(r"(--[a-z-]+)", rest)) <= {"--build", "--scale"}, rest
            for name in re.findall(r"--scale (\S+)=", rest):
                assert name in compose()["services"], rest
        else:
            assert verb == "exec", verb
            service, command = rest.split()[:2]
            assert service in compose_functions() and command == "jetcut", rest


def test_operations_doc_names_the_images_compose_runs() -> None:
    """docs/operations.md's service table shows each pinned image exactly as compose pins it."""
    doc = (ROOT / "docs" / "operations.md").read_text()
    section = doc[doc.index("## docker compose"):doc.index("## Kubernetes with KEDA")]
    rows = re.findall(r"^\| `([a-z-]+)` \| `([^`]+)` \|", section, re.MULTILINE)
    shown = dict(rows)
    services = compose()["services"]
    pinned = {name: svc["image"] for name, svc in services.items()
              if name not in compose_functions()}
    assert shown == {**pinned, "gateway": "jetcut:dev"}
