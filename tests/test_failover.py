"""A worker that goes away: its peer serves the reactor partitions it owned.

Two workers serve the same reactor topic, so its consumer group divides the partitions between their
intakes.  The worker that owns partition 0 goes away; requests sent right after to every partition,
the gone worker's included, must all be answered.

- ``kill -9``: within 15 s of the kill.  The group notices the death when the member's session expires
  (6 s by default, see ``fusion_celery.intake.group_defaults``); with librdkafka's default session of
  45 s these requests would wait 45 s and more.
- With the KIP-848 group protocol chosen by the user (``group.protocol=consumer``): workers start (no
  classic-only setting reaches librdkafka, which refuses a consumer with one), a worker stopped with
  SIGTERM leaves its groups, and the incremental assignment hands its reactor and registry partitions
  to the peer, whose intake and waiter then serve them.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, ConsumerGroupState, TopicPartition
from support.kafka import KafkaKit, return_topic_name
from support.ports import free_port
from support.redis_server import redis_server
from support.waiting import wait_for
from support.workers import Worker, isolated_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

#: The longest a request on a killed worker's partition may wait for its answer, counted from the kill.
TAKEOVER_BOUND = 15.0
PARTITIONS = 3  # fusion_reactor_partitions' default: the topic the workers create
REGISTRY_PARTITIONS = 12  # fusion_registry_partitions' default


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[str]:
    """A private Redis for the workers' Celery broker and result backend.

    On a database shared with other workers (another test, another run on the same stack), those
    would take this test's reactor runs and drop them as unregistered tasks.  Requested before
    ``worker_factory``, so it is stopped after the workers.
    """
    port = free_port()
    server = redis_server(port, tmp_path)
    yield f"redis://127.0.0.1:{port}"
    server.terminate()
    server.wait(10)


def group_owners(kit: KafkaKit, group: str, topic: str) -> tuple[bool, dict[int, str]]:
    """Whether ``group`` is stable, and the client id of the member that owns each partition of ``topic``."""
    description = kit.admin.describe_consumer_groups([group])[group].result(10)
    owners = {tp.partition: member.client_id
              for member in description.members for tp in member.assignment.topic_partitions if tp.topic == topic}
    return description.state == ConsumerGroupState.STABLE, owners


def ask(kit: KafkaKit, topic: str, partition: int | None, return_topic: str, request_id: str,
        data: Any = None) -> None:
    """Send one request to ``partition`` of the reactor ``topic`` (fusion's own senders pick it by the key)."""
    body = json.dumps({"data": request_id if data is None else data, "return-topic": return_topic, "id": request_id})
    if partition is None:
        kit.producer.produce(topic, body)
    else:
        kit.producer.produce(topic, body, partition=partition)
    kit.producer.flush(10)


class Answers:
    """Reads the replies that arrive on one return topic, from its beginning."""

    def __init__(self, kit: KafkaKit, return_topic: str) -> None:
        self.consumer = Consumer({"bootstrap.servers": kit.servers, "group.id": f"failover-{uuid.uuid4().hex}",
                                  "enable.auto.commit": False})
        self.consumer.assign([TopicPartition(return_topic, 0, OFFSET_BEGINNING)])
        self.got: list[Any] = []

    def read(self) -> list[Any]:
        self.got.extend(json.loads(m.value()) for m in self.consumer.consume(10, timeout=0.2) if m.error() is None)
        return self.got

    def close(self) -> None:
        self.consumer.close()


def two_workers(kit: KafkaKit, worker_factory: Callable[..., Worker], env: dict[str, str],
                consumer_config: dict[str, Any]) -> tuple[dict[str, Worker], str, str]:
    """Start two workers serving tests/apps/services.py and wait until both answer on the ``one-arg`` reactor.

    Each worker's consumers carry a client id of its own (``consumer_config`` plus ``client.id``), so the
    group description tells which worker owns which partition.  Returns the workers by client id, the
    reactor topic and its consumer group.
    """
    run = env["FUSION_TEST_RUN"]
    topic = f"{run}.one-arg"  # answers with the partition and id of the request it got
    group = f"fusion.reactor.{topic}"
    workers = {}
    for name in ("failA", "failB"):
        client_id = f"{name}-{run}"
        workers[client_id] = worker_factory(name=name, concurrency=1, env={
            **env, "FUSION_KAFKA_CONSUMER_CONFIG": json.dumps({**consumer_config, "client.id": client_id})})
    wait_for(lambda: shared(kit, group, topic, set(workers)), 90,
             "the two workers' intakes to share the reactor's partitions", interval=0.5)
    warm = kit.topic(return_topic_name())
    answers = Answers(kit, warm)
    try:
        for p in range(PARTITIONS):
            ask(kit, topic, p, warm, f"warm-{p}")
        wait_for(lambda: len(answers.read()) >= PARTITIONS, 60, "both workers to answer a request on each partition")
    finally:
        answers.close()
    return workers, topic, group


def shared(kit: KafkaKit, group: str, topic: str, members: set[str]) -> dict[int, str] | None:
    """The owner of each partition of ``topic`` once the stable ``group`` gives every one of ``members`` some."""
    stable, owners = group_owners(kit, group, topic)
    return owners if stable and len(owners) == PARTITIONS and set(owners.values()) == members else None


def answers_from_every_partition(kit: KafkaKit, topic: str, back: str, answers: Answers, timeout: float,
                                 what: str) -> None:
    """Send a request to each partition of ``topic``; wait ``timeout`` s for all answers, each from its partition."""
    for p in range(PARTITIONS):
        ask(kit, topic, p, back, f"after-{p}")
    wait_for(lambda: len(answers.read()) >= PARTITIONS, timeout, what)
    assert sorted((a["id"], a["partition"]) for a in answers.got) == [(f"after-{p}", p) for p in range(PARTITIONS)]


def test_kill_9_a_workers_reactor_partitions_are_served_again_within_15_s(own_redis, kit, worker_factory):
    env = {**isolated_env("kafka"), "CELERY_BROKER_URL": f"{own_redis}/0", "CELERY_RESULT_BACKEND": f"{own_redis}/1"}
    workers, topic, group = two_workers(kit, worker_factory, env, {})
    owners = shared(kit, group, topic, set(workers))
    assert owners, "the group changed while the workers were only answering"
    victim = owners[0]
    lost = sorted(p for p, owner in owners.items() if owner == victim)
    back = kit.topic(return_topic_name())
    answers = Answers(kit, back)
    try:
        answers.read()  # the reader is assigned and fetching before the clock starts
        workers[victim].kill()
        killed = time.monotonic()
        answers_from_every_partition(
            kit, topic, back, answers, round(TAKEOVER_BOUND - (time.monotonic() - killed), 2),
            f"answers on all {PARTITIONS} partitions, {lost} from the killed worker's, within "
            f"{TAKEOVER_BOUND:.0f}s of the kill")
    finally:
        answers.close()
    _, owners = group_owners(kit, group, topic)
    assert set(owners.values()) <= set(workers) - {victim}, f"the killed worker still owns partitions: {owners}"


def test_with_kip_848_a_stopped_workers_partitions_move_to_its_peer(own_redis, kit, worker_factory, service):
    env = {**isolated_env("kafka"), "CELERY_BROKER_URL": f"{own_redis}/0", "CELERY_RESULT_BACKEND": f"{own_redis}/1"}
    workers, topic, group = two_workers(kit, worker_factory, env, {"group.protocol": "consumer"})
    owners = shared(kit, group, topic, set(workers))
    assert owners, "the group changed while the workers were only answering"
    victim = owners[0]
    survivor = (set(workers) - {victim}).pop()
    assert workers[victim].stop() == 0
    wait_for(lambda: shared(kit, group, topic, {survivor}), 60, "the survivor's intake to own every partition",
             interval=0.5)
    back = kit.topic(return_topic_name())
    answers = Answers(kit, back)
    try:
        answers_from_every_partition(kit, topic, back, answers, 60, f"answers on all {PARTITIONS} partitions")
    finally:
        answers.close()

    # The waiter: the survivor's holds every registry partition and completes a wait.
    registry_topic = env["FUSION_REGISTRY_URL"].removeprefix("kafka://")
    waiter = f"fusion-waiter-{workers[survivor].name}"

    def waiter_owns_all() -> bool:
        stable, owners = group_owners(kit, f"fusion.waiters.{registry_topic}", registry_topic)
        return stable and len(owners) == REGISTRY_PARTITIONS and set(owners.values()) == {waiter}

    wait_for(waiter_owns_all, 60, "the survivor's waiter to own every registry partition", interval=0.5)
    dep = service(kit.topic(), lambda data: {"echo": data})
    back = kit.topic(return_topic_name())
    answers = Answers(kit, back)
    try:
        ask(kit, f"{env['FUSION_TEST_RUN']}.generic", None, back, "with-dep",
            data={"deps": {"d": {"topic": dep.topic, "args": [7]}}, "echo": 7})
        wait_for(answers.read, 60, "the answer of a request with a dependency")
    finally:
        answers.close()
    assert answers.got == [{"results": {"d": {"echo": [7]}}, "echo": 7}]
    log = workers[survivor].log()
    assert "Traceback" not in log, log[-3000:]
