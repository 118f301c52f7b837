"""The in-memory Kafka stub (fusion_celery.testing.kafka) behaves as confluent-kafka on a real broker does.

No service is needed: every test has a broker of its own, named after it.
"""

from __future__ import annotations

import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    OFFSET_INVALID,
    TIMESTAMP_CREATE_TIME,
    TIMESTAMP_LOG_APPEND_TIME,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    NewTopic,
    ResourcePatternType,
    ResourceType,
)

from fusion_celery.testing.broker import partition_for
from fusion_celery.testing.kafka import AdminClient, Broker, Consumer, Producer


# -- helpers -------------------------------------------------------------------------------------------------
def until(cond: Callable[[], Any], timeout: float = 5.0, step: Callable[[], Any] | None = None,
          what: str = "the condition") -> Any:
    """Run ``step`` (e.g. a short poll, which blocks on the broker) until ``cond()`` holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        found = cond()
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        if step is not None:
            step()
        else:
            time.sleep(0.01)


class Kit:
    """A broker of its own, with clients on it that are closed at the end of the test."""

    def __init__(self, name: str) -> None:
        self.servers = f"memory://{name}"
        self.broker = Broker.named(name)
        self.admin = AdminClient({"bootstrap.servers": self.servers})
        self.clients: list[Any] = [self.admin]

    def producer(self, **config: Any) -> Producer:
        p = Producer({"bootstrap.servers": self.servers, **config})
        self.clients.append(p)
        return p

    def consumer(self, group: str = "g", **config: Any) -> Consumer:
        c = Consumer({"bootstrap.servers": self.servers, "group.id": group, "auto.offset.reset": "earliest",
                      **config})
        self.clients.append(c)
        return c

    def topic(self, name: str, partitions: int = 1, **config: str) -> str:
        self.admin.create_topics([NewTopic(name, partitions, 1, config=config)])[name].result(1)
        return name

    def send(self, topic: str, value: Any, **kw: Any) -> Any:
        """Produce one record and return its delivery report (fails the test on an error)."""
        p = self.producer()
        got: list[Any] = []
        p.produce(topic, value, on_delivery=lambda err, msg: got.append((err, msg)), **kw)
        assert p.flush(2) == 0
        err, msg = got[0]
        assert err is None, err
        return msg

    def close(self) -> None:
        self.broker.up()
        for c in reversed(self.clients):
            try:
                if isinstance(c, Producer):
                    c.purge()  # nothing left to wait for at close
                c.close()
            except RuntimeError:  # the test closed it already
                pass
        Broker.forget(self.broker.name)


@pytest.fixture
def kit(request) -> Iterator[Kit]:
    k = Kit(f"{request.node.name}-{uuid.uuid4().hex[:6]}")
    yield k
    k.close()


def read(c: Consumer, count: int, timeout: float = 2.0) -> list[Any]:
    """``count`` records (errors skipped) from ``c``."""
    out: list[Any] = []
    until(lambda: len(out) >= count, timeout, lambda: out.extend(m for m in c.consume(count - len(out), 0.05)
                                                                 if m.error() is None), f"{count} records")
    return out


def code(exc_info: pytest.ExceptionInfo) -> int:
    return exc_info.value.args[0].code()


# -- producing -----------------------------------------------------------------------------------------------
def test_offsets_count_from_zero_in_each_partition_and_delivery_reports_name_them(kit):
    kit.topic("t", partitions=2)
    p = kit.producer()
    reports: list[Any] = []
    for i in range(4):
        p.produce("t", f"v{i}".encode(), partition=i % 2, on_delivery=lambda err, msg: reports.append((err, msg)))
    assert len(p) == 4  # reports wait for poll/flush
    assert p.flush(1) == 0 and len(p) == 0
    assert [(e, m.topic(), m.partition(), m.offset(), m.value()) for e, m in reports] == [
        (None, "t", 0, 0, b"v0"), (None, "t", 1, 0, b"v1"), (None, "t", 0, 1, b"v2"), (None, "t", 1, 1, b"v3")]
    assert all(m.headers() is None for _, m in reports)  # like librdkafka's delivery reports
    assert kit.broker.watermarks("t", 0) == (0, 2)


def test_the_key_decides_the_partition_as_librdkafka_hashes_it(kit):
    kit.topic("t", partitions=5)
    for key in ("a", "b", "order-17", "zz"):
        parts = {kit.send("t", b"x", key=key).partition() for _ in range(3)}
        assert parts == {zlib.crc32(key.encode()) % 5}
    assert kit.send("t", b"x", key="a", partition=3).partition() == 3  # an explicit partition wins
    # The Java client's murmur2 (Kafka's own test vector: murmur2(b"21") == -973932308).
    assert partition_for(b"21", 1000, "murmur2") == (-973932308 & 0x7FFFFFFF) % 1000
    murmur = kit.producer(partitioner="murmur2_random")
    got: list[Any] = []
    murmur.produce("t", b"x", key=b"21", on_delivery=lambda e, m: got.append(m.partition()))
    murmur.flush(1)
    assert got == [(-973932308 & 0x7FFFFFFF) % 5]


def test_keys_headers_and_timestamps_reach_the_consumer(kit):
    kit.topic("t")
    kit.topic("appended", **{"message.timestamp.type": "LogAppendTime"})
    before = int(time.time() * 1000)
    kit.send("t", "text", key="k", headers=[("a", b"1"), ("b", None), ("a", "2")])
    kit.send("t", b"old", timestamp=1234, headers={"h": b"v"})
    kit.send("t", None, key=b"tombstone")
    kit.send("appended", b"x", timestamp=1234)
    c = kit.consumer()
    c.assign([TopicPartition("t", 0, 0), TopicPartition("appended", 0, 0)])
    msgs = {(m.topic(), m.offset()): m for m in read(c, 4)}
    first = msgs[("t", 0)]
    assert (first.key(), first.value(), first.headers()) == (b"k", b"text", [("a", b"1"), ("b", None), ("a", b"2")])
    assert first.timestamp()[0] == TIMESTAMP_CREATE_TIME and first.timestamp()[1] >= before
    assert msgs[("t", 1)].timestamp() == (TIMESTAMP_CREATE_TIME, 1234) and msgs[("t", 1)].headers() == [("h", b"v")]
    assert (msgs[("t", 2)].key(), msgs[("t", 2)].value(), msgs[("t", 2)].headers()) == (b"tombstone", None, None)
    kind, stamp = msgs[("appended", 0)].timestamp()
    assert kind == TIMESTAMP_LOG_APPEND_TIME and stamp >= before


def test_the_producer_refuses_what_librdkafka_refuses(kit):
    kit.topic("t", partitions=2)
    p = kit.producer(**{"message.max.bytes": 1000, "queue.buffering.max.messages": 2})
    with pytest.raises(KafkaException) as too_large:
        p.produce("t", b"x" * 1000)
    assert code(too_large) == KafkaError.MSG_SIZE_TOO_LARGE
    with pytest.raises(KafkaException) as no_partition:
        p.produce("t", b"x", partition=2)
    assert code(no_partition) == KafkaError._UNKNOWN_PARTITION
    with pytest.raises(TypeError):
        p.produce("t", b"x", headers=[("a", 5)])
    p.produce("t", b"1")
    p.produce("t", b"2")
    with pytest.raises(BufferError):
        p.produce("t", b"3")
    assert p.flush(1) == 0
    p.produce("t", b"3")  # room again once the reports were served
    kit.topic("small", **{"max.message.bytes": "100"})
    reports: list[Any] = []
    p.produce("small", b"x" * 200, on_delivery=lambda e, m: reports.append(e))
    p.flush(1)
    assert reports[0].code() == KafkaError.MSG_SIZE_TOO_LARGE  # refused by the topic, in the report
    p.close()
    with pytest.raises(RuntimeError, match="closed"):
        p.produce("t", b"x")
    with pytest.raises(KafkaException) as not_memory:
        Producer({"bootstrap.servers": "127.0.0.1:9092"})
    assert code(not_memory) == KafkaError._INVALID_ARG
    with pytest.raises(ValueError, match="group.id"):
        Consumer({"bootstrap.servers": kit.servers})


def test_a_record_for_a_missing_topic_waits_for_it_then_fails(kit):
    p = kit.producer(**{"topic.metadata.propagation.max.ms": 300})
    reports: dict[str, Any] = {}
    p.produce("never", b"x", on_delivery=lambda e, m: reports.update(never=(e, m)))
    p.produce("soon", b"x", on_delivery=lambda e, m: reports.update(soon=(e, m)))
    kit.topic("soon")
    started = time.monotonic()
    assert p.flush(3) == 0
    assert reports["soon"][0] is None and reports["soon"][1].offset() == 0
    err, msg = reports["never"]
    assert err.code() == KafkaError._UNKNOWN_TOPIC and msg.offset() is None and msg.partition() is None
    assert 0.2 < time.monotonic() - started < 2
    md = kit.admin.list_topics("never", timeout=1)
    assert md.topics["never"].error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART and not md.topics["never"].partitions
    kit.broker.auto_create_topics = True  # the broker's auto.create.topics.enable
    assert kit.send("made-by-producing", b"x").offset() == 0
    assert len(kit.admin.list_topics(timeout=1).topics["made-by-producing"].partitions) == 1


def test_a_record_for_a_known_topic_that_was_deleted_fails_at_once_as_librdkafkas_does(kit):
    """librdkafka waits ``topic.metadata.propagation.max.ms`` only for a topic it never saw: one it knew is
    refused by the broker, and the metadata refresh that follows marks it gone (``rd_kafka_topic_set_notexists``)."""
    p = kit.producer()  # the default allowance: 30 s
    kit.topic("listed")
    kit.topic("written")
    assert p.list_topics("listed", timeout=1).topics["listed"].error is None
    p.produce("written", b"first")
    assert p.flush(1) == 0
    for name in ("listed", "written"):
        kit.admin.delete_topics([name])[name].result(1)
    reports: dict[str, Any] = {}
    started = time.monotonic()
    for name in ("listed", "written"):
        p.produce(name, b"x", on_delivery=lambda e, m, name=name: reports.update({name: e}))
    assert p.flush(1) == 0 and time.monotonic() - started < 0.5
    assert {n: e.code() for n, e in reports.items()} == {"listed": KafkaError.UNKNOWN_TOPIC_OR_PART,
                                                        "written": KafkaError.UNKNOWN_TOPIC_OR_PART}
    with pytest.raises(KafkaException) as gone:  # known to be gone now: refused before it is queued
        p.produce("listed", b"y")
    assert code(gone) == KafkaError._UNKNOWN_TOPIC
    kit.topic("listed")  # made again
    p.produce("listed", b"z")
    assert p.flush(1) == 0


def test_a_metadata_answer_that_lists_a_known_topic_as_missing_makes_produce_refuse_it(kit):
    p = kit.producer()
    kit.topic("t")
    p.list_topics("t", timeout=1)
    kit.admin.delete_topics(["t"])["t"].result(1)
    assert p.list_topics("t", timeout=1).topics["t"].error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART
    with pytest.raises(KafkaException) as gone:
        p.produce("t", b"x")
    assert code(gone) == KafkaError._UNKNOWN_TOPIC


# -- consuming -----------------------------------------------------------------------------------------------
def test_an_assigned_partition_of_a_missing_topic_reports_unknown_topic_once(kit):
    c = kit.consumer()
    c.assign([TopicPartition("ghost", 0, 0)])
    events = c.consume(10, timeout=0.1)
    assert [(m.topic(), m.partition(), m.error().code()) for m in events] == [
        ("ghost", 0, KafkaError.UNKNOWN_TOPIC_OR_PART)]
    assert c.consume(10, timeout=0.05) == []
    kit.topic("ghost")
    kit.send("ghost", b"here")
    assert [m.value() for m in read(c, 1)] == [b"here"]


def test_auto_offset_reset_applies_without_a_committed_offset(kit):
    kit.topic("t")
    kit.send("t", b"old")
    latest = kit.consumer(group="late", **{"auto.offset.reset": "latest"})
    earliest = kit.consumer(group="early")
    for c in (latest, earliest):
        c.assign([TopicPartition("t", 0)])
    assert latest.consume(10, timeout=0.05) == []  # its start is now the end of the partition
    kit.send("t", b"new")
    assert [m.value() for m in read(earliest, 2)] == [b"old", b"new"]
    assert [m.value() for m in read(latest, 1)] == [b"new"]


def test_logical_offsets_seek_and_position(kit):
    kit.topic("t")
    for i in range(5):
        kit.send("t", str(i))
    c = kit.consumer()
    c.assign([TopicPartition("t", 0, OFFSET_END)])
    assert c.position([TopicPartition("t", 0)])[0].offset == OFFSET_INVALID  # nothing returned yet
    assert c.consume(5, timeout=0.05) == []
    c.assign([TopicPartition("t", 0, OFFSET_BEGINNING)])
    assert [m.offset() for m in read(c, 2)] == [0, 1]
    assert c.position([TopicPartition("t", 0)])[0].offset == 2
    c.seek(TopicPartition("t", 0, 4))
    assert [m.value() for m in read(c, 1)] == [b"4"]
    c.assign([TopicPartition("t", 0, 99)])  # out of range: auto.offset.reset (earliest)
    assert read(c, 1)[0].offset() == 0
    with pytest.raises(KafkaException) as not_assigned:
        c.seek(TopicPartition("other", 0, 1))
    assert code(not_assigned) == KafkaError._STATE


def test_partition_eof_is_reported_only_when_enabled(kit):
    kit.topic("t", partitions=2)
    kit.send("t", b"x", partition=0)
    quiet, eof = kit.consumer(group="a"), kit.consumer(group="b", **{"enable.partition.eof": True})
    for c in (quiet, eof):
        c.assign([TopicPartition("t", 0, 0), TopicPartition("t", 1, 0)])
    assert [m.value() for m in quiet.consume(10, timeout=0.1)] == [b"x"]
    got = eof.consume(10, timeout=0.1)
    ends = sorted((m.partition(), m.offset()) for m in got if m.error() is not None)
    assert all(m.error().code() == KafkaError._PARTITION_EOF for m in got if m.error() is not None)
    assert ends == [(0, 1), (1, 0)] and [m.value() for m in got if m.error() is None] == [b"x"]
    assert eof.consume(10, timeout=0.05) == []  # once per end reached
    kit.send("t", b"y", partition=0)
    assert [(m.value(), m.error() and m.error().code()) for m in eof.consume(10, timeout=0.1)] == [
        (b"y", None), (b"Fetch from broker 0 reached end of partition at offset 2", KafkaError._PARTITION_EOF)]


def test_poll_waits_for_a_record_and_consume_for_a_full_batch(kit):
    kit.topic("t")
    c = kit.consumer()
    c.assign([TopicPartition("t", 0, 0)])
    timer = threading.Timer(0.2, lambda: kit.send("t", b"late"))
    timer.start()
    started = time.monotonic()
    msg = c.poll(5)
    waited = time.monotonic() - started
    timer.join()
    assert msg.value() == b"late" and 0.15 < waited < 1.0  # woken by the record, not by the timeout
    kit.send("t", b"one")
    started = time.monotonic()
    assert len(c.consume(2, timeout=0.3)) == 1 and time.monotonic() - started >= 0.29  # waited for a second one
    for v in (b"a", b"b"):
        kit.send("t", v)
    started = time.monotonic()
    assert [m.value() for m in c.consume(2, timeout=5)] == [b"a", b"b"] and time.monotonic() - started < 1
    c.close()
    with pytest.raises(RuntimeError, match="Consumer closed"):
        c.poll(0)


def test_pause_stops_reading_a_partition_until_resumed(kit):
    kit.topic("t", partitions=2)
    c = kit.consumer()
    c.assign([TopicPartition("t", 0, 0), TopicPartition("t", 1, 0)])
    c.pause([TopicPartition("t", 0)])
    kit.send("t", b"p0", partition=0)
    kit.send("t", b"p1", partition=1)
    assert [m.value() for m in c.consume(10, timeout=0.1)] == [b"p1"]
    c.resume([TopicPartition("t", 0)])
    assert [m.value() for m in read(c, 1)] == [b"p0"]


# -- groups and offsets ----------------------------------------------------------------------------------------
class Member:
    """A subscribed consumer that records its rebalance callbacks."""

    def __init__(self, kit: Kit, topic: str, group: str = "g", **config: Any) -> None:
        self.consumer = kit.consumer(group=group, **config)
        self.events: list[tuple[str, list[tuple[str, int]]]] = []
        self.records: list[Any] = []
        self.consumer.subscribe([topic], on_assign=self.on("assign"), on_revoke=self.on("revoke"),
                                on_lost=self.on("lost"))

    def on(self, kind: str) -> Callable[[Consumer, list[TopicPartition]], None]:
        def callback(consumer: Consumer, parts: list[TopicPartition]) -> None:
            self.events.append((kind, sorted((p.topic, p.partition) for p in parts)))
        return callback

    def poll(self) -> None:
        self.records.extend(m for m in self.consumer.consume(100, timeout=0.02) if m.error() is None)

    def held(self) -> set[int]:
        return {p.partition for p in self.consumer.assignment()}


def poll_all(*members: Member) -> Callable[[], None]:
    return lambda: [m.poll() for m in members]


def test_members_of_a_group_share_the_partitions_and_hand_them_over(kit):
    kit.topic("t", partitions=4)
    a = Member(kit, "t")
    until(lambda: a.held() == {0, 1, 2, 3}, step=poll_all(a), what="a to hold every partition")
    assert a.events == [("assign", [("t", 0), ("t", 1), ("t", 2), ("t", 3)])]
    b = Member(kit, "t")
    until(lambda: a.held() and b.held() and a.held() | b.held() == {0, 1, 2, 3}, step=poll_all(a, b),
          what="a and b to share the partitions")
    assert not a.held() & b.held()
    assert a.events[1] == ("revoke", [("t", 0), ("t", 1), ("t", 2), ("t", 3)])  # eager: all given back first
    assert (a.held(), b.held()) in (({0, 1}, {2, 3}), ({2, 3}, {0, 1}))  # range
    for i in range(8):
        kit.send("t", str(i), partition=i % 4)
    until(lambda: len(a.records) + len(b.records) == 8, step=poll_all(a, b), what="8 records")
    assert {m.partition() for m in a.records} == a.held() and {m.partition() for m in b.records} == b.held()
    a.consumer.close()
    assert a.events[-1][0] == "revoke"  # on_revoke runs inside close
    until(lambda: b.held() == {0, 1, 2, 3}, step=poll_all(b), what="b to take a's partitions")


def test_cooperative_sticky_members_move_only_what_changes_hands(kit):
    kit.topic("t", partitions=4)
    coop = {"partition.assignment.strategy": "cooperative-sticky"}
    a = Member(kit, "t", **coop)
    until(lambda: a.held() == {0, 1, 2, 3}, step=poll_all(a))
    b = Member(kit, "t", **coop)
    until(lambda: len(a.held()) == 2 and len(b.held()) == 2, step=poll_all(a, b), what="an even split")
    revoked = [parts for kind, parts in a.events if kind == "revoke"]
    assert revoked == [sorted(("t", p) for p in b.held())]  # a gave back only what b took
    assert ("assign", sorted(("t", p) for p in b.held())) in b.events
    kit.topic("u", partitions=1)  # a topic nobody subscribes to changes nothing held
    until(lambda: all(kind == "assign" and not parts for kind, parts in a.events[-1:]), step=poll_all(a, b))
    assert len(a.held()) == 2 and len(b.held()) == 2


def test_a_member_that_does_not_give_back_in_time_is_removed_and_rejoins(kit):
    kit.topic("t", partitions=2)
    a = Member(kit, "t", **{"max.poll.interval.ms": 300})
    until(lambda: a.held() == {0, 1}, step=poll_all(a))
    b = Member(kit, "t")
    started = time.monotonic()
    until(lambda: b.held() == {0, 1}, step=poll_all(b), what="b to get everything once a is removed")
    assert time.monotonic() - started >= 0.25
    a.poll()
    assert ("lost", [("t", 0), ("t", 1)]) in a.events
    until(lambda: a.held() and b.held(), step=poll_all(a, b), what="a to be back in the group")


def test_commits_are_kept_per_group(kit):
    kit.topic("t")
    for i in range(4):
        kit.send("t", str(i))
    first = kit.consumer(group="g1", **{"enable.auto.commit": False, "enable.auto.offset.store": False})
    first.assign([TopicPartition("t", 0)])
    msgs = read(first, 4)
    with pytest.raises(KafkaException) as nothing:
        first.commit(asynchronous=False)
    assert code(nothing) == KafkaError._NO_OFFSET
    first.store_offsets(message=msgs[1])
    assert first.commit(asynchronous=False)[0].offset == 2
    assert first.committed([TopicPartition("t", 0)], timeout=1)[0].offset == 2
    with pytest.raises(KafkaException) as not_assigned:
        first.store_offsets(offsets=[TopicPartition("other", 0, 1)])
    assert code(not_assigned) == KafkaError._UNKNOWN_PARTITION
    first.close()
    again = kit.consumer(group="g1")
    again.assign([TopicPartition("t", 0)])  # no offset: the group's committed one
    assert [m.value() for m in read(again, 2)] == [b"2", b"3"]
    other = kit.consumer(group="g2")
    assert other.committed([TopicPartition("t", 0)])[0].offset == OFFSET_INVALID
    other.assign([TopicPartition("t", 0)])
    assert [m.value() for m in read(other, 4)] == [b"0", b"1", b"2", b"3"]
    auto = kit.consumer(group="g3", **{"enable.auto.commit": True})
    with pytest.raises(KafkaException) as auto_store:
        auto.store_offsets(offsets=[TopicPartition("t", 0, 1)])
    assert code(auto_store) == KafkaError._INVALID_ARG
    auto.assign([TopicPartition("t", 0)])
    read(auto, 3)
    auto.close()  # auto-commit commits what was read on close
    assert kit.consumer(group="g3").committed([TopicPartition("t", 0)])[0].offset == 3
    assert other.get_watermark_offsets(TopicPartition("t", 0), timeout=1) == (0, 4)


# -- the broker going away ----------------------------------------------------------------------------------------
def test_while_the_broker_is_down_nothing_moves_and_records_wait_for_it(kit):
    kit.topic("t")
    kit.send("t", b"before")
    errors: list[KafkaError] = []
    p = kit.producer(**{"message.timeout.ms": 300, "error_cb": errors.append})
    c = kit.consumer()
    c.assign([TopicPartition("t", 0, 0)])
    reports: list[Any] = []
    kit.broker.down()
    assert c.consume(10, timeout=0.1) == []  # the record written before is not readable either
    p.produce("t", b"lost", on_delivery=lambda e, m: reports.append(e))
    started = time.monotonic()
    assert p.flush(2) == 0
    assert reports[0].code() == KafkaError._MSG_TIMED_OUT and 0.25 < time.monotonic() - started < 1.5
    assert [e.code() for e in errors] == [KafkaError._ALL_BROKERS_DOWN]
    started = time.monotonic()
    with pytest.raises(KafkaException) as metadata:
        p.list_topics(timeout=0.2)
    assert code(metadata) == KafkaError._TRANSPORT and time.monotonic() - started >= 0.19
    futures = kit.admin.create_topics([NewTopic("u", 1, 1)])
    assert futures["u"].exception(1).args[0].code() == KafkaError._TRANSPORT
    with pytest.raises(KafkaException) as commit:
        c.commit(offsets=[TopicPartition("t", 0, 1)], asynchronous=False)
    assert code(commit) == KafkaError._TRANSPORT
    p.produce("t", b"kept", on_delivery=lambda e, m: reports.append(e))  # the broker is back before its timeout
    threading.Timer(0.1, kit.broker.up).start()
    assert p.flush(2) == 0 and reports[1] is None
    assert [m.value() for m in read(c, 2)] == [b"before", b"kept"]


# -- admin --------------------------------------------------------------------------------------------------------
def test_admin_creates_lists_and_deletes_topics(kit):
    fs = kit.admin.create_topics([NewTopic("a", 3, 1), NewTopic("b", -1, -1), NewTopic("bad name", 1, 1),
                                  NewTopic("c", 1, 3)])
    assert fs["a"].result(1) is None and fs["b"].result(1) is None
    assert fs["bad name"].exception(1).args[0].code() == KafkaError.TOPIC_EXCEPTION
    assert fs["c"].exception(1).args[0].code() == KafkaError.INVALID_REPLICATION_FACTOR  # a cluster of one
    again = kit.admin.create_topics([NewTopic("a", 1, 1)])["a"].exception(1)
    assert again.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS
    md = kit.admin.list_topics(timeout=1)
    assert set(md.topics) == {"a", "b"} and len(md.topics["b"].partitions) == 1
    assert all(p.leader == 0 and p.error is None for p in md.topics["a"].partitions.values())
    assert md.brokers[0].host == kit.servers
    deleted = kit.admin.delete_topics(["a", "missing"])
    assert deleted["a"].result(1) is None
    assert deleted["missing"].exception(1).args[0].code() == KafkaError.UNKNOWN_TOPIC_OR_PART
    assert set(kit.admin.list_topics(timeout=1).topics) == {"b"}
    with pytest.raises(ValueError):
        kit.admin.delete_topics(["b", "b"])


def test_admin_keeps_acls_and_finds_them_as_kafka_does(kit):
    def binding(name: str, pattern: ResourcePatternType, principal: str = "User:a") -> AclBinding:
        return AclBinding(ResourceType.TOPIC, name, pattern, principal, "*", AclOperation.READ,
                          AclPermissionType.ALLOW)

    bindings = [binding("fusion.rt.", ResourcePatternType.PREFIXED), binding("orders", ResourcePatternType.LITERAL),
                binding("*", ResourcePatternType.LITERAL, "User:b")]
    for f in kit.admin.create_acls(bindings).values():
        assert f.result(1) is None
    match = AclBindingFilter(ResourceType.TOPIC, "fusion.rt.123", ResourcePatternType.MATCH, None, None,
                             AclOperation.ANY, AclPermissionType.ALLOW)
    assert {b.principal for b in kit.admin.describe_acls(match).result(1)} == {"User:a", "User:b"}
    literal = AclBindingFilter(ResourceType.ANY, "orders", ResourcePatternType.LITERAL, None, None,
                               AclOperation.ANY, AclPermissionType.ANY)
    assert kit.admin.describe_acls(literal).result(1) == [bindings[1]]
    assert list(kit.admin.delete_acls([literal]).values())[0].result(1) == [bindings[1]]
    assert kit.admin.describe_acls(literal).result(1) == []


def test_one_name_is_one_broker_and_two_names_are_two(kit):
    kit.topic("t")
    assert Broker.for_servers(kit.servers) is kit.broker
    elsewhere = AdminClient({"bootstrap.servers": f"memory://{uuid.uuid4().hex}", "unknown.setting": 1})
    assert "t" in kit.admin.list_topics(timeout=1).topics and elsewhere.list_topics(timeout=1).topics == {}
