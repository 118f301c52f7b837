"""Long-lived Kafka clients are replaced after ``fusion_kafka_client_recycle_topics`` topics, and nothing
in flight is lost when they are.

librdkafka keeps every topic a client touched (deleted return topics included) and walks them all every
second and on every metadata answer, so a worker that never replaced its clients would spend more CPU on
each request the longer it ran (see docs/operations/reliability.md).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid

import pytest
from support.reliability import Load, check, collect, start_gate
from support.stack import ROOT, RUN_ID
from support.waiting import wait_for
from support.workers import isolated_env

from fusion_celery.application import create_app
from fusion_celery.clients import Clients

pytestmark = pytest.mark.integration


def test_a_process_replaces_its_producer_and_admin_client_past_the_limit(kit, stack):
    app = create_app("recycle-test")
    app.conf.fusion_kafka_client_recycle_topics = 5
    c = Clients(app)
    try:
        names = [f"t.{RUN_ID}.recycle.{uuid.uuid4().hex[:8]}" for _ in range(12)]
        kit.created.extend(names)
        admins = set()
        for i in range(0, 12, 3):
            admins.add(id(c.admin))
            c.create_topics(names[i:i + 3], visible=True)
        assert len(admins) >= 2, "the admin client was not replaced after 5 topics"
        producers = set()
        for i, name in enumerate(names):
            producers.add(id(c.producer))
            c.produce(name, f"record {i}".encode())
        assert len(producers) >= 3, "the producer was not replaced after every 5 topics"
        assert c._retired, "replaced clients are kept until no call can be using them"
        for i, name in enumerate(names):  # every record sent through a replaced producer was delivered
            assert kit.read(name, 1)[0].value() == f"record {i}".encode()
    finally:
        c.close()
    assert not c._retired, "close() must close the replaced clients too"


def test_a_waiter_replaces_its_reply_consumers_without_losing_a_wait(kit, worker_factory, redis_client):
    """With a limit of 5 topics, requests flowing through a worker make its waiter replace the fresh
    consumer many times and the settled one (holding parked waits) at least once: every request is
    answered once and correctly, the parked ones included."""
    env = {**isolated_env("kafka", db=10), "FUSION_KAFKA_CLIENT_RECYCLE_TOPICS": "5"}
    w = worker_factory(name="recycle", env=env, concurrency=2)
    gate = start_gate(kit)
    try:
        load = Load(kit, env["FUSION_TEST_RUN"])
        load.parked(gate, 12)
        wait_for(lambda: len(gate.received) >= 12, 120, "12 parked waits registered")
        load.flowing(20)  # two chained deps each: 40 waits through the fresh consumer
        wait_for(lambda: "replaced its replies consumer" in w.log(), 120, "the fresh reply consumer to be replaced")
        # The parked waits have moved to the settled consumer (a wait does once the waiter has held it for a
        # second, and the waiter may learn of a wait from the registry later than the gate received its request).
        wait_for(lambda: (readers(env, w).get("settled") or 0) >= 12, 120,
                 "the 12 parked waits to be read by the settled consumer", interval=1.0)
        gate.hold = False
        gate.release(6)  # 6 of the 12 settled waits end: the settled consumer holds 6 it was given 12
        try:
            wait_for(lambda: "replaced its settled consumer" in w.log(), 120,
                     "the settled reply consumer to be replaced")
        except BaseException:
            waiter_lines = [line for line in w.log().splitlines() if "waiter" in line]
            print("worker's waiter log lines:\n" + "\n".join(waiter_lines[-60:]))
            print(f"its reply consumers read: {readers(env, w)}")
            raise
        pattern = r"replaced its settled consumer after \d+ return topics \((\d+) waits"
        carried = [int(n) for n in re.findall(pattern, w.log())]
        assert max(carried) >= 1, f"the parked waits were not carried over to the new consumer: {carried}"
        gate.release()
        outcome = collect(load, redis_client, timeout=180)
    finally:
        gate.stop()
    check(outcome)
    assert w.proc.poll() is None


def readers(env: dict[str, str], worker) -> dict[str, int]:
    """How many waits ``worker``'s fresh and settled reply consumers read, from `celery inspect fusion_status`."""
    proc = subprocess.run([sys.executable, "-m", "celery", "-A", "fusion_celery", "inspect", "fusion_status", "-j",
                           "-t", "5", "-d", worker.name], env={**os.environ, **env}, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    try:
        found = json.loads(proc.stdout or "{}")
    except ValueError:
        found = {}
    return (found.get(worker.name) or {}).get("readers") or {}
