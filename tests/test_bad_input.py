"""Bad input over the wire: a flood of malformed requests, oversized payloads and replies, a fuzzed allow-list,
records too large to dead-letter whole.

Against the real stack and real workers, but for the unit tests of the dead-letter copy's size; an
intake whose dead-letter topic refuses a copy runs on stand-in Kafka clients and the stack's Redis (its
run book).  The pure decoders are fuzzed with Hypothesis in test_protocol.py and test_graph.py.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from types import SimpleNamespace
from unittest.mock import ANY

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import NewTopic
from support.kafka import high_watermark, return_topic_name, topic_name
from support.reliability import Load, Sampler, check, check_all_handed, collect, intake_counts, report
from support.waiting import wait_for
from support.workers import isolated_env

from fusion_celery import intake as intake_module
from fusion_celery.application import create_app
from fusion_celery.intake import ReactorIntake, dead_letter_copy, record_size

LIMIT = 20_000  # fusion_max_message_bytes of the flood's worker


def malformed(rng: random.Random, i: int) -> tuple[bytes, str, list | None]:
    """One malformed request: (value, the dead-letter reason it must get, headers)."""
    kind = i % 10
    if kind == 0:
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200))) + b"\xff", "not-utf8", None
    if kind == 1:
        return b"{" + str(rng.random()).encode() + b" no json", "not-json", None
    if kind == 2:
        return json.dumps(rng.choice([[1, 2], "s", 3, None, True, 1.5])).encode(), "not-object", None
    if kind == 3:
        return json.dumps({"data": 1, "return-topic": rng.choice([1, [], {}, True])}).encode(), "bad-field", None
    if kind == 4:
        return json.dumps({"data": 1, "id": rng.choice([[1], {"a": 1}, 1.5, True])}).encode(), "bad-field", None
    if kind == 5:
        return json.dumps({"data": 1, "deadline": rng.choice(["soon", [], True, "NaN x"])}).encode(), "bad-field", None
    if kind == 6:
        topic = rng.choice(["payments", "fusion.waits", "fusion.rt", "FUSION.RT.1.a", "fusion_rt.1", "a b",
                            "../x", "", "x" * 300, "fusion.r\u0442.1.a"])
        return json.dumps({"data": 1, "return-topic": topic}).encode(), "return-topic-not-allowed", None
    if kind == 7:
        return b"", "empty", None
    if kind == 8:
        # the return topic in a header, not allowed
        return json.dumps({"data": 2}).encode(), "return-topic-not-allowed", [("return-topic", b"payments.ledger")]
    if i % 100 == 9:
        return json.dumps({"data": "y" * (LIMIT + 1)}).encode(), "too-large", None
    if i % 100 == 19:  # a Spring request whose deadline is no number of milliseconds
        return b"[1]", "bad-field", [("kafka_replyTopic", b"fusion.rt.1.a"),
                                     ("fusion-deadline", rng.choice([b"inf", b"-inf", b"nan", b"soon"]))]
    if i % 100 == 29:  # the same for a Faust request
        return b"[1]", "bad-field", [("Faust-Ag-ReplyTo", b"fusion.rt.1.a"), ("Faust-Ag-CorrelationId", b"c"),
                                     ("fusion-deadline", rng.choice([b"inf", b"-inf", b"nan", b"soon"]))]
    return b"\x00\x01garbage", "not-json", None


@pytest.mark.integration
def test_10000_malformed_mixed_with_1000_good(request, kit, worker_factory, redis_client):
    bad_n, good_n = (10_000, 1_000)
    env = {**isolated_env("kafka", db=8), "FUSION_MAX_MESSAGE_BYTES": str(LIMIT)}
    w = worker_factory(name="flood", env=env, concurrency=2)
    run = env["FUSION_TEST_RUN"]
    topic = f"{run}.add"
    rng = random.Random(9)
    expected: dict[tuple[int, int], str] = {}
    sampler = Sampler(w.proc.pid, interval=2.0)

    def produce(value, reason, headers):
        def on_delivery(err, msg):
            assert err is None, err
            expected[(msg.partition(), msg.offset())] = reason
        kit.producer.produce(topic, value, headers=headers, on_delivery=on_delivery)
        kit.producer.poll(0)

    def flood(bad: int, good: int, tag: str) -> Load:
        load = Load(kit, run)
        ratio = bad // good
        for i in range(good):
            for j in range(ratio):
                produce(*malformed(rng, i * ratio + j))
            rid = f"{tag}{i}"
            kit.producer.produce(topic, json.dumps({"data": [i, 1], "return-topic": load.back, "id": rid}))
            load.expected[rid] = i + 1
        kit.producer.flush(120)
        return load

    def dead_letters() -> dict[tuple[int, int], str]:
        return read_dlq(kit, f"{topic}.dlq", expected_count=len(expected))

    # Warm-up: the worker's caches, pools and buffers reach their working size.
    warm = flood(1_000, 100, "w")
    check(collect(warm, redis_client, timeout=300))
    wait_for(lambda: len(dead_letters()) >= 1_000, 300, "the warm-up's dead letters")
    before = sampler.sample()
    sampler.start()
    t0 = time.monotonic()
    main = flood(bad_n, good_n, "g")
    outcome = collect(main, redis_client, timeout=600)
    letters = {}

    def all_dead_lettered():
        letters.update(dead_letters())
        return len(letters) >= len(expected)

    wait_for(all_dead_lettered, 600, f"{len(expected)} dead letters", interval=2.0)
    elapsed = time.monotonic() - t0
    sampler.stop()
    after = sampler.sample()
    figures = {"malformed": bad_n, "good": good_n, "elapsed_s": round(elapsed, 1),
               "rss_mb_before": round(before["rss_mb"], 1), "rss_mb_after": round(after["rss_mb"], 1),
               "rss_mb_peak": round(max(s["rss_mb"] for s in sampler.samples + [after]), 1),
               "fds_before": before["fds"], "fds_after": after["fds"],
               "reasons": dict(Counter(letters.values())), **outcome.summary()}
    report(request.node.name, figures)
    check(outcome)
    wrong = {k: (letters.get(k), v) for k, v in expected.items() if letters.get(k) != v}
    assert not wrong, f"{len(wrong)} records dead-lettered with another reason or not at all: {list(wrong.items())[:5]}"
    assert after["rss_mb"] - before["rss_mb"] < 30, f"worker memory grew: {figures}"
    assert after["fds"] - before["fds"] < 20, f"worker file descriptors grew: {figures}"
    assert "Traceback" not in w.log()


def read_dlq(kit, dlq: str, expected_count: int) -> dict[tuple[int, int], str]:
    """{(source partition, source offset): reason} of every record in ``dlq``."""
    c = Consumer({"bootstrap.servers": kit.servers, "group.id": f"dlq-{uuid.uuid4().hex}",
                  "enable.auto.commit": False})
    c.assign([TopicPartition(dlq, 0, OFFSET_BEGINNING)])
    low, high = c.get_watermark_offsets(TopicPartition(dlq, 0), timeout=10)
    out: dict[tuple[int, int], str] = {}
    seen = 0
    deadline = time.monotonic() + 120
    try:
        while seen < high - low and time.monotonic() < deadline:
            for m in c.consume(2000, timeout=0.5):
                if m.error() is not None:
                    continue
                seen += 1
                h = {k: v.decode() for k, v in m.headers() or []}
                source = h["fusion-dlq-source"]  # topic[partition]@offset
                part = int(source[source.rindex("[") + 1:source.rindex("]")])
                offset = int(source[source.rindex("@") + 1:])
                out[(part, offset)] = h["fusion-dlq-reason"]
    finally:
        c.close()
    return out


# -- oversized payloads and replies: a clear error where the limit is crossed ----------------------
def call(kit, topic, data, timeout=90):
    back = kit.topic(return_topic_name())
    kit.send(topic, {"data": data, "return-topic": back})
    [msg] = kit.read(back, 1, timeout=timeout)
    return json.loads(msg.value()), dict(msg.headers() or [])


@pytest.mark.integration
def test_reply_above_the_limit_is_an_error_reply_naming_the_setting(kit, services_worker):
    # the session worker runs with fusion_max_message_bytes=100000
    body, headers = call(kit, topic_name("big"), 150_000)
    assert headers["fusion-status"] == b"error"
    assert body["error"]["type"] == "PayloadTooLarge"
    assert "the reply is 150002 bytes, above the limit of 100000" in body["error"]["message"]
    assert "fusion_max_message_bytes" in body["error"]["message"]
    assert call(kit, topic_name("big"), 10)[0] == "x" * 10  # below the limit all is well


@pytest.mark.integration
def test_dependency_request_above_the_limit_fails_before_sending(kit, services_worker, service):
    sink = kit.topic()
    svc = service(sink, lambda data: "never")
    # a and b answer 60 kB each; the request to "both" would carry 120 kB
    deps = {"a": {"topic": topic_name("big"), "args": 60_000},
            "b": {"topic": topic_name("big"), "args": 60_000},
            "both": {"topic": sink, "args": [], "deps": ["a", "b"]}}
    body, headers = call(kit, topic_name("generic"), {"deps": deps})
    assert headers["fusion-status"] == b"error"
    assert body["error"]["type"] == "DependencyFailed"
    msg = body["error"]["message"]
    assert "dep 'both'" in msg and "above the limit of 100000" in msg and "fusion_max_message_bytes" in msg
    assert svc.received == []


@pytest.mark.integration
def test_dependency_reply_above_the_limit_fails_the_wait(kit, services_worker, service):
    svc_topic = kit.topic()
    service(svc_topic, lambda data: "z" * 200_000)
    body, headers = call(kit, topic_name("generic"), {"deps": {"huge": {"topic": svc_topic}}})
    assert headers["fusion-status"] == b"error"
    assert body["error"]["type"] == "DependencyFailed"
    msg = body["error"]["message"]
    assert "dep 'huge'" in msg and "the reply is 200002 bytes, above the limit of 100000" in msg


@pytest.mark.integration
def test_pipeline_with_data_above_the_limit_fails_at_once(app, services_worker):
    res = app.send_task("fusion.pipeline", args=[topic_name("add"), ["x" * 120_000]], kwargs={"timeout": 30})
    with pytest.raises(Exception) as exc:
        res.get(timeout=60)
    assert type(exc.value).__name__ == "PayloadTooLarge"
    assert "above the limit of 100000" in str(exc.value)


# -- the reply allow-list under fuzzing -------------------------------------------------------------
def fuzzed_topics(rng: random.Random, traps: list[str], allowed_exact: str) -> list[str]:
    """Return-topic names near the allow-list's edges: traps, prefix look-alikes, near-misses of a pattern."""
    alphabet = "abcXYZ019._-"
    names = list(traps)
    for _ in range(150):
        base = rng.choice(traps + [allowed_exact, "fusion.rt.", "replies.team-a"])
        op = rng.randrange(6)
        if op == 0:
            name = base + rng.choice(["", ".", "x", "-1"])
        elif op == 1:
            name = rng.choice(alphabet) + base
        elif op == 2 and base:
            i = rng.randrange(len(base))
            name = base[:i] + rng.choice(alphabet) + base[i + 1:]
        elif op == 3:
            name = base.upper()
        elif op == 4:
            name = base.replace(".", rng.choice(["_", "-", ".."]), 1)
        else:
            name = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        names.append(name)
    return names


