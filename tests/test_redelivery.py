"""A run starts once, and finishes, however its record or its Celery messages are delivered (real stack,
real workers).

- Redelivered: worker A hands a request over to Celery and dies at once (a fault point switched on in A
  only), before its consumer group knows the record was handled; worker B reads the record again and
  hands the same run over a second time, while A's copy is still queued.  Each dependency is asked once
  and the processing step runs once.
- Lost: a run's Celery message, or the message of a step of its canvas, never reaches a worker (deleted
  from the broker, or skipped by a fault point): the intake sends the run again, or has it compile its
  deps again, and the caller gets one answer.
- A pool process killed mid-run: the run is tried again.
"""

from __future__ import annotations

import contextlib
import json

import pytest
from support.kafka import return_topic_name
from support.waiting import wait_for
from support.workers import isolated_env

pytestmark = pytest.mark.integration


def redelivered(kit, worker_factory, env, tmp_path, request: dict):
    """Send ``request`` (return topic added) to worker A, which dies right after the hand-over; start B."""
    env = {**env, "FUSION_TEST_VISIBILITY_TIMEOUT": "5", "FUSION_TEST_QUEUE": f"celery.{env['FUSION_TEST_RUN']}"}
    crash = {"FUSION_FAULT": "intake.after-handover", "FUSION_FAULT_ONCE": str(tmp_path / "crashed")}
    # A consumes another Celery queue: its copy of the run stays in the broker for B (a worker dying with a
    # copy it had just popped would lose it, kombu's Redis gap that the intake's re-sending covers).
    a = worker_factory(name="handA", env={**env, **crash}, concurrency=2,
                       extra_args=("-Q", f"idle.{env['FUSION_TEST_RUN']}"))
    back = kit.topic(return_topic_name())
    kit.send(request.pop("topic"), {**request, "return-topic": back})
    wait_for(lambda: a.proc.poll() is not None, 60, "worker A to end itself right after the hand-over")
    with contextlib.suppress(ProcessLookupError):
        a.kill()  # its orphaned pool children
    b = worker_factory(name="handB", env=env, concurrency=2)
    return back, b


def both_copies_seen(worker) -> bool:
    """B ran the run once and dropped the other copy (a copy held back by a lease is dropped later)."""
    return "run " in worker.log() and "already done; duplicate delivery ignored" in worker.log()


def test_a_redelivered_run_with_deps_asks_each_dependency_once(kit, worker_factory, service, redis_client,
                                                               tmp_path):
    env = isolated_env("kafka", db=14)
    run = env["FUSION_TEST_RUN"]
    gate = service(kit.topic(), lambda data: {"echo": data})
    back, b = redelivered(kit, worker_factory, env, tmp_path, {
        "topic": f"{run}.generic", "data": {"deps": {"g": {"topic": gate.topic, "args": [7]}}}, "id": "r-1"})
    [answer] = kit.read(back, 1, timeout=120)
    assert json.loads(answer.value()) == {"results": {"g": {"echo": [7]}}, "echo": None}
    wait_for(lambda: both_copies_seen(b), 120, "worker B to drop the second copy of the run")
    assert len(gate.received) == 1, f"the dependency was asked {len(gate.received)} times"
    assert int(redis_client.get(f"bodyruns:{run}:r-1") or 0) == 1
    assert len(kit.read(back, 2, timeout=5, at_most=True)) == 1, "the caller was answered twice"


def test_a_redelivered_run_without_deps_runs_its_processing_step_once(kit, worker_factory, redis_client, tmp_path):
    env = isolated_env("kafka", db=14)
    run = env["FUSION_TEST_RUN"]
    back, b = redelivered(kit, worker_factory, env, tmp_path, {"topic": f"{run}.counted", "data": 5, "id": "c-1"})
    [answer] = kit.read(back, 1, timeout=120)
    assert json.loads(answer.value()) == 5
    wait_for(lambda: both_copies_seen(b), 120, "worker B to drop the second copy of the run")
    assert int(redis_client.get(f"procruns:{run}:c-1") or 0) == 1, "proc_fn ran more than once"
    assert len(kit.read(back, 2, timeout=5, at_most=True)) == 1, "the caller was answered twice"


def test_a_run_whose_celery_message_was_lost_is_sent_again_and_answered_once(kit, worker_factory, redis_client):
    """kombu's Redis transport can lose a message it popped as Redis went away, after the intake committed
    the record.  Here the message is deleted from the broker by hand: the intake sees that the run never
    started and sends it again."""
    import redis

    env = isolated_env("kafka", db=14)
    run = env["FUSION_TEST_RUN"]
    queue = f"celery.{run}"
    env = {**env, "FUSION_TEST_QUEUE": queue, "FUSION_RUN_RESTART_AFTER": "3"}
    a = worker_factory(name="loseA", env=env, concurrency=1, extra_args=("-Q", f"idle.{run}"))
    broker = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    back = kit.topic(return_topic_name())
    kit.send(f"{run}.counted", {"data": 9, "id": "l-1", "return-topic": back})
    wait_for(lambda: broker.llen(queue) == 1, 60, "the run's Celery message in the broker")
    assert broker.delete(queue) == 1  # lost
    b = worker_factory(name="loseB", env=env, concurrency=1)  # consumes the queue the runs go to
    [answer] = kit.read(back, 1, timeout=120)
    assert json.loads(answer.value()) == 9
    # Sent again by the intake that owns the record's partition: A, or B once B joined the group and read
    # the partition's run book.
    assert "has not started; sent it again" in a.log() + b.log()
    assert int(redis_client.get(f"procruns:{run}:l-1") or 0) == 1
    assert len(kit.read(back, 2, timeout=5, at_most=True)) == 1, "the caller was answered twice"
    assert b.proc.poll() is None


