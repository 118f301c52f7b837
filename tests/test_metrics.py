"""A worker's Prometheus metrics, scraped over HTTP from an in-process worker: no service needed.

The app of this module is its own (its own Kafka, registry and result backend), so every count
scraped is what this module's tests did.  The tests run in file order and build on each other's
counts.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families
from support.ports import free_port
from support.waiting import wait_for

from fusion_celery import DependencyFailed, DependencyTimeout, Message, Pipeline, reactor
from fusion_celery.metrics import channel_of
from fusion_celery.testing import in_process_app, worker
from fusion_celery.testing.app import kafka_broker
from fusion_celery.testing.kafka import Consumer, Producer

TIMEOUT = 15.0



@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Celery, int]]:
    port = free_port()
    app = in_process_app("metrics", fusion_default_timeout=TIMEOUT, fusion_metrics_port=port,
                         fusion_metrics_address="127.0.0.1")

    @reactor("add", app=app)
    def add(message: Message) -> Any:
        return sum(message.data)

    @reactor("math", app=app, deps=lambda m: {
        "one": {"topic": "add", "args": m.data},
        "two": {"topic": "add", "args": [2], "deps": ["one"], "arg_in_fn": "cons"}})
    def math(message: Message, results: dict[str, Any]) -> Any:
        return results["two"]

    @reactor("boom", app=app)
    def boom(message: Message) -> Any:
        raise ValueError("boom")

    for topic in ("silent", "plain"):
        kafka_broker(app).create_topic(topic)
    with worker(app):
        yield app, port


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the worker's ``/metrics``: ``{(name, sorted labels): value}``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def call(app: Celery, topic: str, data: Any, timeout: float = TIMEOUT) -> Any:
    return Pipeline(topic, app=app).delay(data, timeout=timeout).get(timeout=timeout + 5)


def test_replies_waits_timeouts_and_dead_letters_are_counted(served):
    app, port = served
    assert call(app, "math", [1, 2]) == 5          # waits: the pipeline's, "one" and "two"; three ok replies
    with pytest.raises(DependencyFailed):
        call(app, "boom", 1)                        # one wait, one error reply
    with pytest.raises(DependencyTimeout):
        call(app, "silent", None, timeout=0.5)      # one wait, timed out
    producer = Producer({"bootstrap.servers": app.conf.fusion_kafka_bootstrap_servers})
    producer.produce("add", b"{not json")
    producer.flush(1)
    producer.close()

    def counted():
        s = scrape(port)
        return value(s, "fusion_dead_letters_total", topic="add", reason="not-json") == 1 and s

    s = wait_for(counted, TIMEOUT, "the dead letter in the metrics")
    assert value(s, "fusion_replies_total", topic="add", status="ok") == 2
    assert value(s, "fusion_replies_total", topic="math", status="ok") == 1
    assert value(s, "fusion_replies_total", topic="boom", status="error") == 1, [k for k in s if "repl" in k[0]]
    assert value(s, "fusion_dependency_timeouts_total", topic="silent") == 1
    assert value(s, "fusion_wait_duration_seconds_count", topic="add", outcome="ok") == 2
    assert value(s, "fusion_wait_duration_seconds_count", topic="math", outcome="ok") == 1
    assert value(s, "fusion_wait_duration_seconds_count", topic="boom", outcome="error") == 1
    assert value(s, "fusion_wait_duration_seconds_bucket", topic="add", outcome="ok", le="+Inf") == 2
    assert value(s, "fusion_return_topics_leased_total") == 5  # every wait had a topic of the lease pool
    assert value(s, "fusion_return_topics_created_total", channel="leased") >= 1
    lags = {labels: v for (name, labels), v in s.items() if name == "fusion_intake_lag"}
    assert lags and set(lags.values()) == {0.0}, lags  # every record read was handed over
    assert {dict(labels)["topic"] for labels in lags} <= {"add", "math", "boom"}


def test_waits_pending_follow_the_waiter(served):
    app, port = served
    servers = app.conf.fusion_kafka_bootstrap_servers
    requests = Consumer({"bootstrap.servers": servers, "group.id": "plain", "auto.offset.reset": "earliest"})
    producer = Producer({"bootstrap.servers": servers})
    try:
        requests.subscribe(["plain"])
        result = Pipeline("plain", app=app).delay(1, timeout=TIMEOUT)
        request = wait_for(lambda: next((m for m in requests.consume(1, 0.05) if m.error() is None), None), TIMEOUT,
                           "the request on topic plain")
        pending = wait_for(lambda: value(scrape(port), "fusion_waits_pending", topic="plain"), TIMEOUT,
                           "a wait pending")
        assert pending == 1
        body = json.loads(request.value())
        producer.produce(body["return-topic"], json.dumps(2), headers=[("fusion-id", body["id"].encode())])
        producer.flush(1)
        assert result.get(timeout=TIMEOUT) == 2
        wait_for(lambda: value(scrape(port), "fusion_waits_pending", topic="plain") is None, TIMEOUT, "no wait pending")
    finally:
        requests.close()
        producer.close()


def test_the_server_closes_with_the_worker():
    port = free_port()
    app = in_process_app("metrics-closing", fusion_metrics_port=port, fusion_metrics_address="127.0.0.1")
    with worker(app):
        assert "fusion_waits_pending" in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                                                timeout=5).read().decode()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_metrics_are_off_by_default():
    app = in_process_app("metrics-off")
    with worker(app):
        assert app._fusion_metrics is None


@pytest.mark.parametrize(("name", "channel"), [
    ("fusion.rt.lease.w1.0a1b", "leased"), ("fusion.rt.shared.3", "shared"),
    ("fusion.rt.1764270000123.1764270060123.9f", "ephemeral"), ("orders", None)])
def test_a_return_topics_channel_is_read_from_its_name(name, channel):
    assert channel_of(name, "fusion.rt.") == channel


def test_a_port_in_use_stops_the_worker_at_start(caplog):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = in_process_app("metrics-taken", fusion_metrics_port=port, fusion_metrics_address="127.0.0.1")
        with pytest.raises(RuntimeError, match="stopped while starting"), worker(app, ready_timeout=15):
            pass
    assert f"cannot serve metrics on 127.0.0.1:{port}" in caplog.text


def test_intake_lag_counts_the_records_held_back_at_max_in_flight():
    port = free_port()
    app = in_process_app("metrics-lag", fusion_metrics_port=port, fusion_metrics_address="127.0.0.1",
                         fusion_max_in_flight=1, fusion_default_timeout=TIMEOUT)

    @reactor("held", app=app, deps={"x": {"topic": "plain", "args": []}})
    def held(message: Message, results: dict[str, Any]) -> Any:
        return results

    kafka_broker(app).create_topic("plain")
    with worker(app):
        producer = Producer({"bootstrap.servers": app.conf.fusion_kafka_bootstrap_servers})
        for i in range(3):
            producer.produce("held", json.dumps({"data": i}), key=str(i))
        producer.flush(1)
        producer.close()

        def lagging():
            s = scrape(port)
            lags = [v for (name, labels), v in s.items() if name == "fusion_intake_lag" and ("topic", "held") in labels]
            return value(s, "fusion_waits_pending", topic="plain") == 1 and sum(lags) == 2

        wait_for(lagging, TIMEOUT, "1 run waiting and 2 records of lag")  # the run in flight waits for "plain" for ever