def allowed(name: str, prefix: str, patterns: list[str]) -> bool:
    import re

    from fusion_celery.protocol import valid_topic_name
    return valid_topic_name(name) and (name.startswith(prefix) or any(re.fullmatch(p, name) for p in patterns))


@pytest.mark.integration
def test_no_reply_lands_outside_the_allow_list(request, kit, worker_factory):
    patterns = [r"replies\.team-a"]
    env = {**isolated_env("kafka", db=10), "FUSION_REPLY_ALLOWLIST": json.dumps(patterns)}
    run = env["FUSION_TEST_RUN"]
    worker_factory(name="allow", env=env, concurrency=2)
    # Traps: existing topics a reply must never reach (the reactor's own topic, the registry, others).
    traps = [kit.topic(f"{run}.trap.{i}") for i in range(3)] + [f"{run}.add", f"{run}.add.dlq"]
    rng = random.Random(7)
    names = fuzzed_topics(rng, traps, "replies.team-a")
    topic = f"{run}.add"
    before = {t: high_watermark(kit.servers, t) for t in traps}
    spellings = ["return-topic", "return_topic", "response-topic"]
    n_sent = 0
    for i, name in enumerate(names):
        body = {"data": [i], "id": f"z{i}"}
        if i % 4 == 3:
            headers = [(rng.choice(spellings), name.encode())]
        else:
            body[rng.choice(spellings)] = name
            headers = None
        kit.producer.produce(topic, json.dumps(body), headers=headers)
        n_sent += 1
    kit.producer.flush(60)
    refused = sum(1 for n in names if not allowed(n, "fusion.rt.", patterns))
    dlq = f"{topic}.dlq"
    wait_for(lambda: high_watermark(kit.servers, dlq) >= refused, 180, f"{refused} refused requests dead-lettered")
    import redis
    backend = redis.Redis.from_url(env["CELERY_RESULT_BACKEND"])
    wait_for(lambda: sum(1 for _ in backend.scan_iter("celery-task-meta-*")) >= n_sent - refused, 180,
             f"{n_sent - refused} allowed requests answered (or their reply dropped: no such topic)", interval=0.5)
    after = {t: high_watermark(kit.servers, t) for t in traps}
    report(request.node.name, {"fuzzed": n_sent, "refused": refused, "trap_writes": {
        t: after[t] - before[t] for t in traps}})
    # The reactor's own topic receives only what the test produced; the other traps nothing.
    assert after[f"{run}.add"] - before[f"{run}.add"] == n_sent
    for t in traps:
        if t != f"{run}.add" and t != dlq:
            assert after[t] == before[t], f"a reply landed on {t}"
    assert high_watermark(kit.servers, dlq) == refused



