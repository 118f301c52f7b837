"""Return topics: their names, the reaper's decision, and the per-process pool (fusion_return_topic_pool)."""

from __future__ import annotations

import json
import re
import time
import uuid

import pytest
from support.kafka import return_topic_name, topic_name
from support.waiting import wait_for
from support.workers import isolated_env

from fusion_celery import returntopics
from fusion_celery.answer import NEW_TOPIC_PATIENCE, OTHER_TOPIC_PATIENCE, _patience
from fusion_celery.application import create_app
from fusion_celery.clients import clients, close_clients
from fusion_celery.protocol import valid_topic_name
from fusion_celery.reaper import ReturnTopic, is_orphan, reap
from fusion_celery.returntopics import ReturnTopicPool, name_times, new_return_topic, reapable_from, take

PREFIX = "fusion.rt."
T0 = 1_700_000_000_000  # a creation time, epoch ms
MIN = 60_000


# -- names -------------------------------------------------------------------------------------------------
@pytest.fixture
def plain_app():
    app = create_app("names-test", broker="memory://", backend="cache+memory://")
    yield app
    app.close()


def test_a_name_carries_the_creation_time_the_deadline_and_128_random_bits(plain_app):
    name = new_return_topic(plain_app, T0, T0 + 3_600_000)
    m = re.fullmatch(r"fusion\.rt\.([0-9]+)\.([0-9]+)\.([0-9a-f]+)", name)
    assert m, name
    assert (int(m[1]), int(m[2])) == (T0, T0 + 3_600_000) == name_times(name, PREFIX)
    assert len(m[3]) == 32, "16 random bytes in hex"
    assert valid_topic_name(name)
    randoms = {name_of.rsplit(".", 1)[1] for name_of in (new_return_topic(plain_app, T0, T0) for _ in range(1000))}
    assert len(randoms) == 1000, "the same times never give the same name"


def test_a_name_without_deadline_or_with_one_before_its_creation_carries_its_creation_time_twice(plain_app):
    assert name_times(new_return_topic(plain_app, T0), PREFIX) == (T0, T0)  # what the pool makes
    assert name_times(new_return_topic(plain_app, T0, T0 - 5), PREFIX) == (T0, T0)
    before = int(time.time() * 1000)
    created, deadline = name_times(new_return_topic(plain_app), PREFIX)
    assert before <= created == deadline <= int(time.time() * 1000)


@pytest.mark.parametrize("name,times", [
    # what fusion-celery makes: <created>.<deadline>.<random>
    (f"fusion.rt.{T0}.{T0 + 3_600_000}.0123456789abcdef0123456789abcdef", (T0, T0 + 3_600_000)),
    (f"fusion.rt.{T0}.{T0 + 5}.x.y", (T0, T0 + 5)),
    (f"fusion.rt.{T0}.{T0}.a", (T0, T0)),
    # two-part names (older fusion-celery, other callers): the creation time only
    (f"fusion.rt.{T0}.3f2a9c0d3f2a9c0d3f2a9c0d3f2a9c0d", (T0, None)),
    (f"fusion.rt.{T0}.12345", (T0, None)),  # a unique part of digits is no deadline
    (f"fusion.rt.{T0}.team.a", (T0, None)),
    (f"fusion.rt.{T0}.-5.a", (T0, None)),
    (f"fusion.rt.{T0}.", (T0, None)),
    (f"fusion.rt.{T0}", (T0, None)),
    # no time
    ("fusion.rt.3f2a9c0d3f2a9c0d3f2a9c0d3f2a9c0d", (None, None)),
    ("fusion.rt.cli.1700000000000.x", (None, None)),
    ("fusion.rt.pool1a2b3c.1700000000000.1700000000000.x", (None, None)),  # another prefix under this one
    ("fusion.rt.", (None, None)),
    ("fusion.rt..1700000000000.x", (None, None)),
    ("fusion.rt.-1700000000000.x", (None, None)),
    ("fusion.rt.\uff11\uff17\uff10\uff10.x", (None, None)),  # full-width digits: isdigit() says yes, int() too
    ("fusion.rt.\u00b9\u00b2.x", (None, None)),  # superscripts: isdigit() says yes, int() raises
    # not a return topic of this prefix
    (f"other.{T0}.{T0}.x", (None, None)),
    (f"fusion.rtx{T0}.{T0}.x", (None, None)),
])
def test_name_times(name, times):
    assert name_times(name, PREFIX) == times


