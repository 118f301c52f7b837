"""The foundation: the real stack answers, and a real worker process starts and stops cleanly."""

import signal
import uuid

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from support.stack import KAFKA
from support.waiting import wait_for

pytestmark = pytest.mark.integration


def test_kafka_create_produce_consume_delete(kit):
    topic = kit.topic()
    assert topic in kit.topics()
    kit.send(topic, b"hello", key=b"k")
    [msg] = kit.read(topic, 1)
    assert (msg.key(), msg.value()) == (b"k", b"hello")
    futures = kit.admin.delete_topics([topic])
    futures[topic].result(30)
    kit.created.remove(topic)
    wait_for(lambda: topic not in kit.topics(), 30, f"topic {topic} to be deleted")


def test_kafka_auto_topic_creation_is_off(kit):
    c = Consumer({"bootstrap.servers": KAFKA, "group.id": "probe", "allow.auto.create.topics": True})
    name = f"never.{uuid.uuid4().hex}"
    c.assign([TopicPartition(name, 0, OFFSET_BEGINNING)])
    c.consume(1, timeout=1.0)
    c.close()
    assert name not in kit.topics()


def test_zookeeper_znode_roundtrip(zookeeper):
    from kazoo.client import KazooClient
    zk = KazooClient(hosts=zookeeper)
    zk.start(timeout=10)
    try:
        path = f"/fusion-test/{uuid.uuid4().hex}"
        zk.create(path, b"v1", makepath=True)
        assert zk.get(path)[0] == b"v1"
        zk.delete(path)
        assert zk.exists(path) is None
    finally:
        zk.stop()
        zk.close()


def test_celery_task_roundtrip_through_a_real_worker(app, services_worker):
    result = app.send_task("tests.ping", args=["x"])
    value = result.get(timeout=30)
    assert value["pong"] == "x" and value["pid"] != services_worker.proc.pid  # ran in a pool child


def test_worker_stops_cleanly_on_sigterm(worker_factory):
    w = worker_factory(name="term")
    w.proc.send_signal(signal.SIGTERM)
    assert w.proc.wait(60) == 0
    log = w.log()
    assert "waiter: stopped" in log and "intake stopped" in log
    assert "Traceback" not in log


def test_worker_with_unreachable_kafka_fails_with_a_clear_message(stack):
    from support.workers import Worker
    w = Worker("nokafka", "tests.apps.services", env={"FUSION_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
                                                      "FUSION_STARTUP_TIMEOUT": "3"})
    import subprocess
    out = subprocess.run(w.cmd, env=w.env, capture_output=True, text=True, timeout=90, cwd=str(w.log_path.parents[2]))
    assert out.returncode != 0
    assert "fusion-celery cannot start: Kafka at 127.0.0.1:1 did not answer" in out.stdout + out.stderr


def test_worker_with_a_backend_that_cannot_run_chords_fails_clearly(stack):
    from support.workers import Worker
    w = Worker("nobackend", "tests.apps.services", env={"CELERY_RESULT_BACKEND": "rpc://"})
    import subprocess
    out = subprocess.run(w.cmd, env=w.env, capture_output=True, text=True, timeout=90, cwd=str(w.log_path.parents[2]))
    assert out.returncode != 0
    assert "cannot run fusion-celery's chords" in out.stdout + out.stderr


def test_worker_with_a_registry_url_nobody_serves_fails_clearly(stack):
    from support.workers import Worker
    w = Worker("noregistry", "tests.apps.services", env={"FUSION_REGISTRY_URL": "nope://somewhere/waits"})
    import subprocess
    out = subprocess.run(w.cmd, env=w.env, capture_output=True, text=True, timeout=90, cwd=str(w.log_path.parents[2]))
    assert out.returncode != 0
    assert "fusion-celery cannot start" in out.stdout + out.stderr and "'nope'" in out.stdout + out.stderr
    assert "did not start within" not in out.stdout + out.stderr
