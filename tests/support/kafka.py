"""Kafka helpers over confluent-kafka: topics, records, offsets, and stand-in dependency services."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from support.stack import RUN_ID
from support.waiting import wait_for

__all__ = ["KafkaKit", "Service", "committed_total", "high_watermark", "return_topic_name", "topic_name"]


def topic_name(base: str) -> str:
    """The topic a test reactor in tests/apps serves in this run."""
    return f"{RUN_ID}.{base}"


def return_topic_name(wait_s: float = 3600.0) -> str:
    """A return topic name as fusion-celery makes them, for a caller that waits up to ``wait_s`` seconds
    (the reaper leaves it alone until then, plus its grace)."""
    now = int(time.time() * 1000)
    return f"fusion.rt.{now}.{now + int(wait_s * 1000)}.{uuid.uuid4().hex}"


class KafkaKit:
    """Small helpers over confluent-kafka for tests (topics, produce, read)."""

    def __init__(self, servers: str) -> None:
        from confluent_kafka import Producer
        from confluent_kafka.admin import AdminClient
        self.servers = servers
        self.admin = AdminClient({"bootstrap.servers": servers})
        self.producer = Producer({"bootstrap.servers": servers, "linger.ms": 0})
        self.created: list[str] = []

    def topic(self, name: str | None = None, partitions: int = 1) -> str:
        from confluent_kafka.admin import NewTopic
        name = name or f"t.{RUN_ID}.{uuid.uuid4().hex[:10]}"
        # the broker's default replication: 1 on one node, 3 on the cluster of make test-cluster
        fut = self.admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=-1)])[name]
        try:
            fut.result(30)
        except Exception as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
        self.created.append(name)
        self.wait_visible([name])
        return name

    def topics(self, prefix: str = "") -> set[str]:
        return {t for t in self.admin.list_topics(timeout=10).topics if t.startswith(prefix)}

    def wait_visible(self, names: list[str], timeout: float = 60.0) -> None:
        """Wait until the broker's metadata lists ``names``: the controller answers a creation before
        the broker knows the topic, and a reply sent in between is dropped as "no longer exists"."""
        wait_for(lambda: not set(names) - self.topics(), timeout, f"{len(names)} new topic(s) to be visible")

    def send(self, topic: str, value: bytes | str | dict | None, headers=None, key=None):
        if isinstance(value, dict):
            value = json.dumps(value)
        done: dict[str, Any] = {}
        self.producer.produce(topic, value, key=key, headers=headers,
                              on_delivery=lambda err, msg: done.update(err=err, msg=msg))
        self.producer.flush(30)
        assert done.get("err") is None, done
        return done["msg"]

    def read(self, topic: str, count: int, timeout: float = 30.0, partitions: int = 1,
             at_most: bool = False) -> list[Any]:
        """Read ``count`` records from the beginning of ``topic`` (fail after ``timeout``).

        With ``at_most``, read for ``timeout`` seconds and return what came, up to ``count``
        (to show that no more than some number of records were written)."""
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
        c = Consumer({"bootstrap.servers": self.servers, "group.id": f"reader-{uuid.uuid4().hex}",
                      "enable.auto.commit": False})
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        try:
            while len(out) < count and time.monotonic() < deadline:
                for m in c.consume(count - len(out), timeout=0.5):
                    if m.error() is None:
                        out.append(m)
        finally:
            c.close()
        if len(out) < count and not at_most:
            pytest.fail(f"read {len(out)} of {count} records from {topic} within {timeout}s")
        return out

    def close(self) -> None:
        if self.created:
            # Each name once: confluent-kafka 2.16 crashes on a DeleteTopics result that names a topic twice.
            for f in self.admin.delete_topics(list(dict.fromkeys(self.created))).values():
                f.exception(30)  # waited for: a client is never destroyed with its requests in flight
        self.producer.flush(10)
        self.producer.close()
        self.admin.__exit__(None, None, None)


class Service(threading.Thread):
    """A dependency service written with confluent-kafka alone: replies ``fn(data)`` on the return topic.

    With ``echo_id`` it also echoes the request's ``id`` in the ``fusion-id`` header, as the
    ``shared`` reply channel needs.
    """

    def __init__(self, servers: str, topic: str, fn: Callable[[Any], Any], *, raw: bool = False) -> None:
        super().__init__(daemon=True)
        from confluent_kafka import Consumer, Producer
        self.servers, self.topic, self.fn, self.raw = servers, topic, fn, raw
        self.consumer = Consumer({"bootstrap.servers": servers, "group.id": f"svc-{topic}",
                                  "auto.offset.reset": "earliest"})
        self.producer = Producer({"bootstrap.servers": servers, "linger.ms": 0})
        self.stop_event = threading.Event()
        self.received: list[dict] = []
        self.held: list[tuple[str, Any, Any]] = []
        self.hold = False
        self.echo_id = False

    def reply(self, return_topic: str, result: Any, headers=None) -> None:
        self.producer.produce(return_topic, json.dumps(result), headers=headers)
        self.producer.flush(10)

    def release(self) -> None:
        held, self.held = self.held, []
        for return_topic, result, headers in held:
            self.reply(return_topic, result, headers)

    def run(self) -> None:
        self.consumer.subscribe([self.topic])
        while not self.stop_event.is_set():
            msg = self.consumer.poll(0.1)
            if msg is None or msg.error():
                continue
            body = json.loads(msg.value())
            self.received.append({**body, "_t": time.time()})
            out = self.fn(body["data"])
            rt = body.get("return-topic") or body.get("response-topic")
            headers = [("fusion-id", str(body["id"]).encode())] if self.echo_id and body.get("id") else None
            if rt:
                if self.hold:
                    self.held.append((rt, out, headers))
                else:
                    self.reply(rt, out, headers)
        self.consumer.close()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)
        if not self.is_alive():
            self.producer.flush(10)
            self.producer.close()


def high_watermark(servers: str, topic: str) -> int:
    """Sum of the end offsets of all partitions of ``topic`` (records ever written to it)."""
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": servers, "group.id": "hw", "enable.auto.commit": False})
    try:
        md = c.list_topics(topic, timeout=10).topics[topic]
        return sum(c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in md.partitions)
    finally:
        c.close()


def committed_total(servers: str, group: str, topic: str, partitions: int) -> int:
    """Sum of the committed offsets of ``group`` on ``topic``."""
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": servers, "group.id": group, "enable.auto.commit": False})
    try:
        parts = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return sum(max(0, p.offset) for p in parts)
    finally:
        c.close()
