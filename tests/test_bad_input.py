"""Bad input over the wire: a flood of malformed requests, oversized payloads and replies, a fuzzed allow-list.

Against the real stack and real workers.  The pure decoders are fuzzed with Hypothesis in
test_protocol.py and test_graph.py.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections import Counter

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from conftest import high_watermark, isolated_env, return_topic_name, topic_name, wait_for
from reliability import Load, Sampler, check, collect, report

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
    return b"\x00\x01garbage", "not-json", None


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
    check(collect(warm, redis_client, timeout=300), allow_errors=False)
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
    check(outcome, allow_errors=False)
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


def test_reply_above_the_limit_is_an_error_reply_naming_the_setting(kit, services_worker):
    # the session worker runs with fusion_max_message_bytes=100000
    body, headers = call(kit, topic_name("big"), 150_000)
    assert headers["fusion-status"] == b"error"
    assert body["error"]["type"] == "PayloadTooLarge"
    assert "the reply is 150002 bytes, above the limit of 100000" in body["error"]["message"]
    assert "fusion_max_message_bytes" in body["error"]["message"]
    assert call(kit, topic_name("big"), 10)[0] == "x" * 10  # below the limit all is well


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


def test_dependency_reply_above_the_limit_fails_the_wait(kit, services_worker, service):
    svc_topic = kit.topic()
    service(svc_topic, lambda data: "z" * 200_000)
    body, headers = call(kit, topic_name("generic"), {"deps": {"huge": {"topic": svc_topic}}})
    assert headers["fusion-status"] == b"error"
    assert body["error"]["type"] == "DependencyFailed"
    msg = body["error"]["message"]
    assert "dep 'huge'" in msg and "the reply is 200002 bytes, above the limit of 100000" in msg


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

