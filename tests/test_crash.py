"""Waits survive `kill -9`: another worker completes them, and no body runs twice (for every registry)."""

import contextlib
import json
import os
import subprocess
import sys

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import NewTopic
from support.kafka import committed_total, return_topic_name
from support.stack import ROOT
from support.waiting import wait_for
from support.workers import REGISTRIES, isolated_env

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def park(kit, service, env, n):
    """Send ``n`` generic requests whose one dependency (a held gate) does not answer yet.

    Returns the gate and the requests' return topics once every wait is registered and the reactor's
    intake has committed (nothing is left to redeliver but the waits themselves).
    """
    run = env["FUSION_TEST_RUN"]
    gate = service(kit.topic(), lambda data: {"echo": data})
    gate.hold = True
    gate.echo_id = True  # a service fit for every reply channel
    backs = [return_topic_name() for _ in range(n)]
    for f in kit.admin.create_topics([NewTopic(b, 1, 1) for b in backs]).values():
        f.result(60)
    kit.wait_visible(backs)
    reactor_topic = f"{run}.generic"
    for i, back in enumerate(backs):
        kit.producer.produce(reactor_topic, json.dumps({
            "data": {"deps": {"g": {"topic": gate.topic, "args": [i]}}, "echo": i},
            "return-topic": back, "id": f"k{i}"}))
    kit.producer.flush(30)
    wait_for(lambda: len(gate.received) >= n, 120, f"{n} dependency requests (waits registered)")
    wait_for(lambda: committed_total(kit.servers, f"fusion.reactor.{reactor_topic}", reactor_topic, 3) >= n, 30,
             "the reactor's intake to commit its offsets")
    return gate, backs


def check_answers(kit, redis_client, env, gate, backs):
    """Every request got its right answer, each body ran once and each dependency was asked once."""
    n, run = len(backs), env["FUSION_TEST_RUN"]
    c = Consumer({"bootstrap.servers": kit.servers, "group.id": "crash-reader", "enable.auto.commit": False})
    c.assign([TopicPartition(b, 0, OFFSET_BEGINNING) for b in backs])
    got = {}

    def all_answered():
        got.update({m.topic(): json.loads(m.value()) for m in c.consume(100, timeout=0.5) if m.error() is None})
        return len(got) == n

    try:
        wait_for(all_answered, 180, f"all {n} answers from the surviving worker")
    finally:
        c.close()
        kit.admin.delete_topics(backs)
    for i, back in enumerate(backs):
        assert got[back] == {"results": {"g": {"echo": [i]}}, "echo": i}
    runs = [int(redis_client.get(f"bodyruns:{run}:k{i}") or 0) for i in range(n)]
    assert runs == [1] * n, f"chord bodies ran {runs}"
    assert len(gate.received) == n, "a dependency request was sent twice"


def lease_pool_of(env, worker):
    """The id of ``worker``'s lease pool (it must be running)."""
    import redis
    client = redis.Redis.from_url(env["CELERY_RESULT_BACKEND"])
    try:
        found = client.get(f"fusion-lease-current-{worker.name}")
    finally:
        client.close()
    assert found, f"{worker.name} runs no lease pool"
    return found.decode()


def reap_until_no_topic_of(kit, env, pools):
    """Run the reaper (as ``celery fusion reap`` does) until no topic of the lease ``pools`` is left."""
    from fusion_celery.application import create_app
    from fusion_celery.reaper import reap

    app = create_app("crash-reaper", set_as_current=False)
    app.backend_cls = env["CELERY_RESULT_BACKEND"]  # over the session's CELERY_RESULT_BACKEND in the environment
    app.conf.update(fusion_kafka_bootstrap_servers=kit.servers, fusion_registry_url=env["FUSION_REGISTRY_URL"])

    def none_left():
        reap(app, grace=0)
        return not {t for t in kit.topics("fusion.rt.lease.") if any(f"lease.{p}." in t for p in pools)}
    # A killed worker's pool counts as alive until its key expires (ALIVE_SECONDS).
    wait_for(none_left, 120, f"every topic of the lease pools {pools} to be deleted", interval=2)


@pytest.mark.parametrize("registry", REGISTRIES)
def test_kill_9_with_50_pending_leased_waits_all_complete_and_no_topic_leaks(registry, kit, service,
                                                                               worker_factory, redis_client):
    env = {**isolated_env(registry), "FUSION_REPLY_CHANNEL": "leased"}
    a = worker_factory(name="crashA", env=env, concurrency=2)
    pools = [lease_pool_of(env, a)]
    gate, backs = park(kit, service, env, 50)
    assert all(f"lease.{pools[0]}." in r["return-topic"] for r in gate.received), "the waits hold leased topics"

    a.kill()
    gate.hold = False
    gate.release()  # the replies now wait in Kafka, nobody is listening

    b = worker_factory(name="crashB", env=env, concurrency=2)
    pools.append(lease_pool_of(env, b))
    check_answers(kit, redis_client, env, gate, backs)
    assert b.stop() == 0
    reap_until_no_topic_of(kit, env, pools)


