"""The whole request path in one process: dispatch -> waiter -> completion -> reply, without any service.

A real Celery worker (threads pool, fusion's bootstep) serves reactors of an app from
:func:`fusion_celery.testing.in_process_app`: its Celery broker is kombu's memory
transport, its result backend fakeredis, its registry ``memory://`` and its Kafka the
in-memory stub.  One worker serves every test of the module.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery
from confluent_kafka import OFFSET_BEGINNING, TopicPartition
from support.arithmetic import arithmetic
from support.waiting import wait_for

from fusion_celery import DependencyFailed, DependencyTimeout, Message, Pipeline, reactor, signals
from fusion_celery.testing import in_process_app, worker
from fusion_celery.testing.app import kafka_broker
from fusion_celery.testing.kafka import Consumer, Producer

ANSWER_TIMEOUT = 15.0



def define_reactors(app: Celery) -> None:
    """Reactors like examples/math, plus a fan-out, a failing one and callers of a failing and a silent topic."""
    arithmetic(app)

    @reactor("math", app=app, deps=lambda m: {
        "one": {"topic": "add", "args": m.data},
        "two": {"topic": "subtract", "args": [2], "arg_in_fn": "cons", "deps": ["one"]}})
    def math(message: Message, results: dict[str, Any]) -> Any:
        return results["two"]

    @reactor("fan", app=app, deps=lambda m: {
        "total": {"topic": "add", "args": m.data},
        "rest": {"topic": "subtract", "args": m.data},
        "both": {"topic": "add", "args": [], "deps": ["total", "rest"]}})
    def fan(message: Message, results: dict[str, Any]) -> Any:
        return results

    @reactor("boom", app=app)
    def boom(message: Message) -> Any:
        raise ValueError(f"no good: {message.data}")

    @reactor("calls-boom", app=app, deps={"bad": {"topic": "boom", "args": [1]}})
    def calls_boom(message: Message, results: dict[str, Any]) -> Any:
        raise AssertionError("never runs: its dependency failed")

    @reactor("calls-silent", app=app, deps={"quiet": {"topic": "silent", "args": [], "timeout": 0.5}})
    def calls_silent(message: Message, results: dict[str, Any]) -> Any:
        raise AssertionError("never runs: its dependency timed out")


@pytest.fixture(scope="module")
def fusion() -> Iterator[Celery]:
    """The app of this module's reactors, served by an in-process worker for the whole module."""
    app = in_process_app("inprocess", fusion_default_timeout=ANSWER_TIMEOUT)
    define_reactors(app)
    for topic in ("silent", "plain"):  # topics nobody serves (the tests play the service on "plain")
        kafka_broker(app).create_topic(topic)
    with worker(app) as w:
        assert app._fusion_waiter is not None and app._fusion_waiter.is_alive()
        yield app
    assert not app._fusion_waiter.is_alive() and w.stopped.is_set()


def call(app: Celery, topic: str, data: Any, timeout: float = ANSWER_TIMEOUT) -> Any:
    """Ask the reactor or service on ``topic`` through a pipeline and return its answer."""
    return Pipeline(topic, app=app).delay(data, timeout=timeout).get(timeout=timeout + 5)


def kafka_client(app: Celery, kind: type, **config: Any) -> Any:
    """A stub Kafka client of ``kind`` on ``app``'s in-memory broker."""
    return kind({"bootstrap.servers": app.conf.fusion_kafka_bootstrap_servers, **config})


def test_a_reactor_answers_through_a_chain_of_dependencies(fusion):
    assert call(fusion, "math", [1, 2, 3]) == 4  # subtract([add([1, 2, 3]), 2])
    assert call(fusion, "math", [10, 20]) == 28


def test_independent_dependencies_run_side_by_side_and_feed_a_third(fusion):
    assert call(fusion, "fan", [1, 2, 3]) == {"total": 6, "rest": -4, "both": 2}


def test_an_error_reply_from_a_dependency_fails_the_caller_with_its_cause(fusion):
    with pytest.raises(DependencyFailed, match="ValueError: no good: 7"):
        call(fusion, "boom", 7)
    with pytest.raises(DependencyFailed) as failed:
        call(fusion, "calls-boom", None)
    assert "'bad'" in str(failed.value) and "ValueError: no good: [1]" in str(failed.value)


