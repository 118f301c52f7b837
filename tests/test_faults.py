"""Faults with waits pending: the promises hold when Kafka or Redis go away or workers die.

Each test parks a few hundred requests (100 in ``make test``, 300 in ``make soak``) whose dependency
answers only when told, puts more requests in flight, breaks something, and then checks that nothing
was lost, nothing happened twice and nothing failed: every request answered once and correctly, every
chord body run once, every dependency asked once (``support.reliability.check``).  The workers are isolated
from the session worker (their own broker and backend databases, registry and reactor topics).  Tests
marked ``faults`` stop stack services, so the session runs them last (see conftest.py) and each one
leaves the stack running.
"""

from __future__ import annotations

import signal
import time

import pytest
from support.brokers import BROKER_SERVICE, task_counts
from support.kafka import return_topic_name
from support.reliability import (
    Load,
    check,
    check_all_handed,
    collect,
    long_run,
    nothing_left,
    outage,
    recovered,
    report,
)
from support.waiting import wait_for
from support.workers import isolated_env

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(900)]

SCALES = ["short", pytest.param("long", marks=pytest.mark.soak)]
#: How a service goes away: stopped (SIGTERM, it shuts down cleanly) or, in the long suite, killed (SIGKILL).
OUTAGES = [("short", "stop"), pytest.param("long", "stop", marks=pytest.mark.soak),
           pytest.param("long", "kill", marks=pytest.mark.soak)]
OUTAGE_S = 20.0


def fault_env() -> dict[str, str]:
    """Two isolated workers' settings.  Each parked request is a run in flight until answered, and a
    worker pauses a reactor's intake at ``fusion_max_in_flight`` (100) of them: allow the 300 parked.
    A run lost with its message is sent again after 10 s (60 s by default), and a killed run's claim
    lasts 20 s (300 s by default), so that the tests end within minutes.  Kafka calls ride out 180 s
    without Kafka (60 s by default): a killed broker recovers its logs before it serves again, which
    can take a minute and a half (a call that runs out of its budget fails with a ``DependencyFailed``
    naming ``fusion_kafka_retry_timeout``)."""
    return {**isolated_env("kafka", db=6), "FUSION_MAX_IN_FLIGHT": "1000", "FUSION_RUN_RESTART_AFTER": "10",
            "FUSION_RUN_LEASE": "20", "FUSION_KAFKA_RETRY_TIMEOUT": "180"}


def sizes(request) -> tuple[int, int]:
    """(parked waits, requests in flight) for this scale."""
    return (300, 100) if long_run(request) else (100, 30)


def park(load: Load, gate, n: int, workers=()) -> None:
    load.parked(gate, n)
    wait_for(lambda: len(gate.received) >= n, 300, f"{n} dependency requests (waits registered)", interval=0.2)
    for w in workers:
        assert w.proc.poll() is None, f"worker {w.name} died while parking:\n{w.log()[-3000:]}"


def still_serves(load: Load, redis_client) -> None:
    """A request sent after the fault is answered correctly (the deployment recovered)."""
    after = Load(load.kit, load.run)
    after.flowing(3)
    check(collect(after, redis_client, timeout=120))


@pytest.mark.parametrize(("scale", "how"), OUTAGES)
def test_kafka_stopped_for_20s(scale, how, request, kit, worker_factory, gates, redis_client):
    n, m = sizes(request)
    env = fault_env()
    a = worker_factory(name="kafkaA", env=env, concurrency=2)
    b = worker_factory(name="kafkaB", env=env, concurrency=2)
    gate = gates()
    load = Load(kit, env["FUSION_TEST_RUN"])
    park(load, gate, n, (a, b))
    load.flowing(m)
    gate.hold = False
    gate.release()  # replies arrive while the broker goes down
    out = outage("kafka", OUTAGE_S, hard=how == "kill")
    outcome = collect(load, redis_client, timeout=300)
    report(request.node.name, {"parked": n, "in_flight": m, "down_s": round(out.down_s, 1),
                               "restart_s": round(out.restart_s, 1), **outcome.summary()})
    check(outcome, gate)
    assert a.proc.poll() is None and b.proc.poll() is None, "a worker died during the Kafka outage"
    still_serves(load, redis_client)
    for w in (a, b):
        check_all_handed(w)


