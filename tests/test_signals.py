"""The fusion signals, sent by real workers: a dependency sent, a wait completed, failed or timed out,
a record dead-lettered."""

from __future__ import annotations

import json

import pytest
from support.kafka import topic_name
from support.stack import RUN_ID
from support.waiting import wait_for

from fusion_celery import DependencyFailed, DependencyTimeout, Pipeline, run_id

pytestmark = pytest.mark.integration


def _seen(redis_client, signal: str) -> dict[str, dict]:
    return {k.decode(): json.loads(v) for k, v in redis_client.hgetall(f"signal:{RUN_ID}:{signal}").items()}


def test_a_run_with_deps_sends_each_dependency_and_completes_each_wait(kit, services_worker, redis_client):
    rec = kit.send(topic_name("math"), {"data": [1, 2, 3]})
    run = run_id(rec.topic(), rec.partition(), rec.offset(), rec.timestamp()[1])

    def both(signal):
        found = {v["dep"]: (k, v) for k, v in _seen(redis_client, signal).items() if v["run_id"] == run}
        return found if set(found) == {"one", "two"} else None

    sent = wait_for(lambda: both("dependency_sent"), 60, "dependency_sent for both deps")
    done = wait_for(lambda: both("wait_completed"), 60, "wait_completed for both deps")
    assert sent["one"][1]["topic"] == topic_name("add") and sent["two"][1]["topic"] == topic_name("subtract")
    assert all(v["return_topic"].startswith("fusion.rt.") for _, v in sent.values())
    assert {dep: task_id for dep, (task_id, _) in sent.items()} == {dep: task_id for dep, (task_id, _) in done.items()}
    assert done["one"][1]["result"] == 6 and done["two"][1]["result"] == 4


def test_a_failed_wait_and_a_timed_out_wait_are_told_apart(kit, services_worker, redis_client):
    failing = Pipeline(topic_name("boom")).delay(7, timeout=60)
    silent = kit.topic()
    timing_out = Pipeline(silent).delay(1, timeout=2)
    with pytest.raises(DependencyFailed):
        failing.get(timeout=60)
    with pytest.raises(DependencyTimeout):
        timing_out.get(timeout=60)
    failed = wait_for(lambda: _seen(redis_client, "wait_failed").get(failing.id), 30, "wait_failed")
    timed_out = wait_for(lambda: _seen(redis_client, "wait_timed_out").get(timing_out.id), 30, "wait_timed_out")
    assert failed["topic"] == topic_name("boom") and "boom: 7" in failed["exception"]
    assert timed_out["topic"] == silent and "did not reply within 2s" in timed_out["exception"]
    assert timing_out.id not in _seen(redis_client, "wait_failed")


def test_a_dead_lettered_record_is_signalled(kit, services_worker, redis_client):
    rec = kit.send(topic_name("add"), b"not json")
    key = f"{rec.topic()}[{rec.partition()}]@{rec.offset()}"
    seen = wait_for(lambda: _seen(redis_client, "dead_lettered").get(key), 60, "dead_lettered")
    assert seen == {"dlq": f"{topic_name('add')}.dlq", "reason": "not-json"}