def test_patience_reads_the_creation_time_of_every_name_form(plain_app):
    now = int(time.time() * 1000)
    assert _patience(plain_app, new_return_topic(plain_app, now, now + 3_600_000)) == NEW_TOPIC_PATIENCE
    assert _patience(plain_app, f"fusion.rt.{now}.{uuid.uuid4().hex}") == NEW_TOPIC_PATIENCE
    assert _patience(plain_app, new_return_topic(plain_app, now - 10 * MIN, now + MIN)) == OTHER_TOPIC_PATIENCE
    assert _patience(plain_app, f"fusion.rt.{uuid.uuid4().hex}") == OTHER_TOPIC_PATIENCE
    assert _patience(plain_app, "replies.team-a") == OTHER_TOPIC_PATIENCE


# -- the reaper's decision ---------------------------------------------------------------------------------
GRACE_S = 300.0
GRACE = 300_000


def orphan(name: str, wait_id: str | None = None) -> ReturnTopic:
    created, deadline = name_times(name, PREFIX)
    return ReturnTopic(name, created, wait_id, None, None, deadline)


@pytest.mark.parametrize("name,now,reaped", [
    # three-part: the later of creation + grace and deadline + grace
    (f"fusion.rt.{T0}.{T0 + 60 * MIN}.r", T0 + GRACE, False),  # a 1-hour wait, past the grace: kept
    (f"fusion.rt.{T0}.{T0 + 60 * MIN}.r", T0 + 60 * MIN, False),  # at its deadline
    (f"fusion.rt.{T0}.{T0 + 60 * MIN}.r", T0 + 60 * MIN + GRACE - 1, False),
    (f"fusion.rt.{T0}.{T0 + 60 * MIN}.r", T0 + 60 * MIN + GRACE, True),
    (f"fusion.rt.{T0}.{T0 + MIN}.r", T0 + GRACE - 1, False),  # a deadline inside the grace: the grace counts
    (f"fusion.rt.{T0}.{T0 + MIN}.r", T0 + MIN + GRACE - 1, False),
    (f"fusion.rt.{T0}.{T0 + MIN}.r", T0 + MIN + GRACE, True),
    (f"fusion.rt.{T0}.{T0}.r", T0 + GRACE - 1, False),  # a pooled topic (deadline = creation)
    (f"fusion.rt.{T0}.{T0}.r", T0 + GRACE, True),
    (f"fusion.rt.{T0}.5.r", T0 + GRACE, True),  # a deadline before the creation: the creation counts
    # two-part: creation + grace
    (f"fusion.rt.{T0}.abc", T0 + GRACE - 1, False),
    (f"fusion.rt.{T0}.abc", T0 + GRACE, True),
    (f"fusion.rt.{T0}.{T0 + 60 * MIN}", T0 + GRACE, True),  # no third field: the digits are no deadline
    # no time: never
    ("fusion.rt.abc", T0 + 10**12, False),
    (f"fusion.rt.x{T0}.{T0}.r", T0 + 10**12, False),
])
def test_the_reaper_deletes_an_unregistered_topic_once_past_its_creation_and_its_deadline(name, now, reaped):
    assert is_orphan(orphan(name), now, GRACE_S) is reaped


def test_the_reaper_never_deletes_a_topic_a_pending_wait_names():
    for name in (f"fusion.rt.{T0}.{T0}.r", f"fusion.rt.{T0}.abc", "fusion.rt.abc"):
        assert not is_orphan(orphan(name, wait_id="w-1"), T0 + 10**12, 0.0), name


def test_a_grace_of_zero_still_waits_for_the_deadline():
    name = f"fusion.rt.{T0}.{T0 + MIN}.r"
    assert not is_orphan(orphan(name), T0 + MIN - 1, 0.0)
    assert is_orphan(orphan(name), T0 + MIN, 0.0)