def broker_outage(service: str, how: str, request, kit, worker_factory, gates, redis_client) -> None:
    """Park waits and put requests in flight on two isolated workers, take ``service`` (redis | rabbitmq)
    away for 20 s (``how``: stop | kill) while the parked waits' replies arrive, then check that every
    request was answered once, correctly, and that the deployment still serves."""
    n, m = sizes(request)
    env = fault_env()
    a = worker_factory(name=f"{service}A", env=env, concurrency=2)
    b = worker_factory(name=f"{service}B", env=env, concurrency=2)
    gate = gates()
    load = Load(kit, env["FUSION_TEST_RUN"])
    park(load, gate, n, (a, b))
    load.flowing(m)

    def replies_arrive_while_the_service_is_down():
        gate.hold = False
        gate.release()

    out = outage(service, OUTAGE_S, during=replies_arrive_while_the_service_is_down, redis_client=redis_client,
                 hard=how == "kill")
    outcome = collect(load, redis_client, timeout=300, settle=20, quiet=nothing_left(env, kit.servers))
    report(request.node.name, {"parked": n, "in_flight": m, "down_s": round(out.down_s, 1),
                               "restart_s": round(out.restart_s, 1), "lost": outcome.missing,
                               **recovered((a, b)), **outcome.summary()})
    for w in (a, b):
        assert w.proc.poll() is None, f"worker {w.name} died during the {service} outage:\n{w.log()[-3000:]}"
    check(outcome, gate)
    still_serves(load, redis_client)
    for w in (a, b):
        check_all_handed(w)


@pytest.mark.parametrize(("scale", "how"), OUTAGES)
def test_redis_stopped_for_20s(scale, how, request, kit, worker_factory, gates, redis_client):
    """Killed, Redis keeps what its append-only file holds: the test has it write every command before
    answering (``appendfsync always``); with Redis's default (``everysec``) a kill loses up to the last
    second of queued tasks, results and claims (docs/operations/failures.md).

    With Redis as the broker too: Celery's default visibility timeout (1 hour), tasks a worker had
    prefetched when Redis went away are put back by fusion-celery's RestorePrefetched consumer step when
    the connection returns.  A task message kombu's Redis transport lost as Redis stopped (popped, never
    received: kombu #305) is covered by the intake, which sends a run that never started again and has a
    stalled one compile its deps again; and no intake kept a record back (a hand-over that failed as Redis
    came back is made again)."""
    broker_outage("redis", how, request, kit, worker_factory, gates, redis_client)


@pytest.mark.rabbitmq
@pytest.mark.parametrize("how", ["stop", "kill"])
def test_rabbitmq_stopped_for_20s(how, request, kit, worker_factory, gates, redis_client):
    """RabbitMQ as the Celery broker, stopped (SIGTERM) or killed (SIGKILL) for 20 s with waits pending while
    their replies arrive.  The broker puts back what the workers had been delivered and not acknowledged as
    their connections close; Celery's queue is durable and its messages persistent, so they outlive the
    restart (a kill loses what the broker had not written to disk yet: the intake sends such a run again)."""
    broker_outage("rabbitmq", how, request, kit, worker_factory, gates, redis_client)


@pytest.mark.broker
def test_a_worker_with_prefetched_tasks_survives_a_broker_restart(kit, worker_factory, redis_client):
    """Tasks prefetched when the broker connection breaks run once it is back, and the worker stays up.

    On Redis, Celery 5.7's consumer, closing the broken connection, lets kombu try to put prefetched messages
    back through a torn-down transport; depending on which socket sees the error first, kombu raises
    "AttributeError: 'NoneType' object has no attribute 'hostname'" and the worker stops.  fusion's
    consumer class turns that close-time restore off; RestorePrefetched puts them back instead.  On
    RabbitMQ the broker requeues them itself as the connection closes (the step is not part of the worker)."""
    import json
    env = isolated_env("kafka", db=6)
    w = worker_factory(name="prefetch", env=env, concurrency=1)
    back = kit.topic(return_topic_name())
    n = 5
    for i in range(n):
        kit.send(f"{env['FUSION_TEST_RUN']}.slow", {"data": 2, "return-topic": back, "id": f"slow-{i}"})
    # One task runs (2 s each), the others are prefetched: delivered to the worker, not acknowledged.
    wait_for(lambda: task_counts(env["CELERY_BROKER_URL"])[1] >= 3, 60, "tasks prefetched by the one-slot worker",
             interval=0.1)
    outage(BROKER_SERVICE, 5.0, redis_client=redis_client)
    replies = kit.read(back, n, timeout=180)
    got = {dict(m.headers() or {}).get("fusion-id", b"?").decode() for m in replies}
    assert w.proc.poll() is None, f"the worker died when the broker went away:\n{w.log()[-3000:]}"
    assert "Unrecoverable error" not in w.log(), w.log()[-3000:]
    restored = "prefetched before the broker connection was lost" in w.log()
    assert restored is (BROKER_SERVICE == "redis"), w.log()[-3000:]
    assert got == {f"slow-{i}" for i in range(n)}, got
    assert all(json.loads(m.value()) == 2 for m in replies)


