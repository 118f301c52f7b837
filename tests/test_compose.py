"""docker-compose.yml, checked for structure where no Docker engine runs.

The services, images, ports, commands, health checks and start order of the
local deployment, and the consistency of the application containers' settings
with the Kafka listeners and with fusion-celery's own settings.
"""

from __future__ import annotations

import re

import pytest
import yaml
from support.stack import ROOT


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def command(service: dict) -> str:
    cmd = service["command"]
    return " ".join(cmd) if isinstance(cmd, list) else cmd


def env(service: dict) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {k: str(v) for k, v in raw.items()}


def test_the_services_and_their_images(services):
    assert set(services) == {"kafka", "redis", "zookeeper", "worker", "flower", "client"}
    assert re.fullmatch(r"apache/kafka:\d+\.\d+\.\d+", services["kafka"]["image"])
    assert services["redis"]["image"].startswith("redis:")
    assert services["zookeeper"]["image"].startswith("zookeeper:")
    for name in ("worker", "flower", "client"):
        assert services[name]["image"].startswith("python:3.1"), name
        assert "/app" in services[name]["working_dir"]


def test_kafka_runs_in_kraft_mode(services):
    kafka = env(services["kafka"])
    assert set(kafka["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert kafka["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{kafka['KAFKA_NODE_ID']}@kafka:")
    assert "CLUSTER_ID" in kafka
    assert not any("ZOOKEEPER" in key for key in kafka), "KRaft: Kafka itself needs no ZooKeeper"


def test_ports(services):
    published = {name: [str(p) for p in s.get("ports", [])] for name, s in services.items()}
    assert "9092:9092" in published["kafka"]
    assert "6379:6379" in published["redis"]
    assert "2181:2181" in published["zookeeper"]
    assert "5555:5555" in published["flower"]


def test_commands(services):
    assert re.search(r"celery -A fusion_celery worker\b", command(services["worker"]))
    assert re.search(r"celery -A fusion_celery flower --port=5555\b", command(services["flower"]))
    assert re.search(r"python -m examples\.math\.client\b", command(services["client"]))
    assert str(services["client"].get("restart")) == "no"  # one-shot


def test_the_worker_serves_the_math_example_that_exists(services):
    imports = env(services["worker"])["FUSION_IMPORTS"].split(",")
    assert imports == ["examples.math.reactors"]
    assert (ROOT / "examples" / "math" / "reactors.py").is_file()
    assert (ROOT / "examples" / "math" / "client.py").is_file()


def test_every_service_others_wait_for_has_a_health_check(services):
    for name in ("kafka", "redis", "zookeeper", "worker", "flower"):
        check = services[name].get("healthcheck")
        assert check and check.get("test"), f"{name} has no health check"


def test_start_order_waits_for_health(services):
    def waits_for(name: str) -> dict[str, str]:
        deps = services[name].get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on needs conditions, not a bare list"
        return {dep: spec.get("condition") for dep, spec in deps.items()}

    infra = {"kafka": "service_healthy", "redis": "service_healthy", "zookeeper": "service_healthy"}
    assert waits_for("worker") == infra
    assert waits_for("flower") == {**infra, "worker": "service_healthy"}
    assert waits_for("client") == {**infra, "worker": "service_healthy", "flower": "service_healthy"}
    for name in services:
        for dep, condition in (services[name].get("depends_on") or {}).items():
            assert dep in services
            if condition.get("condition") == "service_healthy":
                assert services[dep].get("healthcheck"), f"{name} waits for {dep} to be healthy, which has no check"


def test_application_settings_match_the_services(services):
    from fusion_celery.config import SETTINGS
    known = {s.env for s in SETTINGS}
    kafka = env(services["kafka"])
    advertised = kafka["KAFKA_ADVERTISED_LISTENERS"]
    for name in ("worker", "flower", "client"):
        e = env(services[name])
        assert e["FUSION_KAFKA_BOOTSTRAP_SERVERS"] in advertised, "the containers use an advertised listener"
        assert e["CELERY_BROKER_URL"].startswith("redis://redis:6379/")
        assert e["CELERY_RESULT_BACKEND"].startswith("redis://redis:6379/")
        assert e["FUSION_ZOOKEEPER_HOSTS"] == "zookeeper:2181"
        unknown = {k for k in e if k.startswith("FUSION_") and k not in known}
        assert not unknown, f"{name}: {unknown} are not fusion-celery settings"
