"""fusion-celery on a Kafka cluster of three nodes (``make test-cluster``): topics replicated three times, a
leader killed with waits pending, a rolling restart and workers scaled out and in, each under load.

Each test asserts what must hold: every request answered once and correctly, no error answer, every chord
body run once, every dependency asked once (``support.reliability.check``), and nothing left behind.  The
workers are isolated from each other's tests (their own broker and backend databases, registry and reactor
topics).  Run with ``make test-cluster``, which starts the stack with ``FUSION_KAFKA_NODES=3``; on a single
node every test here fails, naming the target.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest
from support.cluster import (
    answer_times,
    brokers,
    leaders,
    replication_of,
    service_of,
    wait_whole,
)
from support.reliability import (
    Load,
    check,
    check_all_handed,
    collect,
    kill_service,
    nothing_left,
    report,
    stack,
)
from support.waiting import wait_for
from support.workers import isolated_env

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.timeout(900)]

NODES = 3
RETURN_PREFIX = "fusion.rt."


@pytest.fixture(scope="module")
def cluster(kafka) -> str:
    """The stack's Kafka, which must be a cluster of three brokers, all of them in sync."""
    listed = brokers(kafka)
    if len(listed) != NODES:
        pytest.fail(f"these tests need a Kafka cluster of {NODES} nodes, the stack's lists {len(listed)} broker(s) "
                    f"{sorted(listed)}: run `make test-cluster` (or `FUSION_KAFKA_NODES=3 make up`)", pytrace=False)
    wait_whole(kafka, NODES)
    return kafka


def cluster_env(**extra: str) -> dict[str, str]:
    """Isolated workers' settings: up to 1,000 runs in flight (the parked ones count), a run lost with its
    message sent again after 10 s and a killed run's claim lasting 20 s (so that a test ends within minutes),
    and Kafka calls riding out 180 s of a partition without a leader."""
    return {**isolated_env("kafka", db=8), "FUSION_MAX_IN_FLIGHT": "1000", "FUSION_RUN_RESTART_AFTER": "10",
            "FUSION_RUN_LEASE": "20", "FUSION_KAFKA_RETRY_TIMEOUT": "180", **extra}


def registry_topic(env: dict[str, str]) -> str:
    return env["FUSION_REGISTRY_URL"].removeprefix("kafka://")


def return_topics(servers: str) -> set[str]:
    from support.cluster import admin
    return {t for t in admin(servers).list_topics(timeout=10).topics if t.startswith(RETURN_PREFIX)}


def left_behind(servers: str, before: set[str], kit) -> set[str]:
    """Return topics made since ``before`` that are still there: none but the tests' own and the shared ones."""
    return {t for t in return_topics(servers) - before
            if t not in kit.created and not t.startswith(f"{RETURN_PREFIX}shared.")}


class Steady(threading.Thread):
    """Sends ``rate`` requests a second to the math reactor (two chained fusion deps) until stopped."""

    def __init__(self, load: Load, rate: float) -> None:
        super().__init__(daemon=True)
        self.load, self.period = load, 1.0 / rate
        self.stop_event = threading.Event()
        self.sent = 0

    def run(self) -> None:
        nxt = time.monotonic()
        while not self.stop_event.is_set():
            rid = f"s{self.load.tag}-{self.sent}"
            self.load._send(f"{self.load.run}.math", rid, [self.sent, 1], self.sent - 1, "steady")
            self.sent += 1
            nxt += self.period
            self.stop_event.wait(max(0.0, nxt - time.monotonic()))
        self.load.kit.producer.flush(60)

    def more(self, n: int, what: str) -> None:
        """Wait until ``n`` more requests were sent (at the steady rate: a few seconds of load)."""
        target = self.sent + n
        wait_for(lambda: self.sent >= target, 60, f"{n} requests sent {what}")

    def stop(self) -> None:
        self.stop_event.set()
        self.join(120)


def ran_tasks(worker) -> int:
    """How many tasks ``worker`` took from the broker and ran (Celery's "received" lines at log level info:
    a run that parks waiting for its deps ends as "ignored", one that answers as "succeeded")."""
    return worker.log().count("] received")