def test_a_call_that_waits_the_default_hour_keeps_its_topic_past_the_grace(plain_app):
    """The defect: a caller without a registered wait (celery fusion call, another language) lost its topic
    after fusion_reaper_grace (300 s) although it waits fusion_default_timeout (3,600 s)."""
    created = T0
    deadline = created + int(float(plain_app.conf.fusion_default_timeout) * 1000)
    topic = orphan(new_return_topic(plain_app, created, deadline))
    grace = float(plain_app.conf.fusion_reaper_grace)
    assert grace * 1000 < deadline - created
    assert not is_orphan(topic, created + int(grace * 1000) + 1, grace)
    assert not is_orphan(topic, deadline, grace)
    assert is_orphan(topic, deadline + int(grace * 1000), grace)
    assert reapable_from(topic.created_ms, topic.deadline_ms, int(grace * 1000)) == deadline + int(grace * 1000)


# -- the pool ----------------------------------------------------------------------------------------------
@pytest.fixture
def pooled(stack):
    """An app with a pool of 4 return topics that carry a prefix of their own (so this test sees only them)."""
    prefix = f"fusion.rt.pool{uuid.uuid4().hex[:6]}."
    app = create_app("pool-test")
    app.conf.update(fusion_kafka_bootstrap_servers=stack["kafka"], fusion_return_topic_pool=4,
                    fusion_return_topic_prefix=prefix)
    yield app, prefix
    close_clients(app)
    app.close()


@pytest.mark.integration
def test_the_pool_fills_in_the_background_and_hands_out_existing_topics(kit, pooled):
    app, prefix = pooled
    pool = returntopics.pool(app)
    assert isinstance(pool, ReturnTopicPool)
    assert returntopics.pool(app) is pool, "one pool per process and app"
    assert pool.take() is None, "an empty pool hands out nothing (the caller creates its topic)"
    wait_for(lambda: pool.ready() == 4, 60, "the pool to fill up to its size")
    assert kit.topics(prefix) >= {n for n, _ in pool._ready}, "every ready topic exists in Kafka"
    taken = take(app, registered=True)
    created, deadline = name_times(taken, prefix)
    assert created is not None and deadline == created, f"a pooled name carries no deadline of its own: {taken}"
    assert taken in kit.topics(prefix)
    assert pool.counts["taken"] == 1
    for _ in range(3):  # down to empty: a refill is asked for at half
        take(app, registered=True)
    wait_for(lambda: pool.ready() == 4, 60, "the pool to refill")


@pytest.mark.integration
def test_a_caller_without_a_registered_wait_gets_a_topic_named_with_its_deadline_not_a_pooled_one(kit, pooled):
    app, prefix = pooled
    pool = returntopics.pool(app)
    pool.take()
    wait_for(lambda: pool.ready() == 4, 60, "the pool to fill up")
    deadline = int(time.time() * 1000) + 3_600_000
    mine = take(app, deadline)
    try:
        assert name_times(mine, prefix)[1] == deadline, mine
        assert mine in kit.topics(prefix)
        assert pool.counts["taken"] == 0 and pool.ready() == 4, "the pool was not touched"
    finally:
        clients(app).delete_topics([mine], wait=True)


@pytest.mark.integration
def test_the_pool_never_hands_out_a_topic_the_reaper_may_take(kit, pooled):
    app, prefix = pooled
    pool = returntopics.pool(app)
    pool.take()
    wait_for(lambda: pool.ready() == 4, 60, "the pool to fill up")
    stale = {n for n, _ in pool._ready}
    pool.max_age_ms = 0  # every ready topic is now "too old"
    assert pool.take() is None
    assert pool.counts["expired"] == 4
    wait_for(lambda: not stale & kit.topics(prefix), 60, "the stale topics to be deleted")


@pytest.mark.integration
def test_closing_deletes_the_unused_topics(kit, pooled):
    app, prefix = pooled
    pool = returntopics.pool(app)
    pool.take()
    wait_for(lambda: pool.ready() == 4, 60, "the pool to fill up")
    kept = take(app, registered=True)  # taken: the caller's, not the pool's to delete
    close_clients(app)
    wait_for(lambda: kit.topics(prefix) == {kept}, 60, "only the taken topic to be left")
    kit.admin.delete_topics([kept])