@pytest.mark.broker
@pytest.mark.parametrize("scale", SCALES)
def test_kill_9_one_worker_then_the_other_then_a_fresh_one(scale, request, kit, worker_factory, gates,
                                                           redis_client):
    """Waits survive both kills; what a killed worker was executing or had prefetched comes back (on Redis
    after the broker's visibility timeout, 30 s here, and kombu's next sweep for it, every 5 s here; on
    RabbitMQ as soon as the broker sees the worker's connection close): fusion's tasks are acknowledged
    after they ran, and a copy whose run-once claim the dead worker held runs once the claim's lease ran
    out (20 s here)."""
    n, m = sizes(request)
    env = {**fault_env(), "FUSION_TEST_VISIBILITY_TIMEOUT": "30"}
    a = worker_factory(name="k9A", env=env, concurrency=2)
    b = worker_factory(name="k9B", env=env, concurrency=2)
    gate = gates()
    load = Load(kit, env["FUSION_TEST_RUN"])
    park(load, gate, n, (a, b))
    load.flowing(m)
    a.kill()  # B takes A's waits over after the registry group's session timeout
    gate.hold = False
    gate.release(n // 2)
    wait_for(lambda: sum(1 for _ in load.expected) and _answered(load, redis_client) >= n // 4, 180,
             "the survivor to answer some requests", interval=1.0)
    gate.release()
    b.kill()  # the other one too, while replies are arriving
    t0 = time.monotonic()
    c = worker_factory(name="k9C", env=env, concurrency=2)
    # Stop once no answer came for 20 s while no task nor record was left (prefetched tasks are restored and
    # uncommitted records read again first).
    outcome = collect(load, redis_client, timeout=400, settle=20, quiet=nothing_left(env, kit.servers))
    report(request.node.name, {"broker": BROKER_SERVICE, "parked": n, "in_flight": m, "collect_s":
                               round(time.monotonic() - t0, 1), "lost": outcome.missing, **recovered((a, b, c)),
                               **outcome.summary()})
    check(outcome, gate)
    still_serves(load, redis_client)


def _answered(load: Load, redis_client) -> int:
    """How many of ``load``'s requests have an answer on its return topic (a quick count)."""
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": load.kit.servers, "group.id": "count", "enable.auto.commit": False})
    try:
        low, high = c.get_watermark_offsets(TopicPartition(load.back, 0), timeout=10)
        return high - low
    finally:
        c.close()


@pytest.mark.parametrize("scale", SCALES)
def test_sigterm_while_replies_arrive(scale, request, kit, worker_factory, gates, redis_client):
    n, m = sizes(request)
    env = fault_env()
    a = worker_factory(name="termA", env=env, concurrency=2)
    b = worker_factory(name="termB", env=env, concurrency=2)
    gate = gates()
    load = Load(kit, env["FUSION_TEST_RUN"])
    park(load, gate, n, (a, b))
    load.flowing(m)
    gate.hold = False
    gate.release()
    a.proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    code = a.proc.wait(120)
    stop_s = time.monotonic() - t0
    outcome = collect(load, redis_client, timeout=300)
    report(request.node.name, {"parked": n, "in_flight": m, "sigterm_exit": code, "stop_s": round(stop_s, 1),
                               **outcome.summary()})
    assert code == 0, f"worker exited with {code} after SIGTERM:\n{a.log()[-3000:]}"
    check(outcome, gate)
    assert "Traceback" not in a.log(), a.log()[-3000:]