def test_a_dependency_that_does_not_reply_times_out(fusion):
    with pytest.raises(DependencyFailed) as failed:
        call(fusion, "calls-silent", None)
    assert "DependencyTimeout" in str(failed.value) and "did not reply within 0.5s" in str(failed.value)
    with pytest.raises(DependencyTimeout):
        call(fusion, "silent", None, timeout=0.5)


def test_the_signals_follow_each_hop(fusion):
    seen: dict[str, list[dict[str, Any]]] = {}

    def keep(name: str) -> Callable[..., None]:
        def receiver(sender: Any = None, **fields: Any) -> None:
            seen.setdefault(name, []).append(fields)
        return receiver

    receivers = {name: keep(name) for name in ("dependency_sent", "wait_completed", "wait_failed",
                                               "wait_timed_out", "reactor_result")}
    for name, receiver in receivers.items():
        getattr(signals, name).connect(receiver, weak=False)
    try:
        assert call(fusion, "math", [1, 2, 3]) == 4
        with pytest.raises(DependencyFailed):
            call(fusion, "boom", 1)
        with pytest.raises(DependencyTimeout):
            call(fusion, "silent", None, timeout=0.5)
        wait_for(lambda: len(seen.get("wait_completed", [])) >= 3, 5, "three completed waits")
    finally:
        for name, receiver in receivers.items():
            getattr(signals, name).disconnect(receiver)
    deps = {(s["topic"], s["dep"]) for s in seen["dependency_sent"]}
    assert {("math", None), ("add", "one"), ("subtract", "two"), ("boom", None), ("silent", None)} <= deps
    completed = {s["dep"]: s["result"] for s in seen["wait_completed"] if s["dep"]}
    assert completed == {"one": 6, "two": 4}
    assert [s["topic"] for s in seen["wait_failed"]] == ["boom"]
    assert [s["topic"] for s in seen["wait_timed_out"]] == ["silent"]
    assert {s["message"]["topic"] for s in seen["reactor_result"]} >= {"add", "subtract", "math", "boom"}


def test_a_spoofed_record_on_a_return_topic_is_dropped_and_the_real_reply_completes_the_call(fusion):
    requests = kafka_client(fusion, Consumer, **{"group.id": "plain-service", "auto.offset.reset": "earliest"})
    producer = kafka_client(fusion, Producer)
    try:
        requests.subscribe(["plain"])
        result = Pipeline("plain", app=fusion).delay({"n": 41}, timeout=ANSWER_TIMEOUT)
        request = wait_for(lambda: next((m for m in requests.consume(1, 0.05) if m.error() is None), None), 5,
                           "the request on topic plain")
        body = json.loads(request.value())
        waiter = fusion._fusion_waiter
        rejected = waiter.rejected
        producer.produce(body["return-topic"], json.dumps("forged"),
                         headers=[("fusion-status", b"ok"), ("fusion-id", b"somebody-else")])
        producer.flush(1)
        wait_for(lambda: waiter.rejected == rejected + 1, 5, "the waiter to drop the forged record")
        assert not result.ready()
        producer.produce(body["return-topic"], json.dumps(body["data"]["n"] + 1),
                         headers=[("fusion-status", b"ok"), ("fusion-id", body["id"].encode())])
        producer.flush(1)
        assert result.get(timeout=ANSWER_TIMEOUT) == 42
    finally:
        requests.close()
        producer.close()


def test_a_malformed_request_goes_to_the_reactors_dead_letter_topic(fusion):
    producer = kafka_client(fusion, Producer)
    producer.produce("add", b"{not json", key=b"k", headers=[("origin", b"test")])
    assert producer.flush(1) == 0
    producer.close()
    dlq = kafka_client(fusion, Consumer, **{"group.id": "dlq-reader"})
    try:
        dlq.assign([TopicPartition("add.dlq", 0, OFFSET_BEGINNING)])
        letter = wait_for(lambda: next((m for m in dlq.consume(1, 0.05) if m.error() is None), None), 5,
                          "a record on add.dlq")
    finally:
        dlq.close()
    headers = dict(letter.headers())
    assert (letter.key(), letter.value()) == (b"k", b"{not json")
    assert headers["fusion-dlq-reason"] == b"not-json" and headers["origin"] == b"test"
    assert headers["fusion-dlq-source"].startswith(b"add[")
    assert call(fusion, "add", [1, 2]) == 3  # the intake goes on
