"""A run's processing function runs once and its caller gets one answer, whatever dies or stalls in between.

Fast tier: the fusion app of :func:`fusion_celery.testing.in_process_app` (fakeredis result
backend, stub Kafka), its steps called in this process.  The same behaviours run against the
real services in ``test_claims.py`` (lease renewal in Redis) and in the fault suite (a worker
killed between ``proc_fn`` and its reply: ``test_faults.py``; brokers restarted under load:
``test_cluster.py``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery.signals import before_task_publish
from confluent_kafka import OFFSET_BEGINNING, TopicPartition
from support.waiting import wait_for

from fusion_celery import claims, keepalive, reactor
from fusion_celery.bodyresult import remembered
from fusion_celery.testing import in_process_app
from fusion_celery.testing.app import kafka_broker
from fusion_celery.testing.kafka import Consumer


@pytest.fixture
def app() -> Iterator[Celery]:
    a = in_process_app(f"once-{uuid.uuid4().hex[:6]}")
    a.calls = []  # type: ignore[attr-defined]

    @reactor("counted", app=a)
    def counted(message):
        a.calls.append(message.id)
        return {"n": message.data}

    yield a
    a.close()


def process_step(app: Celery) -> Any:
    return app.tasks["fusion.reactor.counted.process"]


def request(app: Celery, data: Any) -> tuple[str, dict[str, Any]]:
    """A run id and the message of a request to ``counted`` whose return topic exists."""
    back = f"{app.conf.fusion_return_topic_prefix}t{uuid.uuid4().hex[:8]}"
    kafka_broker(app).create_topic(back)
    rid = f"r-{uuid.uuid4().hex[:6]}"
    return str(uuid.uuid4()), {"topic": "counted", "data": data, "return_topic": back, "id": rid}


def replies(app: Celery, topic: str) -> list[Any]:
    c = Consumer({"bootstrap.servers": app.conf.fusion_kafka_bootstrap_servers, "group.id": "read"})
    try:
        c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        return [json.loads(m.value()) for m in c.consume(100, 0.2) if m.error() is None]
    finally:
        c.close()


@pytest.fixture
def sent() -> Iterator[list[dict[str, Any]]]:
    """The headers of every task message published while the test runs."""
    seen: list[dict[str, Any]] = []

    def record(headers: dict[str, Any] | None = None, **_: Any) -> None:
        seen.append(headers or {})

    before_task_publish.connect(record, weak=False)
    yield seen
    before_task_publish.disconnect(record)


def test_a_lease_outlives_its_ttl_while_its_holder_runs_and_ends_after(app):
    key, token = claims.key_of(f"test-{uuid.uuid4().hex}"), f"lease:0:{uuid.uuid4().hex}"
    client = app.backend.client
    client.set(key, token, ex=1)
    r = keepalive.renewer()
    renewed = r.renewed
    with keepalive.held(app, key, token, 1):
        wait_for(lambda: r.renewed >= renewed + 4, 10, "four renewals (two seconds, twice the lease's ttl)")
        assert client.get(key) == token.encode(), "a held lease ran out while its holder lived"
    wait_for(lambda: client.get(key) is None, 5, "the lease to end once its holder let it go")


def test_a_renewal_never_takes_back_a_lease_another_holder_took(app):
    key = claims.key_of(f"test-{uuid.uuid4().hex}")
    client = app.backend.client
    client.set(key, "lease:0:theirs", ex=30)
    r = keepalive.renewer()
    lost = r.lost
    with keepalive.held(app, key, "lease:0:mine", 1):
        wait_for(lambda: r.lost > lost, 5, "the renewer to find the lease taken over")
    assert client.get(key) == b"lease:0:theirs"


def test_a_step_whose_result_was_stored_replies_with_it_and_runs_nothing_again(app):
    """The holder died after proc_fn stored its result, before its reply: the copy replies with it."""
    run_id, message = request(app, 1)
    remembered(app, run_id, lambda: {"n": "from the first attempt"})
    process_step(app).apply(args=[{}], kwargs={"message": message}, task_id=run_id).get()
    assert app.calls == [], "proc_fn ran again although its result was stored"
    assert replies(app, message["return_topic"]) == [{"n": "from the first attempt"}]


def test_a_new_attempt_after_a_lost_worker_runs_proc_fn_no_more(app):
    """Celery sends a step whose pool process died again as a new attempt (retries + 1), with a claim of
    its own: it finds the result the lost attempt stored and answers with it."""
    run_id, message = request(app, 2)
    remembered(app, run_id, lambda: app.calls.append(message["id"]) or {"n": 2})  # the lost attempt
    process_step(app).apply(args=[{}], kwargs={"message": message}, task_id=run_id, retries=1).get()
    assert app.calls == [message["id"]]
    assert replies(app, message["return_topic"]) == [{"n": 2}]


def test_a_step_that_finds_its_reply_held_comes_back_and_answers_once_the_holder_is_gone(app, sent):
    """A dead attempt holds the reply's lease (it died before Kafka took the reply): the step stores its
    result, gives its claim back and is sent again; once the lease ran out the copy answers, once."""
    run_id, message = request(app, 3)
    app.backend.client.set(claims.key_of(f"reply-{run_id}"), "lease:0:dead", ex=2)
    step = process_step(app)
    outcome = step.apply(args=[{}], kwargs={"message": message}, task_id=run_id)
    assert outcome.state == "IGNORED"
    copies = [h for h in sent if h.get("id") == run_id]
    assert len(copies) == 1 and copies[0].get("eta"), f"no copy of the step was sent for later: {sent}"
    assert not claims.is_claimed(app, f"process-{run_id}-0"), "the step kept its claim"
    assert replies(app, message["return_topic"]) == []
    wait_for(lambda: not claims.is_claimed(app, f"reply-{run_id}"), 5, "the dead holder's lease to run out")
    step.apply(args=[{}], kwargs={"message": message}, task_id=run_id).get()
    step.apply(args=[{}], kwargs={"message": message}, task_id=run_id)  # a late duplicate: done, dropped
    assert app.calls == [message["id"]]
    assert replies(app, message["return_topic"]) == [{"n": 3}]


def test_a_reply_that_kafka_took_is_never_sent_again(app):
    run_id, message = request(app, 4)
    step = process_step(app)
    step.apply(args=[{}], kwargs={"message": message}, task_id=run_id).get()
    step.apply(args=[{}], kwargs={"message": message}, task_id=run_id, retries=1).get()
    assert app.calls == [message["id"]]
    assert replies(app, message["return_topic"]) == [{"n": 4}]


def test_a_reply_whose_sender_died_after_kafka_took_it_is_not_sent_again(app, monkeypatch):
    """The first attempt is killed between Kafka's acknowledgement of its reply and marking the reply's lease
    done: the lease runs out, and the attempt that takes it over finds the reply on the return topic."""
    run_id, message = request(app, 5)
    step = process_step(app)
    finish = claims.finish

    def killed_before_the_mark(app_: Celery, name: str) -> None:
        if name == f"reply-{run_id}":
            raise Died(name)
        finish(app_, name)

    monkeypatch.setattr(claims, "finish", killed_before_the_mark)
    with pytest.raises(Died):
        step.apply(args=[{}], kwargs={"message": message}, task_id=run_id, throw=True)
    monkeypatch.setattr(claims, "finish", finish)
    assert replies(app, message["return_topic"]) == [{"n": 5}], "the first attempt's reply is not on the topic"
    lease = claims.key_of(f"reply-{run_id}")
    assert app.backend.client.get(lease).startswith(b"lease:"), "the reply's lease was not left held"
    app.backend.client.expire(lease, 1)  # the dead holder's keepalive stopped with it: the lease runs out
    wait_for(lambda: not claims.is_claimed(app, f"reply-{run_id}"), 5, "the dead holder's lease to run out")
    step.apply(args=[{}], kwargs={"message": message}, task_id=run_id, retries=1).get()
    assert app.calls == [message["id"]]
    assert replies(app, message["return_topic"]) == [{"n": 5}]
    assert app.backend.client.get(lease) == b"done"


class Died(BaseException):
    """The end of an attempt's process, as a ``kill -9`` would end it (nothing after it runs)."""