# -- records too large to dead-letter whole ---------------------------------------------------------
PRODUCER_LIMIT = 1_000_000  # librdkafka's default message.max.bytes, which the worker's producer keeps


def big_records_topic(kit, env: dict[str, str]) -> str:
    """The ``add`` reactor's topic of ``env``, made before its worker starts: one partition, records up to
    2 MB (the worker finds it there and serves it as it is; its dead-letter topic has the broker's limit)."""
    topic = f"{env['FUSION_TEST_RUN']}.add"
    created = kit.admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1,
                                                config={"max.message.bytes": "2000000"})])
    created[topic].result(30)
    kit.created += [topic, f"{topic}.dlq"]
    kit.wait_visible([topic])
    return topic


def send_big(kit, topic: str, values: dict[str, bytes]) -> dict[str, int]:
    """Send ``values`` with a producer that takes records up to 2 MB: {name: offset}."""
    producer = Producer({"bootstrap.servers": kit.servers, "linger.ms": 0, "message.max.bytes": 2_000_000})
    offsets: dict[str, int] = {}
    for name, value in values.items():
        producer.produce(topic, value, on_delivery=lambda err, msg, name=name: offsets.update(
            {name: msg.offset()} if err is None else {name: err}))
    producer.flush(30)
    producer.close()
    return offsets


