"""The waiter's reply reader without services: fake Kafka consumers, the memory registry, a mocked ``complete``.

Most tests drive the waiter one loop turn at a time (``_step``) with a clock moved by
hand; one runs it as the worker does, as a thread, and waits on conditions.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from support.clock import Clock

import fusion_celery.channels.ephemeral as ephemeral_module
import fusion_celery.channels.leased as leased_module
import fusion_celery.waiter as waiter_module
from fusion_celery.application import create_app
from fusion_celery.backends.memory import MemoryRegistry
from fusion_celery.config import reload
from fusion_celery.errors import DependencyFailed, DependencyTimeout
from fusion_celery.registry import Wait
from fusion_celery.testing.app import fake_redis_backend
from fusion_celery.waiter import FRESH_SECONDS, OUTAGE_QUIET_SECONDS, Waiter

# -- fakes -----------------------------------------------------------------------------------------


class Record:
    """A consumed record, or an error event when ``err`` is set (confluent_kafka.Message's read side)."""

    def __init__(self, topic: str, offset: int, value: bytes | None, headers: list[tuple[str, bytes]] | None = None,
                 err: KafkaError | None = None) -> None:
        self._topic, self._offset, self._value, self._headers, self._err = topic, offset, value, headers, err

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._headers

    def error(self) -> KafkaError | None:
        return self._err


class FakeKafka:
    """Return topics (one partition each) and every consumer made, in one process."""

    def __init__(self) -> None:
        self.topics: dict[str, list[Record]] = {}
        self.consumers: list[FakeConsumer] = []
        self.deleted: list[str] = []
        self.lock = threading.Lock()

    def send(self, topic: str, value: Any, headers: list[tuple[str, bytes]] | None = None) -> None:
        raw = value if isinstance(value, bytes) or value is None else json.dumps(value).encode()
        with self.lock:
            log = self.topics.setdefault(topic, [])
            log.append(Record(topic, len(log), raw, headers))

    # what the waiter asks of clients(app)
    def consumer(self, defaults: dict[str, Any] | None = None, **extra: Any) -> FakeConsumer:
        c = FakeConsumer(self, extra)
        self.consumers.append(c)
        return c

    def delete_topics(self, names: list[str], wait: bool = False, timeout: float = 30.0) -> None:
        with self.lock:
            self.deleted.extend(names)
            for name in names:
                self.topics.pop(name, None)

    @property
    def producer(self) -> FakeKafka:
        return self

    def poll(self, timeout: float = 0) -> int:
        return 0

    def role(self, which: str) -> list[FakeConsumer]:
        """The consumers made for role ``which`` (by their fetch wait), oldest first."""
        wait_ms = waiter_module.FRESH_FETCH_WAIT_MS if which == "replies" else waiter_module.SETTLED_FETCH_WAIT_MS
        return [c for c in self.consumers if c.config["fetch.wait.max.ms"] == wait_ms]


class FakeConsumer:
    """An assign-only consumer: reads its assigned topics from their offsets; ``stuck`` ones read nothing."""

    def __init__(self, fk: FakeKafka, config: dict[str, Any]) -> None:
        self.fk, self.config = fk, config
        self.assigned: dict[str, int] = {}
        self.assign_calls: list[list[tuple[str, int]]] = []
        self.events: list[Record] = []  # error events consume() returns next
        self.stuck = False
        self.closed = False

    def report(self, code: int) -> None:
        """What librdkafka does on a connection failure: call the consumer's ``error_cb``."""
        self.config["error_cb"](KafkaError(code))

    def incremental_assign(self, parts: list[Any]) -> None:
        assert not self.closed
        self.assign_calls.append([(tp.topic, tp.offset) for tp in parts])
        for tp in parts:
            self.assigned[tp.topic] = tp.offset

    def incremental_unassign(self, parts: list[Any]) -> None:
        missing = [tp.topic for tp in parts if tp.topic not in self.assigned]
        if missing:
            raise KafkaException(KafkaError(KafkaError._INVALID_ARG, f"not assigned: {missing}"))
        for tp in parts:
            del self.assigned[tp.topic]

    def unassign(self) -> None:
        self.assigned.clear()

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> None:
        return None

    def get_watermark_offsets(self, tp: Any, timeout: float = -1, cached: bool = False) -> tuple[int, int]:
        with self.fk.lock:
            return 0, len(self.fk.topics.get(tp.topic, []))

    def offsets_for_times(self, parts: list[Any], timeout: float = -1) -> list[Any]:
        """Records here carry no time: as if every one were older than asked (-1: none at or after it)."""
        return [TopicPartition(tp.topic, tp.partition, -1) for tp in parts]

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Record]:
        assert not self.closed
        out, self.events = self.events[:num_messages], self.events[num_messages:]
        if self.stuck:
            return out
        with self.fk.lock:
            for topic, offset in self.assigned.items():
                log = self.fk.topics.get(topic, [])
                take = log[offset:offset + num_messages - len(out)]
                out.extend(take)
                self.assigned[topic] = offset + len(take)
        return out

    def poll(self, timeout: float = -1) -> Record | None:
        got = self.consume(1, 0)
        return got[0] if got else None

    def close(self) -> None:
        self.closed = True