def test_a_request_sent_twice_is_served_once(app):
    """A fusion dispatch whose worker died after Kafka took its request sends it again after its lease: the
    two records carry the same return topic and id, and the reactor answers once, running proc_fn once (on
    the real stack: the kill -9 sequence of tests/test_faults.py asserts every dependency ran once)."""
    from fusion_celery.testing import worker
    from fusion_celery.testing.kafka import Producer
    run_id, message = request(app, 5)
    body = json.dumps({"data": 5, "return-topic": message["return_topic"], "id": message["id"]})
    with worker(app):
        producer = Producer({"bootstrap.servers": app.conf.fusion_kafka_bootstrap_servers})
        producer.produce("counted", body)
        producer.produce("counted", body)
        producer.flush(5)
        producer.close()
        client = app.backend.client

        def both_runs_done() -> bool:
            keys = list(client.scan_iter("fusion-claim-run-*"))
            return len(keys) == 2 and all(client.get(k) == b"done" for k in keys)

        wait_for(both_runs_done, 15, "both records' runs to end")
    assert app.calls == [message["id"]]
    assert replies(app, message["return_topic"]) == [{"n": 5}]


def test_a_step_that_fails_because_redis_or_the_broker_was_away_answers_nothing_and_runs_again(app):
    """Its claim is given back and it ends without a state, so the run's intake sends it again (a stalled run
    is compiled again: test_faults.py stops Redis under load and asserts no error answer)."""
    from kombu.exceptions import OperationalError
    run_id, message = request(app, 6)
    failures = [OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")]

    def flaky(message, results):
        if failures:
            raise failures.pop()
        return {"n": message.data}

    step = process_step(app)
    step.proc_fn = flaky
    outcome = step.apply(args=[{}], kwargs={"message": message}, task_id=run_id)
    assert outcome.state == "IGNORED"
    assert not claims.is_claimed(app, f"process-{run_id}-0"), "the step kept its claim"
    assert replies(app, message["return_topic"]) == []
    step.apply(args=[{}], kwargs={"message": message}, task_id=run_id).get()
    assert replies(app, message["return_topic"]) == [{"n": 6}]
