"""A reactor's intake hands every record it reads to Celery, also when the Celery broker fails at hand-over.

The unit tests drive ``ReactorIntake._step`` against a stand-in consumer that behaves like
librdkafka's (a paused partition returns nothing; a resumed one goes on after the last record
returned) and a task whose ``apply_async`` fails when told; the check of stalled runs reads their
progress in the stack's Redis.  The integration test breaks a real worker's broker connection (its own
Redis, stopped) while requests arrive and starts it again.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from support.kafka import return_topic_name
from support.ports import free_port
from support.redis_server import redis_server
from support.reliability import check_all_handed, intake_counts
from support.waiting import wait_for
from support.workers import isolated_env

import fusion_celery.intake as intake_mod
from fusion_celery.application import create_app
from fusion_celery.intake import ReactorIntake
from fusion_celery.runbook import MemoryRunBook


@dataclass
class Record:
    """Enough of confluent_kafka.Message for the intake."""

    _topic: str
    _partition: int
    _offset: int

    def error(self):
        return None

    def topic(self):
        return self._topic

    def partition(self):
        return self._partition

    def offset(self):
        return self._offset

    def timestamp(self):
        return (1, 1_700_000_000_000 + self._offset)

    def key(self):
        return None

    def headers(self):
        return None

    def value(self):
        return json.dumps({"data": [self._partition, self._offset]}).encode()


@dataclass
class Part:
    topic: str
    partition: int


@dataclass
class StandInConsumer:
    """Two partitions of records; pause, resume and positions as librdkafka has them."""

    topic: str
    log: dict[int, int] = field(default_factory=lambda: {0: 0, 1: 0})  # partition -> records written
    position: dict[int, int] = field(default_factory=lambda: {0: 0, 1: 0})
    paused: set[int] = field(default_factory=set)
    stored: list[tuple[int, int]] = field(default_factory=list)
    revoke: Any = None

    def write(self, partition: int, n: int) -> None:
        self.log[partition] += n

    def _take(self, n: int) -> list[Record]:
        out = []
        for p in sorted(self.log):
            while p not in self.paused and self.position[p] < self.log[p] and len(out) < n:
                out.append(Record(self.topic, p, self.position[p]))
                self.position[p] += 1
        return out

    def poll(self, timeout):
        got = self._take(1)
        return got[0] if got else None

    def consume(self, n, timeout=0):
        return self._take(n)

    def assignment(self):
        return [Part(self.topic, p) for p in self.log]

    def pause(self, parts):
        self.paused |= {p.partition for p in parts}

    def resume(self, parts):
        self.paused -= {p.partition for p in parts}

    def store_offsets(self, message):
        self.stored.append((message.partition(), message.offset()))


class FlakyTask:
    name = "fusion.test.flaky"
    group_id = None

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.fail = 0
        self.handed: list[tuple[int, int]] = []

    def apply_async(self, kwargs, task_id, **_):
        if self.fail:
            self.fail -= 1
            raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        data = kwargs["message"]["data"]
        self.handed.append(tuple(data) if isinstance(data, list) else data)


@pytest.fixture
def intake():
    app = create_app("intake-test", broker="memory://", backend="cache+memory://")
    app.conf.fusion_max_in_flight = 1000
    task = FlakyTask("intake.test")
    it = ReactorIntake(app, task, threading.Event())
    it.stop_event.wait = lambda timeout=None: False  # no 1-s backoff in a unit test
    it.book = MemoryRunBook()
    it.consumer = StandInConsumer(task.topic)
    yield it, task, it.consumer
    app.close()


def test_records_whose_hand_over_failed_are_handed_next_time_in_order(intake):
    it, task, consumer = intake
    consumer.write(0, 5)
    consumer.write(1, 3)
    task.fail = 3
    it._step()  # reads all 8; the first hand-over fails
    assert task.handed == [] and len(it.pending) == 8
    assert consumer.paused == {0, 1}, "partitions stay paused while records wait to be handed over"
    consumer.write(0, 4)  # arrives while paused: stays in Kafka
    for _ in range(10):
        it._step()
    assert [o for p, o in task.handed if p == 0] == list(range(9)), "each partition in order"
    assert [o for p, o in task.handed if p == 1] == list(range(3))
    assert consumer.stored == task.handed, "an offset is stored only after its record was handed over"
    assert not it.pending and not consumer.paused
    assert it.counts["received"] == it.counts["started"] == 12


def test_a_failure_in_the_middle_of_a_batch_keeps_the_rest(intake):
    it, task, consumer = intake
    consumer.write(0, 6)
    real = task.apply_async

    def fail_at_third(kwargs, task_id, **kw):
        if len(task.handed) == 2 and not getattr(task, "failed_once", False):
            task.failed_once = True
            raise ConnectionError("Connection closed by server.")
        real(kwargs, task_id, **kw)

    task.apply_async = fail_at_third
    it._step()
    assert task.handed == [(0, 0), (0, 1)] and [m.offset() for m in it.pending] == [2, 3, 4, 5]
    it._step()
    assert task.handed == [(0, i) for i in range(6)] and consumer.stored == task.handed


def test_revoked_partitions_forget_their_waiting_records(intake):
    it, task, consumer = intake
    consumer.write(0, 2)
    consumer.write(1, 2)
    task.fail = 1
    it._step()
    it._on_revoke(consumer, [Part(consumer.topic, 1)])  # the next owner reads them from the committed offset
    assert [(m.partition(), m.offset()) for m in it.pending] == [(0, 0), (0, 1)]
    it._step()
    assert task.handed == [(0, 0), (0, 1)]
    assert it.counts["received"] == it.counts["started"] == 2, "records given up on a revoke are not counted"


def test_at_max_in_flight_records_wait_and_are_not_read_beyond_the_bound(intake):
    it, task, consumer = intake
    it.max_in_flight = 3
    consumer.write(0, 10)
    it._step()
    assert len(task.handed) == 3 and not it.pending
    it.in_flight = dict.fromkeys("abc")
    it._step()
    assert consumer.paused == {0, 1} and len(task.handed) == 3
    it.in_flight = dict.fromkeys("a")  # at half the bound or less: resume
    it._step()
    assert not consumer.paused and len(task.handed) == 5


# -- a real worker whose Celery broker goes away while requests arrive ---------------------------------
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_requests_that_arrive_while_the_celery_broker_is_down_are_all_answered(kit, worker_factory, tmp_path):
    """The worker's own broker Redis is stopped; requests arrive and every hand-over to Celery fails; the
    broker comes back: each request is answered once, and the intake started every record it received."""
    port = free_port()
    broker = redis_server(port, tmp_path)
    try:
        env = {**isolated_env(), "CELERY_BROKER_URL": f"redis://127.0.0.1:{port}/0", "FUSION_TEST_PUBLISH_RETRIES": "2"}
        w = worker_factory(name="handover", env=env, concurrency=2)
        topic = f"{env['FUSION_TEST_RUN']}.add"
        back = kit.topic(return_topic_name())
        kit.send(topic, {"data": [0, 0], "return-topic": back, "id": "before"})
        kit.read(back, 1, timeout=60)  # the worker serves
        broker.terminate()
        broker.wait(10)
        n = 20
        for i in range(1, n + 1):
            kit.send(topic, {"data": [i, i], "return-topic": back, "id": f"r{i}"})
        wait_for(lambda: w.log().count("cannot hand") >= 3, 60, "the intake to fail hand-overs to the stopped broker")
        broker = redis_server(port, tmp_path)
        replies = kit.read(back, n + 1, timeout=120)
        answers = sorted(json.loads(m.value()) for m in replies)
        assert answers == [2 * i for i in range(n + 1)], answers
        check_all_handed(w)
        assert intake_counts(w.log())[topic] == (n + 1, 0, n + 1), "each record read once and handed once"
    finally:
        broker.terminate()
        broker.wait(10)


# -- pause and rebalance with a real broker ----------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_partition_resumed_while_another_member_held_it_is_read_when_it_comes_back(kit):
    """librdkafka keeps a partition's pause across a revoke and a later re-assignment.  The intake pauses
    (at its bound), a second member joins and takes a partition, the intake resumes what it holds, the
    second member leaves: the partition it gives back must be read, not stay paused for good."""
    from confluent_kafka import Consumer

    topic = kit.topic(partitions=3)
    n = 60
    for i in range(n):
        kit.producer.produce(topic, json.dumps({"data": i}), partition=i % 3)
    kit.producer.flush(30)
    app = create_app("intake-rebalance", broker="memory://", backend="cache+memory://")
    app.conf.fusion_kafka_bootstrap_servers = kit.servers
    app.conf.fusion_max_in_flight = 6
    task = FlakyTask(topic)
    task.group_id = f"intake-rebalance-{topic}"
    it = ReactorIntake(app, task, threading.Event())
    drain = threading.Event()  # while set, every run handed over counts as finished
    it._refresh_in_flight = lambda: it.in_flight.clear() if drain.is_set() else None
    assigned: list[int] = []  # partitions per assignment (the intake's consumer is not asked from here:
    on_assign = it._on_assign  # a call from another thread can block on its rebalance callback)

    def record_assign(consumer, partitions):
        on_assign(consumer, partitions)
        assigned.append(len(partitions))

    it._on_assign = record_assign
    it.start()
    other = None
    try:
        wait_for(lambda: it.paused and len(task.handed) == 6, 60, "the intake to pause at its bound")
        other = Consumer({"bootstrap.servers": kit.servers, "group.id": task.group_id,
                          "enable.auto.commit": False, "auto.offset.reset": "earliest"})
        other.subscribe([topic])

        def other_holds_a_partition() -> bool:
            other.poll(0.2)  # serves its rebalance (the records it reads are not committed)
            return bool(other.assignment()) and len(assigned) >= 2 and 0 < assigned[-1] < 3

        wait_for(other_holds_a_partition, 60, "the second member to take a partition from the intake")
        drain.set()
        wait_for(lambda: not it.paused, 30, "the intake to resume the partitions it holds")
        other.close()
        other = None
        wait_for(lambda: len(task.handed) >= n, 60, f"all {n} records handed over once the partition came back")
        twice = sorted(record for record, times in Counter(task.handed).items() if times > 1)
        assert not twice, f"records handed over more than once: {twice}"
        assert sorted(task.handed) == list(range(n))
    finally:
        it.stop_event.set()
        it.join(30)
        if other is not None:
            other.close()
        app.close()


@pytest.fixture
def watched(intake, monkeypatch):
    """The intake on a clock the test moves, checking runs after 30 s, its hand-overs listed by task id."""
    it, task, consumer = intake
    clock = [1000.0]
    monkeypatch.setattr(intake_mod.time, "monotonic", lambda: clock[0])
    it.restart_after = 30.0
    sent: list[str] = []
    task.apply_async = lambda kwargs, task_id, **_: sent.append(task_id)
    return it, task, consumer, clock, sent


@pytest.mark.integration
def test_a_run_that_has_not_started_is_sent_again_with_backoff_and_a_started_one_is_not(watched, monkeypatch):
    """A run handed over whose Celery message was lost (it never took its run-once claim) is sent again
    once it is due, with the same task id and arguments; the checks back off; a started run is left be."""
    it, task, consumer, clock, sent = watched
    consumer.write(0, 2)
    it._step()
    first, second = list(it.in_flight)
    assert sent == [first, second]
    started: set[str] = set()
    monkeypatch.setattr(intake_mod, "_unfinished", lambda app, ids: set(ids))
    monkeypatch.setattr(intake_mod.claims, "started", lambda app, step, ids: {i for i in ids if i in started})

    clock[0] += 29
    it._refresh_in_flight()
    assert sent == [first, second], "sent again before it was due"
    started.add(second)
    clock[0] += 2
    it._refresh_in_flight()
    assert sent == [first, second, first], "the run that never started must be sent again, once"
    assert it.in_flight[first].delay == 60 and it.resent == 1
    clock[0] += 59
    it._refresh_in_flight()
    assert sent.count(first) == 2, "the next check comes after the doubled delay"
    clock[0] += 2
    it._refresh_in_flight()
    assert sent.count(first) == 3 and sent.count(second) == 1
    monkeypatch.setattr(intake_mod, "_unfinished", lambda app, ids: set())
    it._refresh_in_flight()
    assert not it.in_flight, "finished runs are forgotten"


def test_the_runs_of_a_partition_move_with_it_through_the_run_book(watched, monkeypatch):
    """Runs are written down by partition before they are handed over: the intake given a partition
    watches the unfinished runs its predecessor handed over (and sends again one that never started),
    the one that loses a partition stops watching its runs, and finished runs are struck off."""
    it, task, consumer, clock, sent = watched
    consumer.write(0, 1)
    consumer.write(1, 1)
    it._step()
    assert sorted(len(it.book.read(p)) for p in (0, 1)) == [1, 1], "each run is written down before it is sent"
    [on0] = it.book.read(0)
    it._on_revoke(consumer, [Part(consumer.topic, 0)])
    assert on0 not in it.in_flight and len(it.in_flight) == 1, "a revoked partition's runs are the next owner's"

    successor = ReactorIntake(it.app, task, threading.Event())
    successor.book, successor.restart_after = it.book, 30.0
    successor.consumer = consumer
    successor.to_read = {0}  # what _on_assign records
    monkeypatch.setattr(intake_mod, "_unfinished", lambda app, ids: set(ids))
    monkeypatch.setattr(intake_mod.claims, "started", lambda app, step, ids: set())
    successor._refresh_in_flight()
    assert list(successor.in_flight) == [on0]
    clock[0] += 31
    successor._refresh_in_flight()
    assert sent.count(on0) == 2, "the successor sends the run that never started again"
    monkeypatch.setattr(intake_mod, "_unfinished", lambda app, ids: set())
    successor._refresh_in_flight()
    assert not successor.in_flight and not it.book.read(0), "a finished run is struck off the book"
