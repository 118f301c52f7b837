"""Deps-maps through chords of dispatching subtasks and the durable waiter (real stack, real workers).

Every test runs once per registry backend: ``deployment`` is a session worker whose waits live in
Kafka or in ZooKeeper, and ``deployment.topic(name)`` the topic of one of its test reactors.
"""

import json
import time
import uuid

import pytest
from support.kafka import return_topic_name, topic_name
from support.waiting import wait_for
from support.workers import REGISTRIES

pytestmark = pytest.mark.integration


def rt(kit):
    return kit.topic(return_topic_name())


def call(kit, topic, data, timeout=90, **extra):
    back = rt(kit)
    kit.send(topic, {"data": data, "return-topic": back, **extra})
    [msg] = kit.read(back, 1, timeout=timeout)
    return json.loads(msg.value()), dict(msg.headers() or [])


def return_topics(kit, redis_client=None):
    """The return topics on the broker; with ``redis_client``, less the topics of lease pools that have not
    ended by that Redis (a worker keeps its pool while it runs; other apps' pools are theirs)."""
    found = kit.topics("fusion.rt.")
    if redis_client is None:
        return found
    from fusion_celery.channels.leased import pool_of_topic
    pools = {t: pool_of_topic(t, "fusion.rt.") for t in found}
    ended = {p for p in set(pools.values()) - {None}
             if not redis_client.exists(f"fusion-lease-{p}") and redis_client.exists(f"fusion-lease-{p}-owner")}
    return {t for t in found if pools[t] is None or pools[t] in ended}


@pytest.mark.broker
def test_seed_math_example_returns_4(kit, deployment):
    body, headers = call(kit, deployment.topic("math"), [1, 2, 3], id="m-1")
    assert body == 4 and headers["fusion-status"] == b"ok"


@pytest.mark.broker
def test_diamond_injects_right_args(kit, deployment, service):
    t = {n: kit.topic() for n in "abcd"}
    def echo(name):
        return lambda data: {"svc": name, "got": data}

    svcs = {n: service(t[n], echo(n)) for n in "abcd"}
    deps = {"a": {"topic": t["a"], "args": [1]},
            "b": {"topic": t["b"], "args": ["b0"], "deps": ["a"]},
            "c": {"topic": t["c"], "args": ["c0"], "arg_in_fn": "cons", "deps": ["a"]},
            "d": {"topic": t["d"], "args": [], "deps": ["c", "b"]}}
    body, _ = call(kit, deployment.topic("generic"), {"deps": deps})
    ra = {"svc": "a", "got": [1]}
    rb = {"svc": "b", "got": ["b0", ra]}
    rc = {"svc": "c", "got": [ra, "c0"]}
    assert body["results"] == {"a": ra, "b": rb, "c": rc, "d": {"svc": "d", "got": [rc, rb]}}
    assert [len(s.received) for s in svcs.values()] == [1, 1, 1, 1]


def test_independent_deps_overlap_in_time(kit, deployment, service):
    spans = {}

    def slow(name):
        def fn(data):
            start = time.time()
            time.sleep(1.5)
            spans[name] = (start, time.time())
            return name
        return fn

    ta, tb = kit.topic(), kit.topic()
    service(ta, slow("a"))
    service(tb, slow("b"))
    body, _ = call(kit, deployment.topic("generic"), {"deps": {"a": {"topic": ta}, "b": {"topic": tb}}})
    assert body["results"] == {"a": "a", "b": "b"}
    (a0, a1), (b0, b1) = spans["a"], spans["b"]
    assert a0 < b1 and b0 < a1, f"intervals do not overlap: {spans}"


def test_isolated_dep_runs_too(kit, deployment, service):
    ta, tb = kit.topic(), kit.topic()
    sa = service(ta, lambda d: "A")
    sb = service(tb, lambda d: "B")
    deps = {"a": {"topic": ta}, "b": {"topic": tb, "deps": ["a"]},
            "lonely": {"topic": deployment.topic("add"), "args": [20, 22]}}
    body, _ = call(kit, deployment.topic("generic"), {"deps": deps})
    assert body["results"] == {"a": "A", "b": "B", "lonely": 42}
    assert len(sa.received) == len(sb.received) == 1