def test_a_run_whose_pool_process_is_killed_mid_run_is_run_again_and_answered(kit, worker_factory, redis_client):
    """A pool process killed while it runs a reactor (OOM killer, a segfault in a C extension): the run
    is tried again as a new attempt and the caller gets the answer, not an error."""
    import psutil

    env = isolated_env("kafka", db=14)
    run = env["FUSION_TEST_RUN"]
    env = {**env, "FUSION_TEST_QUEUE": f"celery.{run}"}
    w = worker_factory(name="slotkill", env=env, concurrency=1)
    back = kit.topic(return_topic_name())
    kit.send(f"{run}.slow", {"data": 3, "id": "s-1", "return-topic": back})
    started = lambda: int(redis_client.get(f"slowruns:{run}:s-1") or 0)  # noqa: E731
    wait_for(lambda: started() == 1, 60, "the slow run to start")
    [child] = psutil.Process(w.proc.pid).children()
    child.kill()
    [answer] = kit.read(back, 1, timeout=120)
    assert dict(answer.headers())["fusion-status"] == b"ok", json.loads(answer.value())
    assert json.loads(answer.value()) == 3
    assert started() == 2, "the run was not tried again"
    assert "WorkerLostError" in w.log(), "the pool process was not killed mid-run"
    assert len(kit.read(back, 2, timeout=5, at_most=True)) == 1, "the caller was answered twice"


@pytest.mark.parametrize("shape", ["chain", "body"])
def test_a_run_whose_next_step_was_lost_is_compiled_again_and_answered_once(shape, kit, worker_factory, service,
                                                                          redis_client, tmp_path):
    """The step after a completed dependency never reaches a worker (a fault point skips sending it, as
    the Celery broker losing its message would): the run waits on no reply and does not move, so the
    intake has it compile its deps again; the dependency that answered is not asked again, the lost step
    runs, and the caller gets one answer."""
    env = isolated_env("kafka", db=14)
    run = env["FUSION_TEST_RUN"]
    env = {**env, "FUSION_TEST_QUEUE": f"celery.{run}", "FUSION_RUN_RESTART_AFTER": "2",
           "FUSION_FAULT": "complete.lose-next-step", "FUSION_FAULT_ONCE": str(tmp_path / "lost")}
    w = worker_factory(name=f"stall{shape}", env=env, concurrency=2)
    a = service(kit.topic(), lambda data: {"a": data})
    deps = {"a": {"topic": a.topic, "args": [1]}}
    if shape == "chain":  # the lost step is the dispatch of b; else it is the processing step
        b = service(kit.topic(), lambda data: {"b": data})
        deps["b"] = {"topic": b.topic, "args": [2], "deps": ["a"]}
    back = kit.topic(return_topic_name())
    kit.send(f"{run}.generic", {"data": {"deps": deps}, "id": f"st-{shape}", "return-topic": back})
    [answer] = kit.read(back, 1, timeout=120)
    assert (tmp_path / "lost").exists(), "the fault point never fired"
    want = {"a": {"a": [1]}}
    if shape == "chain":
        want["b"] = {"b": [2, {"a": [1]}]}
    assert json.loads(answer.value()) == {"results": want, "echo": None}
    assert "compiling its deps again" in w.log()
    assert len(a.received) == 1, "the dependency that had answered was asked again"
    if shape == "chain":
        assert len(b.received) == 1
    assert int(redis_client.get(f"bodyruns:{run}:st-{shape}") or 0) == 1
    assert len(kit.read(back, 2, timeout=5, at_most=True)) == 1, "the caller was answered twice"


def test_a_dispatch_killed_between_registering_its_wait_and_sending_its_request(kit, worker_factory, service,
                                                                                redis_client, tmp_path):
    """The pool process of a dispatch dies right after it registered the dependency's wait, before the
    request left (a fault point).  Celery runs the dispatch again as a new attempt, which registers the wait
    again with the return topic the first attempt named, the one the waiter already reads: the caller gets
    the answer and the dependency is asked once."""
    env = isolated_env("kafka", db=14)
    run = env["FUSION_TEST_RUN"]
    env = {**env, "FUSION_TEST_QUEUE": f"celery.{run}", "FUSION_FAULT": "dispatch.after-register",
           "FUSION_FAULT_ONCE": str(tmp_path / "crashed")}
    w = worker_factory(name="register", env=env, concurrency=1)
    dep = service(kit.topic(), lambda data: {"dep": data})
    back = kit.topic(return_topic_name())
    kit.send(f"{run}.generic", {"data": {"deps": {"d": {"topic": dep.topic, "args": [3]}}}, "id": "reg-1",
                                "return-topic": back})
    [answer] = kit.read(back, 1, timeout=120)
    assert (tmp_path / "crashed").exists(), "the fault point never fired"
    assert "WorkerLostError" in w.log()
    assert json.loads(answer.value()) == {"results": {"d": {"dep": [3]}}, "echo": None}
    assert len(dep.received) == 1
    assert int(redis_client.get(f"bodyruns:{run}:reg-1") or 0) == 1
