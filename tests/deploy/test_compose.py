"""docker/compose.yaml wires the server, Prometheus and Grafana to each other consistently:
every mount exists, the scrape target is the server service on the server's port, Grafana's
provisioning points at Prometheus and at the mounted dashboards."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from tests.deploy.conftest import DOCKER, ROOT, require_tool, run_tool
from tests.deploy.test_dockerfiles import cli_default_port, parse_dockerfile

COMPOSE = DOCKER / "compose.yaml"
GPU = DOCKER / "compose.gpu.yaml"
PROMETHEUS = DOCKER / "prometheus.yml"
PROVISIONING = DOCKER / "grafana" / "provisioning"


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def compose() -> dict[str, Any]:
    return load(COMPOSE)


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (host path resolved against docker/, or a volume name)."""
    found = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        if source.startswith((".", "/")):
            source = str((DOCKER / source).resolve())
        found[target] = source
    return found


def container_ports(service: dict[str, Any]) -> set[int]:
    return {int(str(spec).split(":")[-1].split("/")[0]) for spec in service.get("ports", [])}


def test_services_and_volumes() -> None:
    spec = compose()
    services = spec["services"]
    assert {"server", "prometheus", "grafana"} <= services.keys()
    named = {
        source for service in services.values() for source in mounts(service).values()
        if not source.startswith("/")
    }  # fmt: skip
    assert named <= set(spec["volumes"]), "every named volume must be declared"
    for service in services.values():
        for target, source in mounts(service).items():
            if source.startswith("/"):
                assert Path(source).exists(), f"{target}: {source} is missing"
    for name, service in services.items():
        assert str(service["image"]).split(":")[-1] not in ("", "latest"), f"{name}: pin a tag"


def test_server_builds_the_cpu_image_with_its_cache_volume() -> None:
    server = compose()["services"]["server"]
    context = (DOCKER / server["build"]["context"]).resolve()
    assert context == ROOT
    dockerfile = parse_dockerfile(context / server["build"]["dockerfile"])
    assert dockerfile.path.name == "Dockerfile.cpu"
    cache = dockerfile.env["SPECSERVE_CACHE"]
    assert cache in mounts(server), "the model cache should outlive the container"
    assert container_ports(server) == {cli_default_port()}


def test_gpu_override_keeps_the_service_and_reserves_a_gpu() -> None:
    server = load(GPU)["services"]["server"]
    assert set(load(GPU)["services"]) == {"server"}, "same name, so the scrape target holds"
    assert (DOCKER / server["build"]["context"]).resolve() == ROOT
    assert parse_dockerfile(ROOT / server["build"]["dockerfile"]).path.name == "Dockerfile"
    [device] = server["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def test_prometheus_scrapes_the_server_service() -> None:
    spec = compose()
    config = load(PROMETHEUS)
    [job] = config["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    [static] = job["static_configs"]
    [target] = static["targets"]
    host, port = target.rsplit(":", 1)
    assert host in spec["services"]
    assert host == "server"
    assert int(port) in container_ports(spec["services"][host])
    assert int(port) == cli_default_port()
    prometheus = spec["services"]["prometheus"]
    flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = flag.split("=", 1)[1]
    assert mounts(prometheus)[config_path] == str(PROMETHEUS.resolve())


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards() -> None:
    spec = compose()
    grafana = mounts(spec["services"]["grafana"])
    assert grafana["/etc/grafana/provisioning"] == str(PROVISIONING.resolve())
    [datasource] = load(PROVISIONING / "datasources" / "prometheus.yaml")["datasources"]
    url = datasource["url"].removeprefix("http://")
    host, port = url.split(":")
    assert host in spec["services"] and int(port) in container_ports(spec["services"][host])
    # Grafana's rate windows assume the scrape interval.
    interval = load(PROMETHEUS)["global"]["scrape_interval"]
    assert datasource["jsonData"]["timeInterval"] == interval
    [provider] = load(PROVISIONING / "dashboards" / "specserve.yaml")["providers"]
    path = PurePosixPath(provider["options"]["path"])
    assert grafana[str(path)] == str((DOCKER / "grafana" / "dashboards").resolve())
    home = spec["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert PurePosixPath(home).parent == path
    assert (DOCKER / "grafana" / "dashboards" / PurePosixPath(home).name).is_file()


def test_promtool_accepts_the_prometheus_config() -> None:
    promtool = require_tool("promtool", "Debian package prometheus")
    result = run_tool([promtool, "check", "config", str(PROMETHEUS)])
    assert result.returncode == 0, result.stdout + result.stderr
