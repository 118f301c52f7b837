"""Reactors over the wire, against the real stack and a real worker."""

import json
import uuid

import pytest
from celery.result import AsyncResult
from support.kafka import topic_name
from support.stack import RUN_ID
from support.waiting import wait_for

from fusion_celery import run_id

pytestmark = pytest.mark.integration


def rt(kit):
    return kit.topic(f"fusion.rt.{uuid.uuid4().hex}")


def reply_of(kit, return_topic, timeout=60):
    [msg] = kit.read(return_topic, 1, timeout=timeout)
    return json.loads(msg.value()), dict(msg.headers() or [])


@pytest.mark.broker
def test_plain_kafka_client_with_return_topic(kit, services_worker):
    back = rt(kit)
    kit.send(topic_name("add"), {"data": [1, 2, 3], "return-topic": back, "id": "c-1"})
    body, headers = reply_of(kit, back)
    assert body == 6
    assert headers["fusion-status"] == b"ok" and headers["fusion-id"] == b"c-1"


def test_plain_kafka_client_with_response_topic(kit, services_worker):
    back = rt(kit)
    kit.send(topic_name("subtract"), {"data": [10, 4], "response-topic": back})
    assert reply_of(kit, back)[0] == 6


def test_message_without_return_topic_lands_in_result_backend(kit, app, services_worker):
    rec = kit.send(topic_name("one-arg"), {"data": {"x": 1}}, key=b"the-key")
    result = AsyncResult(run_id(rec.topic(), rec.partition(), rec.offset(), rec.timestamp()[1]), app=app)
    value = result.get(timeout=60)
    assert value == {"topic": topic_name("one-arg"), "key": "the-key", "partition": rec.partition(),
                     "offset": rec.offset(), "data": {"x": 1}, "id": None}


def test_failing_reactor_sends_error_reply_and_stores_error(kit, app, services_worker):
    back = rt(kit)
    rec = kit.send(topic_name("boom"), {"data": 42, "return-topic": back, "id": "e-1"})
    body, headers = reply_of(kit, back)
    assert headers["fusion-status"] == b"error"
    assert body == {"error": {"type": "ValueError", "message": "boom: 42"}}
    result = AsyncResult(run_id(rec.topic(), rec.partition(), rec.offset(), rec.timestamp()[1]), app=app)
    wait_for(lambda: result.state == "FAILURE", 30, "the failure in the result backend")
    assert "boom: 42" in str(result.result)


def test_malformed_messages_are_dead_lettered_and_consumption_goes_on(kit, services_worker):
    topic = topic_name("add")
    bad = [
        (b"not json", "not-json"),
        (b"[1, 2]", "not-object"),
        (json.dumps({"data": "x" * 200_000}).encode(), "too-large"),
        (json.dumps({"data": [1], "return-topic": "payments.ledger"}).encode(), "return-topic-not-allowed"),
        (b"\xff\xfe\x00", "not-utf8"),
    ]
    for value, _ in bad:
        kit.producer.produce(topic, value)
    kit.producer.flush(30)
    back = rt(kit)
    kit.send(topic, {"data": [5, 5], "return-topic": back})
    assert reply_of(kit, back)[0] == 10  # a good message after the bad ones is still served
    dlq = kit.read(f"{topic}.dlq", len(bad), timeout=60)
    reasons = sorted(dict(m.headers())["fusion-dlq-reason"].decode() for m in dlq)
    assert reasons == sorted(r for _, r in bad)
    for m in dlq:
        h = dict(m.headers())
        assert h["fusion-dlq-error"] and h["fusion-dlq-source"].decode().startswith(topic)


def test_reactor_result_hook_and_class_form(kit, services_worker):
    back = rt(kit)
    kit.send(topic_name("generic"), {"data": {"echo": "hi"}, "return-topic": back})
    assert reply_of(kit, back)[0] == {"results": {}, "echo": "hi"}


@pytest.mark.broker
def test_sigterm_mid_stream_loses_nothing(kit, worker_factory, redis_client):
    """A worker stopped while it works through a stream hands back what it did not do: a second worker,
    alone in the group after it, processes every record the first did not."""
    from support.workers import isolated_env
    env = isolated_env("kafka", db=14)
    run = env["FUSION_TEST_RUN"]
    env = {**env, "FUSION_TEST_QUEUE": f"celery.{run}"}
    w = worker_factory(name="stream", concurrency=2, env=env)
    topic = f"{run}.record"
    n = 300
    key = f"record:{run}"
    for i in range(n):
        kit.producer.produce(topic, json.dumps({"data": i}))
    kit.producer.flush(30)
    wait_for(lambda: redis_client.scard(key) >= 20, 60, "the worker to be mid-stream")
    assert w.stop() == 0
    done_before = redis_client.scard(key)
    assert done_before < n, f"all {n} records were processed before SIGTERM: the stop was not mid-stream"
    worker_factory(name="stream2", concurrency=2, env=env)
    wait_for(lambda: redis_client.scard(key) == n, 120, f"all {n} messages processed")
    assert {int(x) for x in redis_client.smembers(key)} == set(range(n))


def test_result_hook_sees_every_result(kit, services_worker, redis_client):
    rec = kit.send(topic_name("add"), {"data": [2, 2]})
    rid = run_id(rec.topic(), rec.partition(), rec.offset(), rec.timestamp()[1])
    raw = wait_for(lambda: redis_client.hget(f"seen:{RUN_ID}", rid), 60, "the hook to see the result")
    assert json.loads(raw) == {"topic": topic_name("add"), "result": 4, "error": None}
    rec = kit.send(topic_name("boom"), {"data": 1})
    rid = run_id(rec.topic(), rec.partition(), rec.offset(), rec.timestamp()[1])
    raw = wait_for(lambda: redis_client.hget(f"seen:{RUN_ID}", rid), 60, "the hook to see the error")
    assert json.loads(raw)["error"] == "boom: 1"


def test_backpressure_bounds_what_reaches_the_celery_broker(kit, worker_factory, redis_client):
    import redis as redis_lib
    from support.workers import isolated_env
    env = {**isolated_env(), "FUSION_MAX_IN_FLIGHT": "4"}
    topic = f"{env['FUSION_TEST_RUN']}.slow"
    broker = redis_lib.Redis.from_url(env["CELERY_BROKER_URL"])
    broker.delete("celery")
    w = worker_factory(name="bp", env=env, concurrency=1)
    n = 30
    records = [kit.send(topic, {"data": 0.05}) for _ in range(n)]
    results = redis_lib.Redis.from_url(env["CELERY_RESULT_BACKEND"])
    keys = [f"celery-task-meta-{run_id(r.topic(), r.partition(), r.offset(), r.timestamp()[1])}" for r in records]
    peak = 0

    def all_done():
        nonlocal peak
        peak = max(peak, broker.llen("celery"))
        return results.exists(*keys) == n

    wait_for(all_done, 180, f"{n} slow runs to finish")
    assert peak <= 4, f"{peak} tasks waited in the Celery queue with fusion_max_in_flight=4"
    assert "in flight, pausing" in w.log() and "resuming" in w.log()
