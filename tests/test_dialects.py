"""Request/reply dialects (fusion_celery.dialects): each dialect's encoding and decoding, then both ways
through a real in-process worker on the in-memory stub Kafka.

The same behaviours against the real stack, with real Spring Kafka and Faust programs, are in
tests/test_examples.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from confluent_kafka import OFFSET_BEGINNING, TopicPartition
from support.waiting import wait_for

from fusion_celery import Message, Pipeline, reactor
from fusion_celery.dialects import DIALECTS, Outgoing, correlation_of, dialect, dialect_of_request, header
from fusion_celery.dialects.spring import SpringDialect
from fusion_celery.errors import ConfigurationError, DepsMapError, ProtocolError, RemoteError
from fusion_celery.graph import DepsGraph
from fusion_celery.run import Caller
from fusion_celery.testing import in_process_app, worker
from fusion_celery.testing.app import kafka_broker
from fusion_celery.testing.kafka import Consumer, Producer

ANSWER_TIMEOUT = 15.0
ALLOW = [r"spring\.replies\..+", r"f-reply-[0-9a-f-]{36}"]
SPRING_ID = bytes(range(200, 216))  # 16 raw bytes, not UTF-8: as ReplyingKafkaTemplate sends by default


def decode(name: str, value: bytes, headers: list[tuple[str, bytes]], **kw: Any) -> Message:
    return dialect(name).decode_request(value, topic="math", headers=headers, allowlist=ALLOW, **kw)


# -- finding a request's dialect ------------------------------------------------------------------
def test_a_request_is_read_in_the_dialect_its_headers_or_record_speak():
    assert dialect_of_request(b'{"data": 1}', []).name == "fusion"
    assert dialect_of_request(b"[1]", [("kafka_replyTopic", b"spring.replies.a")]).name == "spring"
    assert dialect_of_request(b"[1]", [("Faust-Ag-ReplyTo", b"f-reply-x")]).name == "faust"
    record = {"value": [1], "reply_to": "t", "correlation_id": "c", "__faust": {"ns": "@ReqRepRequest"}}
    assert dialect_of_request(json.dumps(record).encode(), None).name == "faust"
    assert dialect_of_request(b'{"data": {"__faust": 1}}', None).name == "fusion"  # only Faust's metadata counts
    assert set(DIALECTS) == {"fusion", "spring", "faust"}
    with pytest.raises(ConfigurationError, match="unknown dialect 'soap'"):
        dialect("soap")


# -- spring ---------------------------------------------------------------------------------------
def test_spring_request_takes_reply_topic_partition_and_raw_correlation_from_the_headers():
    m = decode("spring", b"[1, 2, 3]", [("kafka_replyTopic", b"spring.replies.a"),
                                        ("kafka_replyPartition", (1).to_bytes(4, "big")),
                                        ("kafka_correlationId", SPRING_ID)], key=b"k")
    assert (m.data, m.return_topic, m.reply_partition, m.dialect) == ([1, 2, 3], "spring.replies.a", 1, "spring")
    assert bytes.fromhex(m.correlation) == SPRING_ID
    out = dialect("spring").encode_reply(Caller.of(m.to_dict()), "ok", b"4")
    assert out.value == b"4" and out.partition == 1
    assert dict(out.headers)["kafka_correlationId"] == SPRING_ID  # byte for byte
    assert dict(out.headers)["fusion-status"] == b"ok"


@pytest.mark.parametrize("headers, match", [
    ([("kafka_replyTopic", b"elsewhere")], "'elsewhere' is not allowed"),
    ([("kafka_replyTopic", b"bad topic!")], "not a legal Kafka topic name"),
    ([("kafka_replyTopic", b"spring.replies.a"), ("kafka_replyPartition", b"\x01")],
     "kafka_replyPartition must be a 4-byte big-endian int, got 1 bytes"),
    ([("kafka_replyTopic", b"spring.replies.a"), ("kafka_replyPartition", (-3).to_bytes(4, "big", signed=True))],
     "names partition -3"),
    ([("kafka_replyTopic", b"\xff")], "kafka_replyTopic is not UTF-8"),
    *[([("kafka_replyTopic", b"spring.replies.a"), ("fusion-deadline", deadline)],
       f"the header fusion-deadline must be epoch milliseconds, got {expected}")
      for deadline, expected in [(b"inf", "inf"), (b"-inf", "-inf"), (b"nan", "nan"), (b"soon", "'soon'")]],
])
def test_a_spring_request_with_a_bad_reply_header_is_refused_naming_it(headers, match):
    with pytest.raises(ProtocolError, match=match):
        decode("spring", b"1", headers)


@pytest.mark.parametrize("deadline, shown", [(b"inf", "inf"), (b"-inf", "-inf"), (b"nan", "nan"), (b"1e400", "inf")])
def test_a_faust_request_whose_deadline_is_no_number_of_milliseconds_is_refused_naming_the_header(deadline, shown):
    headers = [("Faust-Ag-ReplyTo", b"fusion.rt.1.a"), ("Faust-Ag-CorrelationId", b"c"), ("fusion-deadline", deadline)]
    with pytest.raises(ProtocolError, match=f"the header fusion-deadline must be epoch milliseconds, got {shown}"):
        decode("faust", b"1", headers)


def test_spring_request_from_fusion_and_the_answer_it_takes():
    spring = dialect("spring")
    out = spring.encode_request([6, 2], return_topic="fusion.rt.1.2.x", id="w-1", deadline=99)
    assert out.value == b"[6,2]"
    assert dict(out.headers) == {"kafka_replyTopic": b"fusion.rt.1.2.x", "kafka_correlationId": b"w-1",
                                 "fusion-deadline": b"99"}
    assert spring.rejection(b"4", [("kafka_correlationId", b"w-1")], "w-1") is None
    assert "is not this wait's id" in spring.rejection(b"4", [("kafka_correlationId", b"w-2")], "w-1")
    assert "carries no kafka_correlationId" in spring.rejection(b"4", [], "w-1")
    assert spring.decode_reply(b"4", [("kafka_correlationId", b"w-1")]) == 4
    with pytest.raises(RemoteError, match="ValueError: no"):
        spring.decode_reply(b'{"error": {"type": "ValueError", "message": "no"}}', [])
    assert correlation_of(b"4", [("kafka_correlationId", b"w-1")]) == "w-1"


# -- faust ----------------------------------------------------------------------------------------
def test_faust_headers_form_request_and_its_response_record():
    m = decode("faust", b"[1, 2, 3]", [("Faust-Ag-ReplyTo", b"f-reply-" + b"0" * 36),
                                       ("Faust-Ag-CorrelationId", b"c-1")], key=b"k")
    assert (m.data, m.return_topic, m.correlation, m.id) == ([1, 2, 3], "f-reply-" + "0" * 36, "c-1", "c-1")
    out = dialect("faust").encode_reply(Caller.of(m.to_dict()), "ok", b"4")
    assert json.loads(out.value) == {"key": "k", "value": 4, "correlation_id": "c-1",
                                     "__faust": {"ns": "@ReqRepResponse"}}


def test_faust_record_form_request():
    record = {"value": [1, 2, 3], "reply_to": "f-reply-" + "1" * 36, "correlation_id": "c-2",
              "__faust": {"ns": "@ReqRepRequest"}}
    m = decode("faust", json.dumps(record).encode(), [])
    assert (m.data, m.return_topic, m.correlation) == ([1, 2, 3], "f-reply-" + "1" * 36, "c-2")
    err = dialect("faust").encode_reply(Caller.of(m.to_dict()), "error",
                                        b'{"error":{"type":"ValueError","message":"no"}}')
    assert json.loads(err.value)["value"] == {"error": {"type": "ValueError", "message": "no"}}
    assert json.loads(err.value)["key"] is None  # Faust refuses a response without "key"
    assert dict(err.headers)["fusion-status"] == b"error"


@pytest.mark.parametrize("record, match", [
    ({"value": 1, "correlation_id": "c", "__faust": {"ns": "@ReqRepRequest"}}, "needs 'reply_to'"),
    ({"value": 1, "reply_to": "f-reply-" + "1" * 36, "__faust": {"ns": "@ReqRepRequest"}}, "needs 'correlation_id'"),
    ({"reply_to": "f-reply-" + "1" * 36, "correlation_id": "c", "__faust": {"ns": "@ReqRepRequest"}}, "needs 'value'"),
    ({"value": 1, "reply_to": 7, "correlation_id": "c", "__faust": {"ns": "@ReqRepRequest"}}, "must be a string"),
    ({"value": 1, "reply_to": "t", "correlation_id": 3, "__faust": {"ns": "@ReqRepRequest"}},
     "'correlation_id' must be a string"),
    ({"value": 1, "reply_to": "elsewhere", "correlation_id": "c", "__faust": {"ns": "@ReqRepRequest"}},
     "'elsewhere' is not allowed"),
])
def test_a_malformed_faust_record_is_refused_naming_what_is_wrong(record, match):
    with pytest.raises(ProtocolError, match=match):
        decode("faust", json.dumps(record).encode(), [])


def test_faust_request_from_fusion_and_the_answer_it_takes():
    faust = dialect("faust")
    out = faust.encode_request([6, 2], return_topic="fusion.rt.1.2.x", id="w-1", deadline=None)
    assert out.value == b"[6,2]"
    assert dict(out.headers) == {"Faust-Ag-ReplyTo": b"fusion.rt.1.2.x", "Faust-Ag-CorrelationId": b"w-1"}
    answer = json.dumps({"key": None, "value": 4, "correlation_id": "w-1",
                         "__faust": {"ns": "@ReqRepResponse"}}).encode()
    assert faust.rejection(answer, None, "w-1") is None and faust.decode_reply(answer, None) == 4
    assert correlation_of(answer, None) == "w-1"
    assert "is not this wait's id" in faust.rejection(answer, None, "w-2")
    assert "needs 'correlation_id'" in faust.rejection(b'{"key": null, "value": 4}', None, "w-1")
    assert "not a Faust answer" in faust.rejection(b"4", None, "w-1")
    failed = json.dumps({"key": None, "value": {"error": {"type": "KeyError", "message": "x"}},
                         "correlation_id": "w-1"}).encode()
    with pytest.raises(RemoteError, match="KeyError: x"):
        faust.decode_reply(failed, None)


# -- fusion and the deps-map ----------------------------------------------------------------------
def test_fusion_dialect_is_the_wire_protocol():
    fusion = dialect("fusion")
    assert fusion.encode_request(1, return_topic="fusion.rt.x", id="i", deadline=None) == Outgoing(
        b'{"data":1,"return-topic":"fusion.rt.x","id":"i"}')
    out = fusion.encode_reply(Caller("fusion.rt.x", "i"), "ok", b"1")
    assert (out.key, out.headers, out.partition) == ("i", [("fusion-status", b"ok"), ("fusion-id", b"i")], None)
    assert Caller("fusion.rt.x", "i").to_dict() == {"return_topic": "fusion.rt.x", "id": "i", "topic": None}


def test_a_deps_map_entry_names_its_dialect():
    graph = DepsGraph({"a": {"topic": "t", "dialect": "spring"}, "b": {"topic": "t", "dialect": "fusion"},
                       "c": {"topic": "t"}})
    assert [graph.deps[n].dialect for n in "abc"] == ["spring", None, None]
    assert graph.deps["a"].to_dict()["dialect"] == "spring"
    with pytest.raises(DepsMapError, match=r"deps-map\['a'\].dialect: unknown dialect 'grpc'"):
        DepsGraph({"a": {"topic": "t", "dialect": "grpc"}})


# -- both ways through an in-process worker -------------------------------------------------------

@pytest.fixture(scope="module")
def fusion() -> Iterator[Celery]:
    app = in_process_app("dialects", fusion_default_timeout=ANSWER_TIMEOUT, fusion_reply_allowlist=ALLOW)

    @reactor("add", app=app)
    def add(message: Message) -> Any:
        return sum(message.data)

    # One service topic per reactor, so that a test's service reads its own requests only.
    cases = [(name, channel) for name in DIALECTS for channel in ("leased", "ephemeral", "shared")]
    for name, channel in [*cases, ("faust", "bare")]:
        @reactor(f"math-{name}-{channel}", app=app, name=f"math-{name}-{channel}",
                 deps={"one": {"topic": f"svc-{name}-{channel}", "args": [6, 2], "dialect": name,
                               "reply": "leased" if channel == "bare" else channel}})
        def math(message: Message, results: dict[str, Any]) -> Any:
            return results["one"]

        kafka_broker(app).create_topic(f"svc-{name}-{channel}")
    kafka_broker(app).create_topic("spring.replies.a", partitions=2)  # the caller reads partition 1
    kafka_broker(app).create_topic("f-reply-" + "0" * 36)  # Faust's reply topics have one partition
    with worker(app):
        yield app


def client(app: Celery, kind: type, **config: Any) -> Any:
    return kind({"bootstrap.servers": app.conf.fusion_kafka_bootstrap_servers, **config})


def read_one(app: Celery, topic: str, partition: int = 0) -> Any:
    consumer = client(app, Consumer, **{"group.id": f"reader-{time.monotonic_ns()}"})
    try:
        consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING)])
        return wait_for(lambda: next((m for m in consumer.consume(1, 0.05) if m.error() is None), None),
                        ANSWER_TIMEOUT, f"a record on {topic}[{partition}]")
    finally:
        consumer.close()


def send(app: Celery, topic: str, value: bytes, headers: list[tuple[str, bytes]], key: bytes | None = None) -> None:
    producer = client(app, Producer)
    producer.produce(topic, value, key=key, headers=headers)
    assert producer.flush(1) == 0
    producer.close()


def test_a_spring_caller_gets_the_answer_on_its_reply_partition_with_its_correlation(fusion):
    send(fusion, "add", b"[1, 2, 3]", [("kafka_replyTopic", b"spring.replies.a"),
                                       ("kafka_replyPartition", (1).to_bytes(4, "big")),
                                       ("kafka_correlationId", SPRING_ID)])
    reply = read_one(fusion, "spring.replies.a", 1)
    assert reply.value() == b"6" and dict(reply.headers())["kafka_correlationId"] == SPRING_ID


@pytest.mark.parametrize("record", [False, True], ids=["headers", "record"])
def test_a_faust_caller_gets_a_response_record_in_either_form(fusion, record):
    topic, corr = "f-reply-" + "0" * 36, f"c-{record}"
    if record:
        send(fusion, "add", json.dumps({"value": [1, 2], "reply_to": topic, "correlation_id": corr,
                                        "__faust": {"ns": "@ReqRepRequest"}}).encode(), [])
    else:
        send(fusion, "add", b"[1, 2]", [("Faust-Ag-ReplyTo", topic.encode()), ("Faust-Ag-CorrelationId",
                                                                               corr.encode())])
    consumer = client(fusion, Consumer, **{"group.id": f"faust-{record}"})
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        found = wait_for(lambda: next((json.loads(m.value()) for m in consumer.consume(10, 0.05) if m.error() is None
                                       and json.loads(m.value())["correlation_id"] == corr), None),
                         ANSWER_TIMEOUT, "the Faust response")
    finally:
        consumer.close()
    assert found == {"key": None, "value": 3, "correlation_id": corr, "__faust": {"ns": "@ReqRepResponse"}}


@pytest.mark.parametrize("value, headers, reason", [
    (b"[1]", [("kafka_replyTopic", b"not-allowed")], b"return-topic-not-allowed"),
    (b'{"value": 1, "correlation_id": "c", "__faust": {"ns": "@ReqRepRequest"}}', [], b"bad-field"),
])
def test_bad_dialect_requests_go_to_the_dead_letter_topic_with_the_reason(fusion, value, headers, reason):
    send(fusion, "add", value, headers + [("probe", value[:20])])
    dlq = client(fusion, Consumer, **{"group.id": f"dlq-{time.monotonic_ns()}"})
    try:
        dlq.assign([TopicPartition("add.dlq", 0, OFFSET_BEGINNING)])
        letter = wait_for(lambda: next((m for m in dlq.consume(10, 0.05) if m.error() is None
                                        and dict(m.headers()).get("probe") == value[:20]), None),
                          ANSWER_TIMEOUT, "the dead letter")
    finally:
        dlq.close()
    assert letter.value() == value and dict(letter.headers())["fusion-dlq-reason"] == reason


def test_a_decoder_that_fails_dead_letters_its_record_and_the_partition_goes_on(fusion, monkeypatch):
    """A decoder's own fault (any exception but ProtocolError) is no reason to read the record again for ever."""
    decode_request = SpringDialect.decode_request

    def faulty(self, value, **kw):
        if header(kw.get("headers"), "probe") == b"decoder-fault":
            raise ZeroDivisionError("a decoder's bug")
        return decode_request(self, value, **kw)

    monkeypatch.setattr(SpringDialect, "decode_request", faulty)
    kafka_broker(fusion).create_topic("spring.replies.b")
    # one key: one partition, where the record after the faulty one must still be read
    send(fusion, "add", b"[7]", [("kafka_replyTopic", b"spring.replies.b"), ("probe", b"decoder-fault")], key=b"k")
    send(fusion, "add", b"[2, 2]", [("kafka_replyTopic", b"spring.replies.b"), ("kafka_correlationId", SPRING_ID)],
         key=b"k")
    assert read_one(fusion, "spring.replies.b").value() == b"4"
    dlq = client(fusion, Consumer, **{"group.id": f"dlq-{time.monotonic_ns()}"})
    try:
        dlq.assign([TopicPartition("add.dlq", 0, OFFSET_BEGINNING)])
        letter = wait_for(lambda: next((m for m in dlq.consume(10, 0.05) if m.error() is None
                                        and dict(m.headers()).get("probe") == b"decoder-fault"), None),
                          ANSWER_TIMEOUT, "the dead letter")
    finally:
        dlq.close()
    headers = dict(letter.headers())
    assert headers["fusion-dlq-reason"] == b"undecodable"
    assert headers["fusion-dlq-error"] == b"decoding the request failed: ZeroDivisionError: a decoder's bug"


