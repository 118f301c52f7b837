"""Waits survive `kill -9`: a worker started afterwards completes them, and no body runs twice."""

import json
import uuid

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import NewTopic
from conftest import committed_total, isolated_env, wait_for


def test_kill_9_with_50_pending_waits(kit, service, worker_factory, redis_client):
    env = isolated_env()
    run = env["FUSION_TEST_RUN"]
    a = worker_factory(name="crashA", env=env, concurrency=2)
    gate_topic = kit.topic()
    gate = service(gate_topic, lambda data: {"echo": data})
    gate.hold = True
    n = 50
    backs = [f"fusion.rt.{uuid.uuid4().hex}" for _ in range(n)]
    for f in kit.admin.create_topics([NewTopic(b, 1, 1) for b in backs]).values():
        f.result(60)
    reactor_topic = f"{run}.generic"
    for i, back in enumerate(backs):
        kit.producer.produce(reactor_topic, json.dumps({
            "data": {"deps": {"g": {"topic": gate_topic, "args": [i]}}, "echo": i},
            "return-topic": back, "id": f"k{i}"}))
    kit.producer.flush(30)
    wait_for(lambda: len(gate.received) >= n, 120, f"{n} dependency requests (waits registered)")
    wait_for(lambda: committed_total(kit.servers, f"fusion.reactor.{reactor_topic}", reactor_topic, 3) >= n, 30,
             "the reactor's intake to commit its offsets")

    a.kill()
    gate.hold = False
    gate.release()  # the replies now wait in Kafka, nobody is listening

    worker_factory(name="crashB", env=env, concurrency=2)
    c = Consumer({"bootstrap.servers": kit.servers, "group.id": "crash-reader", "enable.auto.commit": False})
    c.assign([TopicPartition(b, 0, OFFSET_BEGINNING) for b in backs])
    got = {}

    def all_answered():
        got.update({m.topic(): json.loads(m.value()) for m in c.consume(100, timeout=0.5) if m.error() is None})
        return len(got) == n

    wait_for(all_answered, 180, f"all {n} answers after the restart")
    c.close()
    kit.admin.delete_topics(backs)
    for i, back in enumerate(backs):
        assert got[back] == {"results": {"g": {"echo": [i]}}, "echo": i}
    runs = [int(redis_client.get(f"bodyruns:{run}:k{i}") or 0) for i in range(n)]
    assert runs == [1] * n, f"chord bodies ran {runs}"
    assert len(gate.received) == n, "a dependency request was sent twice"