def add_answers(kit, topic: str) -> bool:
    """Whether the ``add`` reactor on ``topic`` answers a request sent now, within two minutes."""
    back = kit.topic(return_topic_name())
    kit.send(topic, {"data": [1, 2], "return-topic": back})
    [reply] = kit.read(back, 1, timeout=120)
    return json.loads(reply.value()) == 3


@pytest.mark.integration
def test_records_too_large_to_dead_letter_whole_are_cut_and_the_reactor_goes_on(kit, worker_factory):
    """Under default settings, a 999,900-byte record that is not JSON and a 1.5 MB one (its topic allows it) are
    dead-lettered cut to what the producer accepts, headers included, with the reason and the original size in
    the headers; a request after them on the same partition is answered."""
    env = isolated_env("kafka", db=12)
    topic = big_records_topic(kit, env)
    w = worker_factory(name="bigdlq", env=env, concurrency=2)
    originals = {"not-json": (b"not json; " * 100_000)[:999_900],
                 "too-large": b'{"data": "' + b"y" * 1_499_988 + b'"}'}
    assert [len(v) for v in originals.values()] == [999_900, 1_500_000]
    offsets = send_big(kit, topic, originals)
    assert sorted(offsets.values()) == [0, 1], offsets
    assert add_answers(kit, topic), "a request behind the two records is answered"
    letters = kit.read(f"{topic}.dlq", 2, timeout=60)
    for letter in letters:
        h = {k: v.decode() for k, v in letter.headers()}
        reason = h["fusion-dlq-reason"]
        original = originals[reason]
        assert h["fusion-dlq-source"] == f"{topic}[0]@{offsets[reason]}"
        assert h["fusion-dlq-truncated"] == str(len(original))
        value = letter.value()
        assert len(value) < PRODUCER_LIMIT and value == original[:len(value)], "the copy is the start of the record"
        # The worker's producer took the copy, so it fits; the cut gave up at most the room of the headers'
        # length varints (two per header, at most 5 bytes each) next to librdkafka's 36 bytes of framing.
        size = 36 + len(value) + sum(len(k.encode()) + len(v) for k, v in letter.headers())
        assert PRODUCER_LIMIT - 10 * len(h) <= size <= PRODUCER_LIMIT, size
    assert sorted({k: v.decode() for k, v in m.headers()}["fusion-dlq-reason"] for m in letters) == \
        ["not-json", "too-large"]
    assert "Traceback" not in w.log()
    check_all_handed(w)
    assert intake_counts(w.log(), ("received", "dead_lettered", "started", "dropped"))[topic] == (3, 2, 1, 0)


