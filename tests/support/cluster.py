"""The Kafka cluster of ``make test-cluster``: its nodes, who leads what, and when it is whole again.

Node ``i`` of the stack is the service ``kafka`` (i = 1) or ``kafka-i`` of ``stack/stack.sh``.
"""

from __future__ import annotations

import time
from collections import Counter

from confluent_kafka.admin import AdminClient, ConfigResource

from support.waiting import wait_for

__all__ = ["admin", "brokers", "leaders", "service_of", "under_replicated", "wait_whole", "replication_of",
           "answer_times"]


def admin(servers: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": servers, "log_level": 0})


def service_of(node: int) -> str:
    """The stack service that runs Kafka node ``node``."""
    return "kafka" if node == 1 else f"kafka-{node}"


def brokers(servers: str) -> set[int]:
    """The ids of the brokers the cluster lists now (a stopped or fenced one is not listed)."""
    return set(admin(servers).list_topics(timeout=10).brokers)


def leaders(servers: str, *topics: str) -> Counter:
    """How many partitions of ``topics`` each node leads."""
    md = admin(servers).list_topics(timeout=10)
    led: Counter = Counter()
    for topic in topics:
        tmd = md.topics[topic]
        assert tmd.error is None, f"{topic}: {tmd.error}"
        for p in tmd.partitions.values():
            led[p.leader] += 1
    return led


def under_replicated(servers: str) -> list[str]:
    """Every partition of the cluster whose in-sync replicas are fewer than its replicas, as ``topic/partition``."""
    md = admin(servers).list_topics(timeout=10)
    return [f"{name}/{p.id}" for name, tmd in md.topics.items() for p in tmd.partitions.values()
            if len(p.isrs) < len(p.replicas)]


def wait_whole(servers: str, nodes: int = 3, timeout: float = 180.0) -> float:
    """Wait until ``nodes`` brokers are listed and every partition has all its replicas in sync; the seconds it took."""
    t0 = time.monotonic()

    def whole() -> bool:
        try:
            return len(brokers(servers)) == nodes and not under_replicated(servers)
        except Exception:  # a broker that is just starting may fail the request
            return False

    wait_for(whole, timeout, f"{nodes} brokers listed and every partition fully in sync", interval=0.5)
    return time.monotonic() - t0


def replication_of(servers: str, topic: str) -> tuple[int, int]:
    """``topic``'s replication factor (its first partition's replicas) and its ``min.insync.replicas``."""
    a = admin(servers)
    md = a.list_topics(topic=topic, timeout=10).topics[topic]
    rf = len(md.partitions[0].replicas)
    res = ConfigResource(ConfigResource.Type.TOPIC, topic)
    configs = a.describe_configs([res])[res].result(30)
    return rf, int(configs["min.insync.replicas"].value)


def answer_times(servers: str, topic: str) -> list[float]:
    """The timestamps (epoch seconds, as their producers set them) of every record of a one-partition ``topic``."""
    import uuid

    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": servers, "group.id": f"times-{uuid.uuid4().hex}", "enable.auto.commit": False})
    try:
        end = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1]
        c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        out: list[float] = []
        seen, deadline = 0, time.monotonic() + 60
        while seen < end and time.monotonic() < deadline:
            for m in c.consume(500, timeout=0.5):
                if m.error() is None:
                    seen = max(seen, m.offset() + 1)
                    out.append(m.timestamp()[1] / 1000)
        return out
    finally:
        c.close()