# -- topics -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("channel", ["ephemeral", "leased", "shared"])
def test_every_topic_fusion_creates_is_replicated_three_times_and_none_is_left(channel, cluster, kit,
                                                                                worker_factory, gates, redis_client):
    """The registry, reactor, dead-letter and return topics a worker creates have 3 replicas and
    min.insync.replicas 2; after the requests were answered and the worker stopped, none of the
    return topics it made is left (the shared ones are permanent)."""
    before = return_topics(cluster)
    env = cluster_env(FUSION_REPLY_CHANNEL=channel)
    w = worker_factory(name=f"rf-{channel}", env=env, concurrency=2)
    gate = gates()
    gate.echo_id = True  # the shared channel matches replies by the fusion-id header
    load = Load(kit, env["FUSION_TEST_RUN"])
    n = 10
    load.parked(gate, n)
    wait_for(lambda: len(gate.received) >= n, 120, f"{n} dependency requests", interval=0.2)
    used = {r["return-topic"] for r in gate.received}
    run = env["FUSION_TEST_RUN"]
    for topic in [registry_topic(env), f"{run}.generic", f"{run}.generic.dlq", *used]:
        assert replication_of(cluster, topic) == (3, 2), topic
    gate.hold = False
    gate.release()
    outcome = collect(load, redis_client, timeout=120)
    check(outcome, gate)
    assert w.stop() == 0, w.log()[-3000:]
    left = left_behind(cluster, before, kit)
    assert not left, f"return topics left after the worker stopped: {sorted(left)[:10]}"


# -- a leader killed --------------------------------------------------------------------------------
@pytest.mark.faults
def test_kill_9_of_the_leader_of_the_registry_and_a_reactor_with_100_waits_pending(cluster, kit, worker_factory,
                                                                                   gates, redis_client):
    """The broker that leads the most registry partitions, and a partition of the reactor the waits
    belong to, is killed as the parked replies arrive: every request is answered once and correctly,
    the broker rejoins when started again, and nothing is left behind."""
    before = return_topics(cluster)
    env = cluster_env()
    a = worker_factory(name="leadA", env=env, concurrency=2)
    b = worker_factory(name="leadB", env=env, concurrency=2)
    gate = gates()
    load = Load(kit, env["FUSION_TEST_RUN"])
    n, m = 100, 30
    load.parked(gate, n)
    wait_for(lambda: len(gate.received) >= n, 300, f"{n} dependency requests (waits registered)", interval=0.2)
    load.flowing(m)
    run = env["FUSION_TEST_RUN"]
    registry, reactor = leaders(cluster, registry_topic(env)), leaders(cluster, f"{run}.generic")
    victim = max((node for node in registry if reactor[node]), key=lambda node: registry[node])
    gate.hold = False
    kill_service(service_of(victim))
    killed_at = time.time()
    gate.release()  # the replies arrive while the partitions the victim led elect new leaders
    outcome = collect(load, redis_client, timeout=300)
    after_kill = sorted(t - killed_at for t in answer_times(cluster, load.back) if t >= killed_at)
    t0 = time.monotonic()
    stack("start", service_of(victim))
    rejoin_s = time.monotonic() - t0 + wait_whole(cluster, NODES)
    report("cluster_leader_kill_9", {
        "parked": n, "in_flight": m, "victim": service_of(victim), "registry_partitions_led": registry[victim],
        "reactor_partitions_led": reactor[victim],
        "first_answer_after_kill_s": round(after_kill[0], 2) if after_kill else None,
        "last_answer_after_kill_s": round(after_kill[-1], 2) if after_kill else None,
        "rejoin_s": round(rejoin_s, 1), **outcome.summary()})
    check(outcome, gate)
    for w in (a, b):
        assert w.proc.poll() is None, f"worker {w.name} died when the leader was killed:\n{w.log()[-3000:]}"
    assert nothing_left(env, cluster)(), "tasks or unread reactor records are left"
    for w in (a, b):
        check_all_handed(w)
    left = left_behind(cluster, before, kit)
    assert not left, f"return topics left after the workers stopped: {sorted(left)[:10]}"