class Completions:
    """Stands in for ``fusion_celery.completion.complete``: records each call, raises while ``failures`` > 0."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.failures = 0
        self.lock = threading.Lock()

    def __call__(self, app: Any, wait: Wait, *, result: Any = None, exc: BaseException | None = None,
                 events: Any = None, done: dict[str, bool] | None = None) -> None:
        with self.lock:
            self.calls.append({"wait": wait, "result": result, "exc": exc, "done": done})
            if self.failures > 0:
                self.failures -= 1
                raise ConnectionError("Redis is away")

    def of(self, wait_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [c for c in self.calls if c["wait"].id == wait_id]


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture
def fk(monkeypatch) -> FakeKafka:
    fake = FakeKafka()
    for module in (waiter_module, ephemeral_module, leased_module):
        monkeypatch.setattr(module, "clients", lambda app: fake)
    return fake


@pytest.fixture
def completions(monkeypatch) -> Completions:
    fake = Completions()
    monkeypatch.setattr(waiter_module, "complete", fake)
    return fake


@pytest.fixture
def app():
    app = create_app(f"waiter-unit-{uuid.uuid4().hex[:6]}", backend="redis://", set_as_current=False)
    app.backend_cls = fake_redis_backend()  # the lease pool's state
    app.conf.fusion_registry_url = f"memory://waiter-unit-{uuid.uuid4().hex}"
    app.conf.worker_send_task_events = False
    reload(app)
    return app


@pytest.fixture
def reg(app) -> MemoryRegistry:
    return MemoryRegistry.shared(app, app.conf.fusion_registry_url)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def waiter(app, fk, completions, clock) -> Iterator[Waiter]:
    w = Waiter(app, "unit@host", now_ms=clock.now_ms, monotonic=clock.monotonic)
    w._open()
    yield w
    w._close()


def make_wait(clock: Clock, wait_id: str = "w1", topic: str = "rt.1", *, in_s: float = 60.0,
              **fields: Any) -> Wait:
    now = clock.now_ms()
    return Wait(id=wait_id, return_topic=topic, topic="svc", deadline=now + int(in_s * 1000), request={},
                created=now, dep="x", **fields)


def steps(w: Waiter, n: int = 3) -> None:
    for _ in range(n):
        w._step()


def current(w: Waiter, which: str) -> FakeConsumer:
    return getattr(w, which)


# -- replies ---------------------------------------------------------------------------------------
def test_a_reply_completes_its_wait_once_then_the_wait_and_its_topic_go(waiter, reg, fk, completions, clock):
    wait = make_wait(clock)
    reg.register(wait)
    steps(waiter, 1)
    assert current(waiter, "replies").assigned == {"rt.1": 0}, "a new wait is read by the fresh consumer"
    fk.send("rt.1", {"v": 1}, headers=[("fusion-id", b"w1"), ("fusion-status", b"ok")])
    fk.send("rt.1", {"v": 2}, headers=[("fusion-id", b"w1"), ("fusion-status", b"ok")])  # a second answer
    steps(waiter)
    [call] = completions.calls
    assert call["wait"] == wait and call["result"] == {"v": 1} and call["exc"] is None
    assert reg.pending() == [], "removed from the registry after its completion"
    assert fk.deleted == ["rt.1"]
    assert current(waiter, "replies").assigned == {}, "its topic is no longer read"
    assert waiter.status()["pending"] == 0 and waiter.completed == 1 and waiter.failed == 0


def test_a_plain_service_reply_without_headers_is_accepted(waiter, reg, fk, completions, clock):
    reg.register(make_wait(clock))
    steps(waiter, 1)
    fk.send("rt.1", [1, 2])
    steps(waiter)
    assert [c["result"] for c in completions.calls] == [[1, 2]]


@pytest.mark.parametrize("headers", [
    [("fusion-id", b"someone-else")],
    [("fusion-status", b"ok")],
    [("fusion-status", b"error")],
])
def test_a_record_that_is_not_a_reply_to_the_wait_is_dropped_and_counted(waiter, reg, fk, completions, clock,
                                                                          headers, caplog):
    reg.register(make_wait(clock))
    steps(waiter, 1)
    fk.send("rt.1", {"error": {"type": "X", "message": "spoofed"}}, headers=headers)
    with caplog.at_level(logging.WARNING, logger="fusion_celery.waiter"):
        steps(waiter)
    assert completions.calls == []
    assert waiter.rejected == 1 and waiter.status()["rejected"] == 1
    assert "dropped the record rt.1[0]@0" in caplog.text
    assert [w.id for w in reg.pending()] == ["w1"], "the wait still waits"
    fk.send("rt.1", "real", headers=[("fusion-id", b"w1")])
    steps(waiter)
    assert [c["result"] for c in completions.calls] == ["real"]


def test_with_the_id_required_a_reply_without_it_is_dropped(app, fk, completions, clock, reg):
    app.conf.fusion_reply_id_required = True
    reload(app)
    w = Waiter(app, "unit@host", now_ms=clock.now_ms, monotonic=clock.monotonic)
    w._open()
    try:
        reg.register(make_wait(clock))
        steps(w, 1)
        fk.send("rt.1", "no id")
        steps(w)
        assert completions.calls == [] and w.rejected == 1
        fk.send("rt.1", "with id", headers=[("fusion-id", b"w1")])
        steps(w)
        assert [c["result"] for c in completions.calls] == ["with id"]
    finally:
        w._close()


@pytest.mark.parametrize(("value", "headers", "message"), [
    (b"x" * 2000, [], "above the limit of 1000"),
    (json.dumps({"error": {"type": "KeyError", "message": "no such user"}}).encode(),
     [("fusion-status", b"error"), ("fusion-id", b"w1")], "replied with an error: KeyError: no such user"),
    (json.dumps({"error": {"type": "KeyError", "message": "no such user"}}).encode(), [],
     "replied with an error: KeyError: no such user"),
    (b"\xff not json", [], "sent an unreadable reply"),
    (None, [], "sent an unreadable reply"),
])
def test_an_oversized_unreadable_or_error_reply_fails_the_wait(app, waiter, reg, fk, completions, clock, value,
                                                               headers, message):
    app.conf.fusion_max_message_bytes = 1000
    reload(app)
    reg.register(make_wait(clock))
    steps(waiter, 1)
    fk.send("rt.1", value, headers=headers)
    steps(waiter)
    [call] = completions.calls
    assert isinstance(call["exc"], DependencyFailed) and not isinstance(call["exc"], DependencyTimeout)
    assert message in str(call["exc"]) and "dep 'x'" in str(call["exc"])
    assert waiter.failed == 1 and reg.pending() == [] and fk.deleted == ["rt.1"]


def test_a_wait_without_a_reply_times_out_at_its_deadline(waiter, reg, fk, completions, clock):
    reg.register(make_wait(clock, in_s=30))
    steps(waiter, 1)
    clock.advance(29.9)
    steps(waiter)
    assert completions.calls == []
    clock.advance(0.1)
    steps(waiter)
    [call] = completions.calls
    assert isinstance(call["exc"], DependencyTimeout)
    assert "did not reply within 30s (return topic rt.1)" in str(call["exc"])
    assert reg.pending() == [] and fk.deleted == ["rt.1"] and waiter.failed == 1


def test_a_failed_completion_is_retried_and_nothing_is_removed_before_it_succeeds(waiter, reg, fk, completions,
                                                                                   clock):
    reg.register(make_wait(clock))
    steps(waiter, 1)
    clock.advance(0.5)
    completions.failures = 2
    fk.send("rt.1", "answer", headers=[("fusion-id", b"w1")])
    steps(waiter)
    assert len(completions.calls) == 1
    assert waiter.status()["retrying"] == 1 and [w.id for w in reg.pending()] == ["w1"] and fk.deleted == []
    fk.send("rt.1", "a later record", headers=[("fusion-id", b"w1")])
    clock.advance(0.5)  # it settles: the settled consumer reads the topic again from offset 0
    steps(waiter)
    assert current(waiter, "settled").assigned == {"rt.1": 2}, "both records were read again"
    assert len(completions.calls) == 1, "records read while a completion is pending do not complete it again"
    clock.advance(0.5)  # 1 s after the first failure
    steps(waiter, 1)
    assert len(completions.calls) == 2 and [w.id for w in reg.pending()] == ["w1"]
    clock.advance(1.9)
    steps(waiter)
    assert len(completions.calls) == 2
    clock.advance(0.1)  # 2 s after the second failure
    steps(waiter, 1)
    assert len(completions.calls) == 3
    assert [c["result"] for c in completions.calls] == ["answer"] * 3, "retried with the outcome first tried"
    assert len({id(c["done"]) for c in completions.calls}) == 1, "one record of the steps done across tries"
    assert reg.pending() == [] and fk.deleted == ["rt.1"]
    assert waiter.status()["retrying"] == 0 and waiter.completed == 1


def test_a_registry_that_cannot_remove_a_finished_wait_does_not_stop_the_waiter(waiter, reg, fk, completions,
                                                                                  clock, monkeypatch):
    reg.register(make_wait(clock))
    steps(waiter, 1)
    remove = reg.remove
    monkeypatch.setattr(reg, "remove", lambda wait: (_ for _ in ()).throw(ConnectionError("registry away")))
    fk.send("rt.1", "answer", headers=[("fusion-id", b"w1")])
    steps(waiter)
    assert len(completions.calls) == 1 and waiter.completed == 1
    assert [w.id for w in reg.pending()] == ["w1"] and fk.deleted == [], "kept, its topic too, until removed"
    monkeypatch.setattr(reg, "remove", remove)
    clock.advance(1.0)
    steps(waiter, 1)
    assert reg.pending() == [] and fk.deleted == ["rt.1"]
    assert len(completions.calls) == 1, "the wait is not completed again"


def test_a_timeout_whose_completion_fails_is_retried_as_a_timeout(waiter, reg, fk, completions, clock):
    reg.register(make_wait(clock, in_s=1))
    steps(waiter, 1)
    completions.failures = 1
    clock.advance(1)
    steps(waiter, 1)
    fk.send("rt.1", "too late", headers=[("fusion-id", b"w1")])
    clock.advance(1)
    steps(waiter)
    assert len(completions.calls) == 2
    assert all(isinstance(c["exc"], DependencyTimeout) for c in completions.calls)
    assert reg.pending() == []


# -- the waits held --------------------------------------------------------------------------------
def test_a_wait_moves_from_the_fresh_to_the_settled_consumer(waiter, reg, fk, completions, clock):
    reg.register(make_wait(clock))
    steps(waiter, 1)
    clock.advance(FRESH_SECONDS - 0.01)
    steps(waiter)
    assert current(waiter, "replies").assigned == {"rt.1": 0} and current(waiter, "settled").assigned == {}
    clock.advance(0.01)
    steps(waiter)
    assert current(waiter, "replies").assigned == {} and current(waiter, "settled").assigned == {"rt.1": 0}
    fk.send("rt.1", "late", headers=[("fusion-id", b"w1")])
    steps(waiter)
    assert [c["result"] for c in completions.calls] == ["late"]
    assert current(waiter, "settled").assigned == {}


def test_a_wait_registered_again_follows_its_new_topic(waiter, reg, fk, completions, clock):
    reg.register(make_wait(clock, topic="rt.old"))
    steps(waiter, 1)
    assert current(waiter, "replies").assigned == {"rt.old": 0}
    reg.register(make_wait(clock, topic="rt.new"))  # its task ran again and sent a new request
    steps(waiter, 1)
    assert current(waiter, "replies").assigned == {"rt.new": 0}, "the old topic is unassigned, the new one read"
    assert "rt.old" in fk.deleted, "nobody reads the old topic any more: it is deleted"
    fk.send("rt.new", "new answer", headers=[("fusion-id", b"w1")])
    steps(waiter)
    assert [c["result"] for c in completions.calls] == ["new answer"]
    assert [c["wait"].return_topic for c in completions.calls] == ["rt.new"]


def test_a_late_record_on_the_replaced_topic_is_ignored(waiter, reg, fk, completions, clock):
    reg.register(make_wait(clock, topic="rt.old"))
    steps(waiter, 1)
    fk.send("rt.old", "old answer", headers=[("fusion-id", b"w1")])
    current(waiter, "replies").stuck = True  # not read before the new registration arrives
    reg.register(make_wait(clock, topic="rt.new"))
    steps(waiter)
    current(waiter, "replies").stuck = False
    steps(waiter)
    assert completions.calls == []
    assert waiter.status()["pending"] == 1


def test_a_wait_removed_or_dropped_from_the_registry_is_no_longer_read(waiter, reg, fk, completions, clock):
    wait = make_wait(clock)
    reg.register(wait)
    steps(waiter, 1)
    reg.remove(wait)  # another waiter completed it (a rebalance) or the reaper removed it
    steps(waiter, 1)
    assert current(waiter, "replies").assigned == {} and waiter.status()["pending"] == 0
    fk.send("rt.1", "answer", headers=[("fusion-id", b"w1")])
    clock.advance(120)
    steps(waiter)
    assert completions.calls == [], "neither a reply nor a timeout completes a wait no longer held"


def test_status_reports_the_waits_held(waiter, reg, fk, completions, clock):
    reg.register(make_wait(clock, "a", "rt.a"))
    clock.advance(2.5)
    reg.register(make_wait(clock, "b", "rt.b"))
    steps(waiter, 1)
    st = waiter.status()
    assert st["pending"] == 2 and st["oldest"] == {"id": "a", "topic": "svc", "dep": "x"}
    assert st["oldest_age_s"] == 2.5 and st["by_topic"] == {"svc": 2}
    assert (st["completed"], st["failed"], st["rejected"], st["retrying"], st["consumers_replaced"]) == (0,) * 5


# -- replacing the consumers -----------------------------------------------------------------------
def two_waits_on_stuck_consumers(waiter: Waiter, reg: MemoryRegistry, fk: FakeKafka, clock: Clock) -> None:
    """``s`` on the settled consumer and ``f`` on the fresh one, both answered, neither consumer reading."""
    reg.register(make_wait(clock, "s", "rt.s"))
    steps(waiter, 1)
    clock.advance(FRESH_SECONDS)
    steps(waiter, 1)
    reg.register(make_wait(clock, "f", "rt.f"))
    steps(waiter, 1)
    for c in (current(waiter, "replies"), current(waiter, "settled")):
        c.stuck = True
    fk.send("rt.s", "s answer", headers=[("fusion-id", b"s")])
    fk.send("rt.f", "f answer", headers=[("fusion-id", b"f")])
    assert current(waiter, "replies").assigned == {"rt.f": 0} and current(waiter, "settled").assigned == {"rt.s": 0}


def test_after_an_outage_both_consumers_are_replaced_and_every_wait_is_read_again_from_offset_0(
        waiter, reg, fk, completions, clock, caplog):
    reg.register(make_wait(clock, "s", "rt.s"))
    steps(waiter, 1)
    clock.advance(FRESH_SECONDS)
    steps(waiter, 1)
    old_replies, old_settled = current(waiter, "replies"), current(waiter, "settled")
    assert old_settled.assigned == {"rt.s": 0}
    old_replies.report(KafkaError._TRANSPORT)  # Kafka went away
    clock.advance(3)
    old_settled.report(KafkaError._ALL_BROKERS_DOWN)  # still away: the quiet period starts again
    clock.advance(OUTAGE_QUIET_SECONDS - 0.5)
    reg.register(make_wait(clock, "f", "rt.f"))
    steps(waiter, 1)
    assert current(waiter, "replies") is old_replies and current(waiter, "settled") is old_settled
    assert old_replies.assigned == {"rt.f": 0}
    # Both waits are answered; the consumers that lived through the outage never deliver the answers.
    old_replies.stuck = old_settled.stuck = True
    fk.send("rt.s", "s answer", headers=[("fusion-id", b"s")])
    fk.send("rt.f", "f answer", headers=[("fusion-id", b"f")])
    steps(waiter)
    assert completions.calls == []
    clock.advance(0.5)
    with caplog.at_level(logging.INFO, logger="fusion_celery.waiter"):
        steps(waiter, 1)
    new_replies, new_settled = current(waiter, "replies"), current(waiter, "settled")
    assert new_replies is not old_replies and new_settled is not old_settled
    assert old_replies.closed and old_settled.closed
    assert new_replies.assign_calls[0] == [("rt.f", 0)] and new_settled.assign_calls[0] == [("rt.s", 0)]
    assert "replaced both reply consumers after a Kafka outage" in caplog.text
    assert "1 fresh and 1 settled waits read again from offset 0" in caplog.text
    steps(waiter)
    assert sorted(c["result"] for c in completions.calls) == ["f answer", "s answer"]
    assert waiter.status()["consumers_replaced"] == 1 and reg.pending() == []
    clock.advance(60)
    steps(waiter)
    assert waiter.consumers_replaced == 1, "once per outage"


def test_an_error_event_from_consume_counts_as_an_outage_too(waiter, reg, fk, completions, clock):
    two_waits_on_stuck_consumers(waiter, reg, fk, clock)
    old = current(waiter, "settled")
    old.events.append(Record("", -1, None, err=KafkaError(KafkaError._TIMED_OUT)))
    steps(waiter, 1)
    clock.advance(OUTAGE_QUIET_SECONDS)
    steps(waiter, 1)
    assert current(waiter, "settled") is not old and old.closed and waiter.consumers_replaced == 1
    steps(waiter)
    assert len(completions.calls) == 2


@pytest.mark.parametrize("code", [KafkaError.LEADER_NOT_AVAILABLE, KafkaError._PARTITION_EOF,
                                  KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._AUTHENTICATION])
def test_errors_that_are_not_an_outage_replace_nothing(waiter, reg, fk, completions, clock, code):
    reg.register(make_wait(clock))
    steps(waiter, 1)
    old = current(waiter, "replies")
    old.report(code)
    old.events.append(Record("rt.1", -1, None, err=KafkaError(code)))
    steps(waiter, 1)
    clock.advance(OUTAGE_QUIET_SECONDS + 1)
    steps(waiter)
    assert current(waiter, "replies") is old and waiter.consumers_replaced == 0


def test_the_errors_of_a_consumer_already_replaced_are_ignored(waiter, reg, fk, completions, clock):
    reg.register(make_wait(clock))
    steps(waiter, 1)
    first = current(waiter, "replies")
    waiter.on_kafka_error(KafkaError(KafkaError._TRANSPORT))  # the error path, called directly
    clock.advance(OUTAGE_QUIET_SECONDS)
    steps(waiter, 1)
    assert waiter.consumers_replaced == 1 and first.closed
    first.report(KafkaError._TRANSPORT)  # e.g. while it closed
    clock.advance(OUTAGE_QUIET_SECONDS + 1)
    steps(waiter)
    assert waiter.consumers_replaced == 1
    current(waiter, "replies").report(KafkaError._TRANSPORT)  # the new one's errors count
    clock.advance(OUTAGE_QUIET_SECONDS)
    steps(waiter, 1)
    assert waiter.consumers_replaced == 2


def test_a_consumer_given_too_many_topics_is_replaced_with_the_waits_it_holds(app, fk, completions, clock, reg,
                                                                              caplog):
    app.conf.fusion_kafka_client_recycle_topics = 3
    reload(app)
    w = Waiter(app, "unit@host", now_ms=clock.now_ms, monotonic=clock.monotonic)
    w._open()
    try:
        for i in range(4):
            reg.register(make_wait(clock, f"w{i}", f"rt.{i}"))
            steps(w, 1)
        first = current(w, "replies")
        fk.send("rt.0", "zero", headers=[("fusion-id", b"w0")])
        fk.send("rt.1", "one", headers=[("fusion-id", b"w1")])
        steps(w, 1)
        assert current(w, "replies") is first, "given 4 topics, holding 2: 2 more than it holds, below the limit"
        fk.send("rt.2", "two", headers=[("fusion-id", b"w2")])
        with caplog.at_level(logging.INFO, logger="fusion_celery.waiter"):
            steps(w, 1)
        assert current(w, "replies") is not first and first.closed
        assert current(w, "replies").assigned == {"rt.3": 0}
        assert "replaced its replies consumer after 4 return topics (1 waits carried over)" in caplog.text
        fk.send("rt.3", "three", headers=[("fusion-id", b"w3")])
        steps(w)
        assert [c["result"] for c in completions.calls] == ["zero", "one", "two", "three"]
        assert w.consumers_replaced == 0, "a recycling is not an outage replacement"
    finally:
        w._close()


# -- the thread ------------------------------------------------------------------------------------
def wait_until(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


def test_the_thread_serves_replies_and_stops_leaving_the_rest_to_the_others(app, fk, completions, reg, caplog):
    w = Waiter(app, "unit@host")
    w.start()
    try:
        assert w.ready.wait(5), "ready once it follows the registry"
        now = int(time.time() * 1000)
        for i in range(2):
            reg.register(Wait(id=f"t{i}", return_topic=f"rt.t{i}", topic="svc", deadline=now + 60_000, request={},
                              created=now))
        fk.send("rt.t0", "done", headers=[("fusion-id", b"t0")])
        wait_until(lambda: len(completions.calls) == 1, 5, "the reply to be completed")
        wait_until(lambda: "rt.t0" in fk.deleted, 5, "the return topic to be deleted")
        assert w.status()["pending"] == 1 and [x.id for x in reg.pending()] == ["t1"]
    finally:
        with caplog.at_level(logging.INFO, logger="fusion_celery.waiter"):
            w.stop(5)
    assert not w.is_alive()
    assert all(c.closed for c in fk.consumers)
    assert reg._watchers == [], "it left the waiters"
    assert "waiter: stopped (1 completed, 0 failed, 0 records rejected, 1 left to the others)" in caplog.text


# -- on the in-process Kafka stub (fusion_celery.testing.kafka) -------------------------------------
@pytest.fixture
def stub(app, completions, clock) -> Iterator[tuple[Waiter, Any, Any]]:
    """A waiter whose clients are the real ``clients(app)`` on an in-memory broker; its producer."""
    from fusion_celery.clients import close_clients
    from fusion_celery.testing.kafka import Broker, Producer
    name = f"waiter-unit-{uuid.uuid4().hex[:8]}"
    app.conf.fusion_kafka_bootstrap_servers = f"memory://{name}"
    reload(app)
    broker = Broker.named(name)
    producer = Producer({"bootstrap.servers": f"memory://{name}"})
    w = Waiter(app, "unit@host", now_ms=clock.now_ms, monotonic=clock.monotonic)
    w._open()
    try:
        yield w, broker, producer
    finally:
        w._close()
        producer.close()
        close_clients(app)
        Broker.forget(name)


def answer(producer: Any, topic: str, value: Any, wait_id: str) -> None:
    producer.produce(topic, json.dumps(value).encode(), headers=[("fusion-id", wait_id.encode())])
    producer.flush(5)


def test_on_the_stub_a_reply_completes_its_wait_and_its_topic_is_deleted(stub, reg, completions, clock):
    w, broker, producer = stub
    broker.create_topic("rt.1", 1)
    reg.register(make_wait(clock))
    steps(w, 1)
    answer(producer, "rt.1", {"ok": True}, "w1")
    steps(w)
    assert [c["result"] for c in completions.calls] == [{"ok": True}]
    assert reg.pending() == [] and "rt.1" not in broker.topics


def test_on_the_stub_an_outage_replaces_both_consumers_and_nothing_is_completed_twice(stub, reg, completions, clock,
                                                                                      caplog):
    w, broker, producer = stub
    for topic in ("rt.a", "rt.b"):
        broker.create_topic(topic, 1)
    reg.register(make_wait(clock, "a", "rt.a"))
    reg.register(make_wait(clock, "b", "rt.b"))
    steps(w, 1)
    clock.advance(FRESH_SECONDS)
    steps(w, 1)  # both on the settled consumer
    old_replies, old_settled = w.replies, w.settled
    broker.down()
    steps(w)  # the consumers report the outage from their poll
    clock.advance(2)
    broker.up()
    answer(producer, "rt.a", "a answer", "a")
    steps(w)
    assert [c["result"] for c in completions.calls] == ["a answer"], "read before the replacement"
    assert w.replies is old_replies and w.settled is old_settled
    clock.advance(OUTAGE_QUIET_SECONDS - 2)
    with caplog.at_level(logging.INFO, logger="fusion_celery.waiter"):
        steps(w, 1)
    assert w.replies is not old_replies and w.settled is not old_settled and w.consumers_replaced == 1
    assert "0 fresh and 1 settled waits read again from offset 0" in caplog.text
    assert [(tp.topic, tp.offset) for tp in w.settled.assignment()] == [("rt.b", 0)]
    answer(producer, "rt.b", "b answer", "b")
    steps(w)
    assert [c["result"] for c in completions.calls] == ["a answer", "b answer"]
    assert reg.pending() == []


# -- reply channels --------------------------------------------------------------------------------
def test_a_leased_wait_reads_from_its_lease_offset_and_its_topic_cools_down_instead_of_being_deleted(
        waiter, reg, fk, completions, clock):
    fk.send("rt.L", "the previous lease's reply")  # no id: only the offset tells it from this wait's
    reg.register(make_wait(clock, "w1", "rt.L", channel="leased", offset=1, pool="p1"))
    steps(waiter, 1)
    assert current(waiter, "replies").assigned == {"rt.L": 1}
    fk.send("rt.L", "this one")
    steps(waiter)
    [call] = completions.calls
    assert call["result"] == "this one" and reg.pending() == []
    assert fk.deleted == [], "a leased topic is not deleted"
    [(_, wait_id, opened, next_offset)] = waiter.channels["leased"]._cooling
    assert (wait_id, opened.return_topic, opened.pool, next_offset) == ("w1", "rt.L", "p1", 2)


def test_a_leased_wait_whose_topic_got_a_record_with_another_id_retires_the_topic(waiter, reg, fk, completions,
                                                                                   clock, monkeypatch):
    retired = []
    monkeypatch.setattr(waiter.channels["leased"], "retire", lambda wait_id, opened: retired.append(wait_id))
    reg.register(make_wait(clock, "w1", "rt.L", channel="leased", offset=0, pool="p1"))
    steps(waiter, 1)
    fk.send("rt.L", "forged", headers=[("fusion-id", b"somebody-else")])
    fk.send("rt.L", "real", headers=[("fusion-id", b"w1")])
    steps(waiter)
    assert [c["result"] for c in completions.calls] == ["real"] and waiter.rejected == 1
    assert retired == ["w1"] and waiter.channels["leased"]._cooling == []


def test_of_two_waits_on_one_leased_topic_the_earlier_lease_is_removed_and_never_read(waiter, reg, fk, completions,
                                                                                      clock):
    """A waiter that died between completing a wait and removing it leaves the wait in the registry while its
    topic is leased again: the later lease is the topic's reader."""
    reg.register(make_wait(clock, "old", "rt.L", channel="leased", offset=0, pool="p1"))
    reg.register(make_wait(clock, "new", "rt.L", channel="leased", offset=1, pool="p1"))
    steps(waiter, 1)
    assert [w.id for w in reg.pending()] == ["new"] and "old" not in waiter.book
    fk.send("rt.L", "old reply")
    fk.send("rt.L", "new reply")
    steps(waiter)
    assert [(c["wait"].id, c["result"]) for c in completions.calls] == [("new", "new reply")]


def test_a_shared_reply_read_before_its_wait_was_reported_completes_it_when_it_is(waiter, reg, fk, completions,
                                                                                 clock):
    reg.register(make_wait(clock, "w1", "rt.shared.0", channel="shared"))
    steps(waiter, 1)
    assert "rt.shared.0" in current(waiter, "replies").assigned
    fk.send("rt.shared.0", "for w2", headers=[("fusion-id", b"w2")])  # its wait is not reported yet
    fk.send("rt.shared.0", "no id")  # nobody can tell whose: dropped
    steps(waiter)
    assert completions.calls == [] and waiter.rejected == 1
    reg.register(make_wait(clock, "w2", "rt.shared.0", channel="shared"))
    fk.send("rt.shared.0", "for w1", headers=[("fusion-id", b"w1")])
    steps(waiter)
    assert sorted((c["wait"].id, c["result"]) for c in completions.calls) == [("w1", "for w1"), ("w2", "for w2")]
    assert fk.deleted == [] and "rt.shared.0" in current(waiter, "replies").assigned, "a shared topic stays"