def test_concurrency_one_prefork_worker_serves_reactor_and_its_deps(kit, deployment, worker_factory):
    worker_factory(name="c1", concurrency=1, pool="prefork", env=deployment.env)
    body, _ = call(kit, deployment.topic("math"), [4, 5, 6])
    assert body == 13  # one = add([4, 5, 6]) = 15; two = subtract([15, 2]) = 13


@pytest.mark.broker
def test_error_reply_fails_fast_naming_the_dep(kit, deployment):
    t0 = time.monotonic()
    deps = {"ok": {"topic": deployment.topic("add"), "args": [1]},
            "bad": {"topic": deployment.topic("boom"), "args": ["x"]},
            "after": {"topic": deployment.topic("add"), "args": [1], "deps": ["bad"]}}
    body, headers = call(kit, deployment.topic("generic"), {"deps": deps})
    assert headers["fusion-status"] == b"error"
    assert body["error"]["type"] == "DependencyFailed"
    assert "dep 'bad'" in body["error"]["message"] and "boom" in body["error"]["message"]
    assert time.monotonic() - t0 < 30


def test_timeout_fails_naming_dep_and_topic(kit, deployment):
    silent = kit.topic()
    deps = {"mute": {"topic": silent, "timeout": 2}}
    body, headers = call(kit, deployment.topic("generic"), {"deps": deps})
    assert headers["fusion-status"] == b"error"
    assert body["error"]["type"] == "DependencyTimeout"
    assert f"dep 'mute' (topic '{silent}') did not reply within 2s" in body["error"]["message"]


@pytest.mark.parametrize("deps,match", [
    ({"a": {"topic": "x", "deps": ["ghost"]}}, "unknown dep 'ghost'"),
    ({"a": {"topic": "x", "deps": ["b"]}, "b": {"topic": "x", "deps": ["a"]}}, "cycle"),
    ({"a": {"args": [1]}}, "missing 'topic'"),
])
def test_invalid_deps_map_replies_with_an_error(kit, deployment, deps, match):
    body, headers = call(kit, deployment.topic("generic"), {"deps": deps})
    assert headers["fusion-status"] == b"error"
    assert body["error"]["type"] == "DepsMapError" and match in body["error"]["message"]


def test_missing_dep_topic_is_a_clear_error(kit, deployment):
    nowhere = f"nowhere.{uuid.uuid4().hex}"
    body, headers = call(kit, deployment.topic("generic"), {"deps": {"a": {"topic": nowhere}}})
    assert headers["fusion-status"] == b"error"
    assert "does not exist" in body["error"]["message"] and "dep 'a'" in body["error"]["message"]


def test_200_at_once_all_correct_and_no_return_topic_left(kit, deployment, redis_client):
    before = return_topics(kit)
    n = 200
    backs = [return_topic_name() for _ in range(n)]
    from confluent_kafka.admin import NewTopic
    for f in kit.admin.create_topics([NewTopic(b, 1, 1) for b in backs]).values():
        f.result(60)
    kit.wait_visible(backs)
    for i, back in enumerate(backs):
        kit.producer.produce(deployment.topic("math"),
                             json.dumps({"data": [i, 1], "return-topic": back, "id": f"b{i}"}))
    kit.producer.flush(30)
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": kit.servers, "group.id": "x", "enable.auto.commit": False})
    c.assign([TopicPartition(b, 0, OFFSET_BEGINNING) for b in backs])
    got = {}
    deadline = time.monotonic() + 240
    while len(got) < n and time.monotonic() < deadline:
        for m in c.consume(200, timeout=0.5):
            if m.error() is None:
                got[m.topic()] = json.loads(m.value())
    c.close()
    kit.admin.delete_topics(backs)
    assert len(got) == n, f"{len(got)} of {n} answered"
    for i, back in enumerate(backs):
        assert got[back] == i + 1 - 2, (i, got[back])  # one = i + 1; two = (i + 1) - 2
    ours = lambda: {t for t in return_topics(kit, redis_client) - before if t not in backs}  # noqa: E731
    wait_for(lambda: not ours(), 60, "every return topic fusion-celery created to be deleted")


