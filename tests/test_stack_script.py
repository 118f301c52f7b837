"""stack/stack.sh's topology and broker knobs, without starting anything: the services and their ports per node
count, and RabbitMQ as a service with FUSION_BROKER=rabbitmq."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stack(*args: str, nodes: str | None = None, broker: str = "redis") -> subprocess.CompletedProcess:
    """``stack.sh ARGS`` with the knobs given (a stack that is up in the checkout does not change them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSION_KAFKA")}
    env["FUSION_BROKER"] = broker
    if nodes is not None:
        env["FUSION_KAFKA_NODES"] = nodes
    return subprocess.run(["bash", str(ROOT / "stack" / "stack.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=30)


def test_one_node_by_default_and_three_with_the_knob():
    assert stack("services", nodes="1").stdout.split() == ["zookeeper", "redis", "kafka"]
    assert stack("services", nodes="3").stdout.split() == ["zookeeper", "redis", "kafka", "kafka-2", "kafka-3"]


def test_a_node_count_that_is_not_a_number_is_refused_naming_the_knob():
    out = stack("services", nodes="three")
    assert out.returncode == 2
    assert "FUSION_KAFKA_NODES must be 1..9" in out.stderr


def test_a_node_of_another_topology_is_not_a_service():
    out = stack("stop", "kafka-3", nodes="1")
    assert out.returncode == 2
    assert "expected a service name: zookeeper redis kafka" in out.stderr


def test_rabbitmq_is_a_service_with_the_broker_knob():
    assert stack("services", nodes="1", broker="rabbitmq").stdout.split() == ["zookeeper", "redis", "kafka",
                                                                               "rabbitmq"]


def test_a_broker_other_than_redis_or_rabbitmq_is_refused_naming_the_knob():
    out = stack("services", nodes="1", broker="kafka")
    assert out.returncode == 2
    assert "FUSION_BROKER must be redis or rabbitmq" in out.stderr