@pytest.mark.integration
def test_a_copy_the_broker_refuses_as_too_large_is_dead_lettered_as_its_headers_alone(kit, worker_factory):
    """The worker's producer takes 2 MB (fusion_kafka_producer_config) and so does fusion_max_message_bytes,
    but the dead-letter topic has the broker's limit (about 1 MB): a 1.5 MB record that is not JSON is
    dead-lettered as its headers alone, with its original size, and the reactor goes on."""
    env = {**isolated_env("kafka", db=12), "FUSION_KAFKA_PRODUCER_CONFIG": json.dumps({"message.max.bytes": 2_000_000}),
           "FUSION_MAX_MESSAGE_BYTES": "2000000"}
    topic = big_records_topic(kit, env)
    w = worker_factory(name="brokerdlq", env=env, concurrency=2)
    offsets = send_big(kit, topic, {"not-json": b"<not json/>" * 136_364})
    assert offsets == {"not-json": 0}, offsets
    assert add_answers(kit, topic), "a request behind the record is answered"
    [letter] = kit.read(f"{topic}.dlq", 1, timeout=60)
    assert letter.value() is None and letter.key() is None
    h = {k: v.decode() for k, v in letter.headers()}
    assert set(h) == {"fusion-dlq-reason", "fusion-dlq-error", "fusion-dlq-source", "fusion-dlq-truncated"}
    assert (h["fusion-dlq-reason"], h["fusion-dlq-source"], h["fusion-dlq-truncated"]) == \
        ("not-json", f"{topic}[0]@0", str(11 * 136_364))
    assert "refused the dead-letter copy of" in w.log() and "Message size too large" in w.log()
    check_all_handed(w)
    assert intake_counts(w.log(), ("received", "dead_lettered", "started", "dropped"))[topic] == (2, 1, 1, 0)


# -- the dead-letter copy's size (no services) and a copy the dead-letter topic refuses (Redis) --------
WHY = [("fusion-dlq-reason", b"not-json"), ("fusion-dlq-error", b"the value is not JSON: Expecting value: line 1"),
       ("fusion-dlq-source", b"orders[0]@12345")]