class Service:
    """Plays a service of dialect ``name`` on ``svc-<name>-<channel>``: answers [a, b] with a - b, as that
    dialect does, after a record that no wait may take (a wrong correlation id)."""

    def __init__(self, app: Celery, name: str, channel: str) -> None:
        self.app, self.name = app, name
        self.requests = client(app, Consumer, **{"group.id": f"svc-{name}-{channel}",
                                                 "auto.offset.reset": "earliest"})
        self.requests.subscribe([f"svc-{name}-{channel}"])
        self.producer = client(app, Producer)

    def answer_one(self) -> None:
        request = wait_for(lambda: next((m for m in self.requests.consume(1, 0.05) if m.error() is None), None),
                           ANSWER_TIMEOUT, f"a request on svc-{self.name}")
        headers = dict(request.headers())
        if self.name == "fusion":
            body = json.loads(request.value())
            first, second = body["data"]
            topic, corr = body["return-topic"], body["id"]
            for value, wait_id in ((b"666", "someone-else"), (str(first - second).encode(), corr)):
                self.producer.produce(topic, value, headers=[("fusion-id", wait_id.encode())])
        elif self.name == "spring":
            first, second = json.loads(request.value())
            topic, corr = headers["kafka_replyTopic"].decode(), headers["kafka_correlationId"]
            for value, wait_id in ((b"666", b"someone-else"), (str(first - second).encode(), corr)):
                self.producer.produce(topic, value, headers=[("kafka_correlationId", wait_id)])
        else:
            first, second = json.loads(request.value())
            topic, corr = headers["Faust-Ag-ReplyTo"].decode(), headers["Faust-Ag-CorrelationId"].decode()
            for value, wait_id in ((666, "someone-else"), (first - second, corr)):
                self.producer.produce(topic, json.dumps({"key": None, "value": value, "correlation_id": wait_id,
                                                         "__faust": {"ns": "@ReqRepResponse"}}).encode())
        self.producer.flush(1)

    def close(self) -> None:
        self.requests.close()
        self.producer.close()


