"""Requests spread over a reactor's partitions, and so over its workers (real Kafka, two real workers).

fusion-celery keys each request by its id unless the caller gives a key, so the requests to a reactor
whose topic has six partitions land on all six, the two workers' intakes (one consumer group) each read
some of them, and both workers run some reactor runs.  A caller's key keeps one entity's requests on
one partition.  The workers serve tests/apps/keys.py in an environment of their own (their own Redis,
registry and topics), so no other worker takes their runs.

Run it with the stack up: ``make test PYTEST_ARGS="tests/test_keys.py -ra"``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from celery import Celery
from confluent_kafka import ConsumerGroupState
from support.kafka import KafkaKit
from support.ports import free_port
from support.redis_server import redis_server
from support.waiting import wait_for
from support.workers import Worker, isolated_env

from fusion_celery import Pipeline
from fusion_celery.application import create_app

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PARTITIONS = 6  # tests/apps/keys.py: the spread reactor's topic
ANSWER_TIMEOUT = 120.0
#: Task ids of the pipeline calls: fixed, so that which partitions their keys pick does not vary from run to run.
CALL_IDS = [str(uuid.uuid5(uuid.NAMESPACE_URL, f"fusion-keys/{i}")) for i in range(60)]


@dataclass
class Spread:
    """The two workers (by the client id of their consumers), the reactor they serve, and a client of theirs."""

    workers: dict[str, Worker]
    run: str
    client: Celery

    def topic(self, base: str) -> str:
        return f"{self.run}.{base}"

    @property
    def group(self) -> str:
        return f"fusion.reactor.{self.topic('spread')}"


def owners(kit: KafkaKit, group: str, topic: str) -> tuple[bool, dict[int, str]]:
    """Whether ``group`` is stable, and the client id of the member that owns each partition of ``topic``."""
    description = kit.admin.describe_consumer_groups([group])[group].result(10)
    found = {tp.partition: member.client_id
             for member in description.members for tp in member.assignment.topic_partitions if tp.topic == topic}
    return description.state == ConsumerGroupState.STABLE, found


def split(kit: KafkaKit, spread: Spread) -> dict[int, str] | None:
    """The owner of each partition once the stable group gives each worker's intake some of them."""
    stable, found = owners(kit, spread.group, spread.topic("spread"))
    return found if stable and len(found) == PARTITIONS and set(found.values()) == set(spread.workers) else None


@pytest.fixture(scope="module")
def spread(stack, kit, tmp_path_factory) -> Iterator[Spread]:
    """Two workers on a private Redis serving tests/apps/keys.py, their intakes sharing the spread topic."""
    port = free_port()
    server = redis_server(port, tmp_path_factory.mktemp("keys-redis"))
    broker, backend = f"redis://127.0.0.1:{port}/0", f"redis://127.0.0.1:{port}/1"
    env = {**isolated_env("kafka"), "CELERY_BROKER_URL": broker, "CELERY_RESULT_BACKEND": backend}
    run = env["FUSION_TEST_RUN"]
    workers: dict[str, Worker] = {}
    # CELERY_BROKER_URL and CELERY_RESULT_BACKEND in this process's environment (the stack's) would win over
    # the URLs an app is given: the read and write URLs, and the backend class, take precedence over them.
    client = create_app("keys-client", broker=broker, backend=backend)
    client.conf.update(broker_read_url=broker, broker_write_url=broker)
    client.backend_cls = backend
    try:
        for name in ("keysA", "keysB"):
            client_id = f"{name}-{run}"
            workers[client_id] = Worker(name, "tests.apps.keys", concurrency=2, env={
                **env, "FUSION_KAFKA_CONSUMER_CONFIG": json.dumps({"client.id": client_id})}).start()
        deployment = Spread(workers, run, client)
        wait_for(lambda: split(kit, deployment), 90, "the two workers' intakes to share the spread topic's "
                 f"{PARTITIONS} partitions", interval=0.5)
        yield deployment
    finally:
        for w in workers.values():
            w.stop()
        client.close()
        server.terminate()
        server.wait(10)


def where(kit: KafkaKit, spread: Spread, answers: list[dict[str, Any]]) -> tuple[set[int], set[str], set[str]]:
    """The partitions the answered requests landed on, the intakes that read them, the workers that ran them."""
    stable, found = owners(kit, spread.group, spread.topic("spread"))
    assert stable and set(found.values()) == set(spread.workers), f"the group changed during the test: {found}"
    partitions = {a["partition"] for a in answers}
    return partitions, {found[p] for p in partitions}, {a["worker"] for a in answers}


def test_pipeline_calls_land_on_every_partition_and_both_workers_take_some(spread, kit):
    call = Pipeline(spread.topic("spread"), app=spread.client)
    pending = [call.apply_async(args=(i,), kwargs={"timeout": ANSWER_TIMEOUT}, task_id=task_id)
               for i, task_id in enumerate(CALL_IDS)]
    answers = [r.get(timeout=ANSWER_TIMEOUT + 30) for r in pending]
    assert [(a["key"], a["id"]) for a in answers] == [(i, i) for i in CALL_IDS], "each keyed by its own id"
    partitions, intakes, runners = where(kit, spread, answers)
    assert partitions == set(range(PARTITIONS))
    assert intakes == set(spread.workers), "both workers' intakes read some of the requests"
    assert runners == {w.name for w in spread.workers.values()}, "both workers ran some of the reactor runs"


def test_a_deps_maps_requests_land_on_every_partition_and_both_workers_take_some(spread, kit):
    results = Pipeline(spread.topic("spread-fan"), app=spread.client).delay(
        {"n": 120}, timeout=ANSWER_TIMEOUT).get(timeout=ANSWER_TIMEOUT + 30)
    answers = list(results.values())
    assert len(answers) == 120 and all(a["key"] == a["id"] for a in answers)
    partitions, intakes, runners = where(kit, spread, answers)
    # The dispatches' ids derive from the run's: all six partitions miss one with a chance of about 2e-9.
    assert partitions == set(range(PARTITIONS))
    assert intakes == set(spread.workers)
    assert runners == {w.name for w in spread.workers.values()}


def test_an_entitys_key_keeps_its_requests_on_one_partition(spread, kit):
    call = Pipeline(spread.topic("spread"), app=spread.client)
    answers = [r.get(timeout=ANSWER_TIMEOUT + 30)
               for r in [call.delay(i, timeout=ANSWER_TIMEOUT, key="account-42") for i in range(12)]]
    assert len({a["partition"] for a in answers}) == 1 and {a["key"] for a in answers} == {"account-42"}
    results = Pipeline(spread.topic("spread-fan"), app=spread.client).delay(
        {"n": 12, "key": "account-7"}, timeout=ANSWER_TIMEOUT).get(timeout=ANSWER_TIMEOUT + 30)
    assert len({a["partition"] for a in results.values()}) == 1
    assert {a["key"] for a in results.values()} == {"account-7"}