def accepted_by_librdkafka(value, key, headers, limit: int) -> bool:
    """Whether librdkafka's producer with ``message.max.bytes=limit`` takes the record (a check it makes
    before sending: nothing needs to listen at the bootstrap address)."""
    p = Producer({"bootstrap.servers": "127.0.0.1:9", "message.max.bytes": limit, "log_level": 0,
                  "error_cb": lambda err: None})
    try:
        p.produce("dlq.size.check", value, key=key, headers=headers)
        return True
    except KafkaException as exc:
        assert exc.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE, exc
        return False
    finally:
        p.purge()
        p.close()


@pytest.mark.parametrize("size, limit", [(999_900, 1_000_000), (1_500_000, 1_000_000), (2_500_000, 2_000_000)])
def test_a_dead_letter_copy_is_cut_to_what_librdkafkas_producer_takes(size, limit):
    original = bytes(i % 251 for i in range(size))
    key, headers = b"order-7", [("trace", b"t" * 300), *WHY]
    assert not accepted_by_librdkafka(original, key, headers, limit)
    value, out = dead_letter_copy(original, key, headers, max_value=0, max_record=limit)
    assert out == [*headers, ("fusion-dlq-truncated", str(size).encode())], "the original length in a header"
    assert value == original[:len(value)], "the start of the original"
    assert record_size(value, key, out) <= limit
    assert accepted_by_librdkafka(value, key, out, limit)
    # At most the headers' length varints (counted at their largest) are given up.
    assert not accepted_by_librdkafka(original[:len(value) + 10 * len(out)], key, out, limit)


def test_a_dead_letter_copy_keeps_what_fits_and_is_cut_to_fusion_max_message_bytes():
    small = b"{not json"
    assert dead_letter_copy(small, None, WHY, max_value=1_000_000, max_record=1_000_000) == (small, WHY)
    assert dead_letter_copy(None, None, WHY, max_value=10, max_record=1_000_000) == (None, WHY)
    big = b"x" * 1_500_000
    # the producer takes 2 MB (the user's setting): the value alone decides, with or without a limit
    assert dead_letter_copy(big, None, WHY, max_value=0, max_record=2_000_000) == (big, WHY)
    value, out = dead_letter_copy(big, None, WHY, max_value=1_000_000, max_record=2_000_000)
    assert len(value) == 1_000_000 and out[-1] == ("fusion-dlq-truncated", b"1500000")
    # headers that leave no room: no value (the producer refuses the copy, which is then sent as headers alone)
    value, out = dead_letter_copy(big, None, [("huge", b"h" * 1_000_000), *WHY], max_value=0, max_record=1_000_000)
    assert value == b"" and out[-1] == ("fusion-dlq-truncated", b"1500000")


@dataclass
class Record:
    """A consumed record as the intake reads it (confluent_kafka.Message)."""

    _value: bytes
    _offset: int

    def error(self):
        return None

    def topic(self):
        return "dlq.unit"

    def partition(self):
        return 0

    def offset(self):
        return self._offset

    def timestamp(self):
        return (1, 1_700_000_000_000 + self._offset)

    def key(self):
        return b"k"

    def headers(self):
        return [("trace", b"t-1")]

    def value(self):
        return self._value


class OnePartition:
    """A consumer of one partition: a paused partition returns nothing, offsets are stored as the intake says."""

    def __init__(self, records: list[Record]) -> None:
        self.records, self.paused, self.stored = deque(records), False, []

    def poll(self, timeout):
        return self.records.popleft() if self.records and not self.paused else None

    def consume(self, n, timeout=0):
        return [r for r in (self.poll(0) for _ in range(n)) if r is not None]

    def assignment(self):
        return [TopicPartition("dlq.unit", 0)]

    def pause(self, parts):
        self.paused = True

    def resume(self, parts):
        self.paused = False

    def store_offsets(self, message):
        self.stored.append(message.offset())


