"""The per-process pool of return topics created ahead of time (fusion_return_topic_pool)."""

from __future__ import annotations

import json
import uuid

import pytest
from conftest import isolated_env, return_topic_name, wait_for

from fusion_celery.application import create_app
from fusion_celery.kafka import Clients
from fusion_celery.returntopics import ReturnTopicPool

pytestmark = pytest.mark.integration


@pytest.fixture
def pooled(stack):
    """Clients of an app whose return topics carry a prefix of their own (so this test sees only them)."""
    prefix = f"fusion.rt.pool{uuid.uuid4().hex[:6]}."
    app = create_app("pool-test")
    app.conf.update(fusion_kafka_bootstrap_servers=stack["kafka"], fusion_return_topic_pool=4,
                    fusion_return_topic_prefix=prefix)
    c = Clients(app)
    yield c, prefix
    c.close()
    app.close()


def test_the_pool_fills_in_the_background_and_hands_out_existing_topics(kit, pooled):
    c, prefix = pooled
    pool = c.pool
    assert isinstance(pool, ReturnTopicPool)
    assert pool.take() is None, "an empty pool hands out nothing (the caller creates its topic)"
    wait_for(lambda: pool.ready() == 4, 60, "the pool to fill up to its size")
    assert kit.topics(prefix) >= {n for n, _ in pool._ready}, "every ready topic exists in Kafka"
    taken = c.return_topic()
    assert taken.startswith(prefix) and taken[len(prefix):].split(".")[0].isdigit(), taken
    assert taken in kit.topics(prefix)
    assert pool.counts["taken"] == 1
    for _ in range(3):  # down to empty: a refill is asked for at half
        c.return_topic()
    wait_for(lambda: pool.ready() == 4, 60, "the pool to refill")


def test_the_pool_never_hands_out_a_topic_the_reaper_may_take(kit, pooled):
    c, prefix = pooled
    pool = c.pool
    pool.take()
    wait_for(lambda: pool.ready() == 4, 60, "the pool to fill up")
    stale = {n for n, _ in pool._ready}
    pool.max_age_ms = 0  # every ready topic is now "too old"
    assert pool.take() is None
    assert pool.counts["expired"] == 4
    wait_for(lambda: not stale & kit.topics(prefix), 60, "the stale topics to be deleted")


def test_closing_deletes_the_unused_topics(kit, pooled):
    c, prefix = pooled
    c.pool.take()
    wait_for(lambda: c.pool.ready() == 4, 60, "the pool to fill up")
    kept = c.return_topic()  # taken: the caller's, not the pool's to delete
    c.close()
    wait_for(lambda: kit.topics(prefix) == {kept}, 60, "only the taken topic to be left")
    kit.admin.delete_topics([kept])


def test_a_worker_with_a_pool_answers_and_leaves_no_topic_after_shutdown(kit, worker_factory):
    prefix = f"fusion.rt.wpool{uuid.uuid4().hex[:6]}."
    env = {**isolated_env(), "FUSION_RETURN_TOPIC_POOL": "3", "FUSION_RETURN_TOPIC_PREFIX": prefix,
           "FUSION_REPLY_ALLOWLIST": r"fusion\.rt\..*"}  # the callers below use the default prefix
    w = worker_factory(name="pool", env=env, concurrency=1)
    math = f"{env['FUSION_TEST_RUN']}.math"
    for i in range(6):
        back = kit.topic(return_topic_name())
        kit.send(math, {"data": [i, 2, 3], "return-topic": back})
        [msg] = kit.read(back, 1, timeout=90)
        assert json.loads(msg.value()) == i + 2 + 3 - 2, (i, msg.value())  # add, then subtract 2
        kit.admin.delete_topics([back])
    assert kit.topics(prefix), "the worker's pool holds ready topics between calls"
    assert w.stop() == 0
    log = w.log()
    assert "return-topic pool: closed" in log and "'taken': 0," not in log, log[-3000:]
    wait_for(lambda: not kit.topics(prefix), 60, "no return topic of the worker to be left")


def test_deleting_topics_named_twice_in_one_call_is_safe(kit, stack):
    """confluent-kafka 2.16 segfaults on a DeleteTopics result that names a topic twice; fusion's
    Clients send each name once (run in a process of its own, so a crash fails this test only)."""
    import subprocess
    import sys

    from conftest import ROOT
    names = [kit.topic() for _ in range(2)]
    code = ("import sys; from fusion_celery.application import create_app; from fusion_celery.kafka import Clients\n"
            "app = create_app('dup'); app.conf.fusion_kafka_bootstrap_servers = sys.argv[1]\n"
            "c = Clients(app); c.delete_topics([sys.argv[2], sys.argv[3], sys.argv[3]], wait=True); c.close()\n")
    out = subprocess.run([sys.executable, "-c", code, stack["kafka"], *names], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-2000:]}"
    wait_for(lambda: not set(names) & kit.topics(), 60, "both topics to be deleted")
