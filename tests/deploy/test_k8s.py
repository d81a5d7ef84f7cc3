"""deploy/k8s validates against Kubernetes' own schemas, offline, and its parts agree with each
other and with the server: probes on the server's routes and port, the Service on the pods, the
HPA on the Deployment and on metrics the Prometheus adapter derives from exported series."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy.conftest import K8S, ROOT, LiveServer
from tests.deploy.test_dashboard import exported
from tests.deploy.test_dockerfiles import cli_default_port, parse_dockerfile

# The oldest and newest minor versions kubernetes-validate bundles schemas for that we claim:
# autoscaling/v2 went GA in 1.23, and 1.27 is the oldest release cloud providers still run.
VERSIONS = ["1.27.0", "1.37.0"]


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    found = [
        (path, doc) for path in sorted(K8S.glob("*.yaml")) for doc in documents(path)
        if doc["kind"] != "Kustomization"
    ]  # fmt: skip
    assert found, "no manifests in deploy/k8s"
    return found


def by_kind(kind: str) -> dict[str, Any]:
    [doc] = [doc for _, doc in manifests() if doc["kind"] == kind]
    return doc


def container() -> dict[str, Any]:
    [main] = by_kind("Deployment")["spec"]["template"]["spec"]["containers"]
    return main


def adapter_rules() -> list[dict[str, Any]]:
    config = by_kind("ConfigMap")["data"]["config.yaml"]
    return yaml.safe_load(config)["rules"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    ("path", "doc"), manifests(), ids=[f"{p.name}:{d['kind']}" for p, d in manifests()]
)
def test_manifest_validates(path: Path, doc: dict[str, Any], version: str) -> None:
    validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate, part of the dev extra"
    ).validate
    # strict: unknown fields (a typo'd key Kubernetes would silently drop) are errors too.
    validate(doc, version, strict=True)


def test_the_validator_has_teeth() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="part of the dev extra")
    doc = by_kind("Deployment")
    broken = yaml.safe_load(yaml.safe_dump(doc))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGets"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, VERSIONS[-1], strict=True)
    broken = yaml.safe_load(yaml.safe_dump(by_kind("HorizontalPodAutoscaler")))
    broken["spec"]["metrics"][0]["pods"]["target"]["type"] = 2
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, VERSIONS[-1], strict=True)


def test_kustomization_lists_the_app_manifests() -> None:
    [kustomization] = documents(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    assert all((K8S / name).is_file() for name in listed)
    # Everything but the adapter's rules, which live in the adapter's namespace.
    app = {p.name for p, d in manifests() if d["kind"] != "ConfigMap"}
    assert listed == app


def test_probes_hit_the_server_routes_on_its_port() -> None:
    main = container()
    [port] = main["ports"]
    assert port["containerPort"] == cli_default_port()
    probes = {kind: main[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe",
                                                       "readinessProbe")}  # fmt: skip
    assert probes["readinessProbe"]["path"] == "/ready"
    assert probes["livenessProbe"]["path"] == "/health"
    assert probes["startupProbe"]["path"] == "/health"
    assert {p["port"] for p in probes.values()} == {port["name"]}
    # A first start converts the model pair before /health answers: give it minutes.
    startup = main["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


def test_routes_answer_as_the_probes_expect(live: LiveServer) -> None:
    for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
        path = container()[kind]["httpGet"]["path"]
        assert httpx.get(live.url + path, timeout=10).status_code == 200, kind


def test_pod_runs_as_the_image_user_with_a_writable_cache() -> None:
    image = parse_dockerfile(ROOT / "Dockerfile")
    uid = int(image.one("USER").args.split(":")[0])
    pod = by_kind("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid
    assert pod["securityContext"]["fsGroup"] == uid
    main = container()
    env = {e["name"]: e["value"] for e in main["env"]}
    cache = env["SPECSERVE_CACHE"]
    mounted = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    assert cache in mounted
    volumes = {v["name"] for v in pod["volumes"]}
    assert mounted[cache] in volumes
    assert env["SPECSERVE_PORT"] == str(cli_default_port())
    assert main["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_service_selects_the_pods() -> None:
    service = by_kind("Service")
    deployment = by_kind("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    [port] = service["spec"]["ports"]
    assert port["targetPort"] == container()["ports"][0]["name"]
    assert "sessionAffinity" not in service["spec"], "requests are independent: no stickiness"


def test_hpa_scales_the_deployment_on_adapter_metrics(live: LiveServer) -> None:
    hpa = by_kind("HorizontalPodAutoscaler")
    deployment = by_kind("Deployment")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 1
    pods_metrics = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    names = [m["metric"]["name"] for m in pods_metrics]
    assert names[0] == "specserve_num_requests_waiting", "queue depth is the primary signal"

    # Each HPA metric is what some adapter rule renames an exported gauge to.
    series = exported(live.scrape)
    offered = {}
    for rule in adapter_rules():
        metric = rule["seriesQuery"].split("{", 1)[0].strip("'\" ")
        assert metric in series, f"adapter rule reads {metric}, which the server does not export"
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        offered[re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"),
                       metric)] = metric  # fmt: skip
    assert set(names) <= offered.keys(), (names, offered)
    for metric in pods_metrics:
        assert metric["target"]["type"] == "AverageValue"
        assert float(metric["target"]["averageValue"]) > 0

    # The slot target must leave headroom below the slots each pod actually has.
    env = {e["name"]: e["value"] for e in container()["env"]}
    slots_target = next(
        m["target"]["averageValue"] for m in pods_metrics
        if offered[m["metric"]["name"]] == "specserve:kv_slots_used"
    )  # fmt: skip
    assert float(slots_target) < int(env["SPECSERVE_MAX_SLOTS"])