@pytest.fixture
def dlq_intake(monkeypatch):
    """An intake reading a record that is not JSON, then a good one; its dead-letter sends answer from
    ``outcomes`` (None: delivered, else the KafkaError code) and are kept in ``sent``."""
    app = create_app("dlq-unit", broker="memory://", backend="cache+memory://")
    started: list[str] = []
    task = SimpleNamespace(topic="dlq.unit", name="fusion.test.dlq", group_id=None,
                           apply_async=lambda kwargs, task_id, **_: started.append(task_id))
    it = ReactorIntake(app, task, threading.Event())
    it.stop_event.wait = lambda timeout=None: False  # no 1-s backoff in a unit test
    it.consumer = OnePartition([Record(b"\x00\x01garbage", 0), Record(b'{"data": [1, 2]}', 1)])
    outcomes: list[int | None] = []
    sent: list[tuple] = []

    def deliver(app, topic, value, key, headers):
        sent.append((topic, value, key, headers))
        code = outcomes.pop(0)
        return None if code is None else KafkaError(code)

    monkeypatch.setattr(intake_module, "_deliver", deliver)
    yield it, outcomes, sent, started
    app.close()


def why(offset: int) -> list[tuple[str, bytes]]:
    return [("fusion-dlq-reason", b"not-json"), ("fusion-dlq-error", ANY),
            ("fusion-dlq-source", f"dlq.unit[0]@{offset}".encode())]


@pytest.mark.parametrize("refusals, headers_alone", [
    ([KafkaError.TOPIC_AUTHORIZATION_FAILED], False),  # an ACL: dropped at once
    ([KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.MSG_SIZE_TOO_LARGE], True),  # too large, even as headers
])
@pytest.mark.integration
def test_a_record_the_dead_letter_topic_refuses_for_good_is_dropped_and_logged(dlq_intake, caplog, refusals,
                                                                              headers_alone):
    it, outcomes, sent, started = dlq_intake
    outcomes += refusals
    it._step()
    copy = ("dlq.unit.dlq", b"\x00\x01garbage", b"k", [("trace", b"t-1"), *why(0)])
    bare = ("dlq.unit.dlq", None, None, [*why(0), ("fusion-dlq-truncated", b"9")])
    assert sent == ([copy, bare] if headers_alone else [copy])
    assert it.counts == {"received": 2, "dead_lettered": 0, "started": 1, "dropped": 1}
    assert it.consumer.stored == [0, 1] and len(started) == 1, "the partition goes on after the dropped record"
    assert not it.pending and not it.consumer.paused
    [error] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "dropped dlq.unit[0]@0 (not-json" in error.getMessage()
    assert KafkaError(refusals[-1]).str() in error.getMessage()


@pytest.mark.integration
def test_a_copy_the_dead_letter_topic_refuses_as_too_large_is_sent_as_its_headers(dlq_intake):
    it, outcomes, sent, started = dlq_intake
    outcomes += [KafkaError.MSG_SIZE_TOO_LARGE, None]
    it._step()
    assert [(value, key, headers) for _, value, key, headers in sent] == [
        (b"\x00\x01garbage", b"k", [("trace", b"t-1"), *why(0)]),
        (None, None, [*why(0), ("fusion-dlq-truncated", b"9")])]
    assert it.counts == {"received": 2, "dead_lettered": 1, "started": 1, "dropped": 0}
    assert it.consumer.stored == [0, 1]


@pytest.mark.integration
def test_a_dead_letter_send_that_fails_while_kafka_is_away_is_made_again(dlq_intake):
    it, outcomes, sent, started = dlq_intake
    outcomes += [KafkaError._MSG_TIMED_OUT]
    it._step()
    assert len(sent) == 1 and [m.offset() for m in it.pending] == [0, 1] and it.consumer.paused, \
        "kept, in order, its partition paused"
    assert it.counts == {"received": 2, "dead_lettered": 0, "started": 0, "dropped": 0}
    outcomes += [None]
    it._step()
    assert len(sent) == 2 and sent[1][1] == b"\x00\x01garbage", "the whole copy, once Kafka is back"
    assert it.counts == {"received": 2, "dead_lettered": 1, "started": 1, "dropped": 0}
    assert it.consumer.stored == [0, 1] and not it.pending