@pytest.mark.parametrize("channel", ["leased", "ephemeral", "shared"])
@pytest.mark.parametrize("name", DIALECTS)
def test_a_service_of_each_dialect_serves_a_dependency_on_each_reply_channel(fusion, name, channel):
    service = Service(fusion, name, channel)
    try:
        result = Pipeline(f"math-{name}-{channel}", app=fusion).delay(None, timeout=ANSWER_TIMEOUT)
        service.answer_one()
        assert result.get(timeout=ANSWER_TIMEOUT + 5) == 4  # not 666: that record named another wait
    finally:
        service.close()


def test_a_faust_answer_that_is_no_response_record_is_dropped_and_the_wait_goes_on(fusion):
    service = Service(fusion, "faust", "bare")
    try:
        result = Pipeline("math-faust-bare", app=fusion).delay(None, timeout=ANSWER_TIMEOUT)
        request = wait_for(lambda: next((m for m in service.requests.consume(1, 0.05) if m.error() is None), None),
                           ANSWER_TIMEOUT, "the request")
        headers = dict(request.headers())
        topic, corr = headers["Faust-Ag-ReplyTo"].decode(), headers["Faust-Ag-CorrelationId"].decode()
        waiter = fusion._fusion_waiter
        rejected = waiter.rejected
        service.producer.produce(topic, b"4")  # a bare value: no correlation_id
        service.producer.flush(1)
        wait_for(lambda: waiter.rejected == rejected + 1, 5, "the waiter to drop the bare value")
        assert not result.ready()
        service.producer.produce(topic, json.dumps({"key": None, "value": 4, "correlation_id": corr}).encode())
        service.producer.flush(1)
        assert result.get(timeout=ANSWER_TIMEOUT) == 4
    finally:
        service.close()