def held_waits(env, *workers):
    """{worker name: pending waits its waiter holds (None: no answer)}, from `celery inspect fusion_status`."""
    proc = subprocess.run([sys.executable, "-m", "celery", "-A", "fusion_celery", "inspect", "fusion_status", "-j",
                           "-t", "5", "-d", ",".join(w.name for w in workers)],
                          env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True, timeout=60)
    try:
        found = json.loads(proc.stdout or "{}")
    except ValueError:
        found = {}
    return {w.name: (found.get(w.name) or {}).get("pending") for w in workers}


@pytest.mark.parametrize(("registry", "channel"), [("kafka", "shared"), ("zookeeper", "ephemeral")])
def test_kill_9_the_running_peer_takes_the_dead_workers_waits_over(registry, channel, kit, service, worker_factory,
                                                                   redis_client):
    env = {**isolated_env(registry), "FUSION_REPLY_CHANNEL": channel}
    a = worker_factory(name="peerA", env=env, concurrency=2)
    b = worker_factory(name="peerB", env=env, concurrency=2)
    n = 40
    gate, backs = park(kit, service, env, n)
    held = {}

    def both_hold_some():
        held.update(held_waits(env, a, b))
        return held[a.name] and held[b.name] and held[a.name] + held[b.name] == n

    wait_for(both_hold_some, 90, "the two waiters to share the waits", interval=0.5)

    a.kill()
    gate.hold = False
    gate.release()
    check_answers(kit, redis_client, env, gate, backs)
    assert held_waits(env, b)[b.name] == 0, "the survivor still holds waits after answering them all"


@pytest.mark.parametrize("registry", REGISTRIES)
def test_a_waiter_killed_between_storing_a_result_and_sending_the_next_step(registry, kit, service, worker_factory,
                                                                           redis_client, tmp_path):
    """The waiter dies right after it stored a dependency's result (a fault point switched on in worker A
    only): the worker that takes the wait over finds the result stored and still sends the chain's next
    step, so the reactor answers; nothing runs twice."""
    env = isolated_env(registry)
    crash = {"FUSION_FAULT": "complete.after-store", "FUSION_FAULT_ONCE": str(tmp_path / "crashed")}
    a = worker_factory(name="storeA", env={**env, **crash}, concurrency=2)
    gate, backs = park(kit, service, env, 5)
    gate.hold = False
    gate.release()
    wait_for(lambda: a.proc.poll() is not None, 60, "worker A to end itself at the fault point")
    assert (tmp_path / "crashed").exists()
    with contextlib.suppress(ProcessLookupError):
        a.kill()  # its orphaned pool children
    worker_factory(name="storeB", env=env, concurrency=2)
    check_answers(kit, redis_client, env, gate, backs)


def test_a_worker_killed_after_kafka_took_a_reply_does_not_answer_twice(kit, worker_factory, tmp_path):
    """The pool process dies right after Kafka acknowledged a reply, before the reply's lease is marked done
    (a fault point, switched on once): the run's next attempt, once the lease ran out, finds the reply on the
    return topic and sends none. Every request is answered exactly once."""
    import redis

    from fusion_celery.intake import run_id

    env = {**isolated_env(), "FUSION_RUN_LEASE": "10", "FUSION_RUN_RESTART_AFTER": "10"}
    crash = {"FUSION_FAULT": "reply.after-send", "FUSION_FAULT_ONCE": str(tmp_path / "crashed")}
    worker_factory(name="replyA", env={**env, **crash}, concurrency=2)
    backs = [return_topic_name() for _ in range(3)]
    for f in kit.admin.create_topics([NewTopic(b, 1, 1) for b in backs]).values():
        f.result(60)
    kit.wait_visible(backs)
    delivered = []
    for i, back in enumerate(backs):
        kit.producer.produce(f"{env['FUSION_TEST_RUN']}.add", json.dumps({"data": [i, 1], "return-topic": back,
                                                                          "id": f"r{i}"}),
                             on_delivery=lambda err, msg: delivered.append(msg))
    kit.producer.flush(30)
    assert len(delivered) == len(backs) and all(m.error() is None for m in delivered)
    wait_for(lambda: (tmp_path / "crashed").exists(), 60, "a pool process to end itself after Kafka took a reply")
    results = redis.Redis.from_url(env["CELERY_RESULT_BACKEND"])
    runs = [run_id(m.topic(), m.partition(), m.offset(), m.timestamp()[1]) for m in delivered]
    wait_for(lambda: all(results.get(f"fusion-claim-reply-{r}") == b"done" for r in runs), 120,
             "every run's reply lease to be marked done (the killed one's by its next attempt)", interval=0.5)
    c = Consumer({"bootstrap.servers": kit.servers, "group.id": "reply-reader", "enable.auto.commit": False})
    try:
        got: dict[str, list] = {b: [] for b in backs}
        for b in backs:
            end = c.get_watermark_offsets(TopicPartition(b, 0), timeout=10)[1]
            c.assign([TopicPartition(b, 0, OFFSET_BEGINNING)])
            while end and len(got[b]) < end:
                got[b] += [json.loads(m.value()) for m in c.consume(10, 0.5) if m.error() is None]
    finally:
        c.close()
    assert got == {b: [i + 1] for i, b in enumerate(backs)}