@pytest.mark.parametrize("registry", REGISTRIES)
def test_pool_children_replaced_after_every_task_still_work(kit, worker_factory, registry):
    """Client handles never cross a fork: children forked later (max-tasks-per-child=1) make their own."""
    from support.workers import isolated_env
    env = isolated_env(registry)
    worker_factory(name="fork", env=env, concurrency=2, extra_args=("--max-tasks-per-child=1",))
    for data, want in (([1, 2, 3], 4), ([4, 5, 6], 13), ([10], 8)):
        assert call(kit, f"{env['FUSION_TEST_RUN']}.math", data)[0] == want


def test_concurrency_one_worker_holds_many_waits_and_keeps_working(kit, worker_factory, service):
    """Parked waits hold no worker slot: with one slot and 150 waits pending, other requests are served."""
    from confluent_kafka import Consumer, TopicPartition
    from confluent_kafka.admin import NewTopic
    from support.workers import isolated_env
    env = {**isolated_env(), "FUSION_MAX_IN_FLIGHT": "1000"}  # the default (100) would pause the intake
    run = env["FUSION_TEST_RUN"]
    worker_factory(name="one", env=env, concurrency=1)
    gate_topic = kit.topic()
    gate = service(gate_topic, lambda data: data)
    gate.hold = True
    n = 150
    backs = [return_topic_name() for _ in range(n)]
    for f in kit.admin.create_topics([NewTopic(b, 1, 1) for b in backs]).values():
        f.result(60)
    for i, back in enumerate(backs):
        kit.producer.produce(f"{run}.generic", json.dumps({"data": {"deps": {"g": {"topic": gate_topic, "args": i}}},
                                                           "return-topic": back}))
    kit.producer.flush(30)
    wait_for(lambda: len(gate.received) == n, 200, f"{n} parked dependency requests")
    assert call(kit, f"{run}.add", [40, 2])[0] == 42  # the single slot is free
    gate.release()
    c = Consumer({"bootstrap.servers": kit.servers, "group.id": "one-reader", "enable.auto.commit": False})
    c.assign([TopicPartition(b, 0, 0) for b in backs])
    got = {}

    def all_answered():
        got.update({m.topic(): json.loads(m.value()) for m in c.consume(500, timeout=0.5) if m.error() is None})
        return len(got) == n

    wait_for(all_answered, 240, f"all {n} answers")
    c.close()
    kit.admin.delete_topics(backs)
    assert all(got[b]["results"]["g"] == i for i, b in enumerate(backs))


def test_failed_dependency_leaves_no_run_started_in_flower_events(kit, services_worker, app):
    """The fail-fast path sends the run's task-failed event (no worker would: its final step never runs)."""
    import threading

    seen = {}
    ready = threading.Event()

    def capture():
        with app.connection_for_read() as conn:
            recv = app.events.Receiver(conn, handlers={"task-failed": lambda e: seen.setdefault(e["uuid"], e),
                                                       "*": lambda e: ready.set()})
            try:
                recv.capture(limit=None, timeout=30, wakeup=True)
            except Exception:
                pass

    t = threading.Thread(target=capture, daemon=True)
    t.start()
    ready.wait(30)
    back = rt(kit)
    rec = kit.send(topic_name("generic"), {"data": {"deps": {"bad": {"topic": topic_name("boom"), "args": 1}}},
                                           "return-topic": back})
    kit.read(back, 1, timeout=60)
    from fusion_celery import run_id
    run = run_id(rec.topic(), rec.partition(), rec.offset(), rec.timestamp()[1])
    failed = wait_for(lambda: seen.get(run), 30, "the reactor run's task-failed event")
    assert "DependencyFailed" in failed["exception"] and "dep 'bad'" in failed["exception"]