@pytest.mark.integration
def test_a_worker_with_a_pool_answers_and_leaves_no_topic_after_shutdown(kit, worker_factory):
    prefix = f"fusion.rt.wpool{uuid.uuid4().hex[:6]}."
    env = {**isolated_env(), "FUSION_REPLY_CHANNEL": "ephemeral", "FUSION_RETURN_TOPIC_POOL": "3",
           "FUSION_RETURN_TOPIC_PREFIX": prefix,
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


@pytest.mark.integration
def test_deleting_topics_named_twice_in_one_call_is_safe(kit, stack):
    """confluent-kafka 2.16 segfaults on a DeleteTopics result that names a topic twice; fusion's
    Clients send each name once (run in a process of its own, so a crash fails this test only)."""
    import subprocess
    import sys

    from support.stack import ROOT
    names = [kit.topic() for _ in range(2)]
    code = ("import sys; from fusion_celery.application import create_app; from fusion_celery.clients import Clients\n"
            "app = create_app('dup'); app.conf.fusion_kafka_bootstrap_servers = sys.argv[1]\n"
            "c = Clients(app); c.delete_topics([sys.argv[2], sys.argv[3], sys.argv[3]], wait=True); c.close()\n")
    out = subprocess.run([sys.executable, "-c", code, stack["kafka"], *names], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-2000:]}"
    wait_for(lambda: not set(names) & kit.topics(), 60, "both topics to be deleted")


# -- the deadline in the names fusion makes, and the reaper against Kafka ----------------------------------
@pytest.mark.integration
def test_a_dispatch_names_its_return_topic_with_the_waits_deadline(kit, services_worker, service):
    dep_topic = kit.topic()
    dep = service(dep_topic, lambda data: "ok")
    back = kit.topic(return_topic_name())
    dep_entry = {"topic": dep_topic, "timeout": 120, "reply": "ephemeral"}  # a name with the wait's deadline
    kit.send(topic_name("generic"), {"data": {"deps": {"d": dep_entry}}, "return-topic": back})
    [request] = wait_for(lambda: dep.received, 60, "the dependency's request")
    created, deadline = name_times(request["return-topic"], PREFIX)
    assert deadline == request["deadline"], request
    assert abs(deadline - created - 120_000) < 5_000, (created, deadline)
    [reply] = kit.read(back, 1, timeout=60)
    assert json.loads(reply.value()) == {"results": {"d": "ok"}, "echo": None}


@pytest.mark.integration
def test_reap_against_kafka_follows_the_names(kit, stack):
    """reap() deletes the past-due unregistered topics of its prefix and leaves the others."""
    from fusion_celery.registry import Wait
    from fusion_celery.runtime import registry

    tag = uuid.uuid4().hex[:6]
    prefix = f"fusion.rt.reap{tag}."
    app = create_app("reap-test")
    app.conf.update(fusion_kafka_bootstrap_servers=stack["kafka"], fusion_return_topic_prefix=prefix,
                    fusion_registry_url=f"memory://reap{tag}")
    now = int(time.time() * 1000)
    old = now - 20_000
    due = {kit.topic(f"{prefix}{old}.{old}.{uuid.uuid4().hex}"),  # pooled (deadline = creation), 20 s old
           kit.topic(f"{prefix}{old}.{now - 15_000}.{uuid.uuid4().hex}"),  # deadline 15 s ago
           kit.topic(f"{prefix}{old}.{uuid.uuid4().hex}")}  # two-part, 20 s old
    registered = kit.topic(f"{prefix}{old}.{old}.{uuid.uuid4().hex}")
    registry(app).register(Wait(id="w-reap", return_topic=registered, topic="t", deadline=old, request={}))
    kept = {registered,
            kit.topic(f"{prefix}{old}.{now + 60_000}.{uuid.uuid4().hex}"),  # its caller still waits
            kit.topic(f"{prefix}{old}.{now - 5_000}.{uuid.uuid4().hex}"),  # deadline passed, not its grace
            kit.topic(f"{prefix}{now}.{uuid.uuid4().hex}"),  # two-part, young
            kit.topic(f"{prefix}no-time-{uuid.uuid4().hex}")}
    try:
        assert sorted(reap(app, grace=10)) == sorted(due)
        wait_for(lambda: kit.topics(prefix) == kept, 60, "only the topics not yet due to be left")
    finally:
        close_clients(app)
        app.close()