# -- a rolling restart ------------------------------------------------------------------------------
@pytest.mark.faults
def test_a_rolling_restart_of_every_broker_under_steady_load_loses_nothing(cluster, kit, worker_factory,
                                                                          redis_client):
    """Each broker in turn gets SIGTERM (a controlled shutdown: it hands its leaderships over), stays down
    a few seconds under load, starts again and is back in sync before the next one goes.  The workers reply
    on ephemeral topics, so topics are created (three replicas, one on the broker that is down) and deleted
    throughout; none is left."""
    before = return_topics(cluster)
    env = cluster_env(FUSION_REPLY_CHANNEL="ephemeral")
    a = worker_factory(name="rollA", env=env, concurrency=2)
    b = worker_factory(name="rollB", env=env, concurrency=2)
    load = Load(kit, env["FUSION_TEST_RUN"])
    steady = Steady(load, rate=3.0)
    steady.start()
    timings = []
    try:
        for node in (3, 2, 1):
            steady.more(10, "before the restart")
            t0 = time.monotonic()
            stack("stop", service_of(node))
            stopped_s = time.monotonic() - t0
            steady.more(10, "while the broker is down")
            stack("start", service_of(node))
            timings.append({"node": service_of(node), "stop_s": round(stopped_s, 1),
                            "back_in_sync_s": round(wait_whole(cluster, NODES), 1)})
    finally:
        steady.stop()
    outcome = collect(load, redis_client, timeout=300)
    report("cluster_rolling_restart", {"sent": steady.sent, "restarts": timings, **outcome.summary()})
    check(outcome)
    for w in (a, b):
        assert w.proc.poll() is None, f"worker {w.name} died in the rolling restart:\n{w.log()[-3000:]}"
        check_all_handed(w)
    wait_for(lambda: not left_behind(cluster, before, kit), 60, "the ephemeral return topics to be deleted",
             interval=1.0)


# -- workers scaled out and in ----------------------------------------------------------------------
def test_a_worker_added_and_one_removed_under_load_lose_nothing_and_each_runs_a_share(cluster, kit,
                                                                                    worker_factory, redis_client):
    """Two workers serve the reactors, a third joins under load (registry partitions and reactor partitions
    are divided again), then one of the first two gets SIGTERM under load (its waits move to the others).
    The workers reply on the shared topics, which every worker reads by the part of the registry it owns."""
    env = cluster_env(FUSION_REPLY_CHANNEL="shared")
    a = worker_factory(name="scaleA", env=env, concurrency=2)
    b = worker_factory(name="scaleB", env=env, concurrency=2)
    load = Load(kit, env["FUSION_TEST_RUN"])
    steady = Steady(load, rate=3.0)
    steady.start()
    try:
        steady.more(30, "before the third worker joins")
        c = worker_factory(name="scaleC", env=env, concurrency=2)
        wait_for(lambda: "owns registry partitions [" in c.log() and ran_tasks(c) >= 5, 120,
                 "the third worker to own registry partitions and run tasks", interval=0.5)
        steady.more(30, "with three workers")
        a.proc.send_signal(signal.SIGTERM)
        code = a.proc.wait(120)
        steady.more(30, "after a worker left")
    finally:
        steady.stop()
    outcome = collect(load, redis_client, timeout=300)
    shares = {w.name.split("-")[0]: ran_tasks(w) for w in (a, b, c)}
    report("cluster_scale_out_and_in", {"sent": steady.sent, "tasks_run": shares, "sigterm_exit": code,
                                        **outcome.summary()})
    assert code == 0, f"worker {a.name} exited with {code} after SIGTERM:\n{a.log()[-3000:]}"
    check(outcome)
    assert all(shares.values()), f"a worker ran no task: {shares}"
    assert "left to the others" in a.log(), a.log()[-3000:]
    for w in (b, c):
        check_all_handed(w)


def test_the_stack_writes_every_node_to_the_environment(cluster):
    """``.stack/env`` lists all three bootstrap addresses, so every client can reach a live broker."""
    from support.stack import ROOT

    from fusion_celery.config import stack_env
    env = stack_env(ROOT / ".stack" / "env")
    assert env["FUSION_KAFKA_NODES"] == "3"
    assert len(env["FUSION_KAFKA_BOOTSTRAP_SERVERS"].split(",")) == NODES
    assert sorted(brokers(cluster)) == [1, 2, 3]
