"""Test harness: the real stack's endpoints, real `celery worker` processes, Kafka helpers.

Every integration test talks to real services.  If one is unreachable the test
fails with a message naming it (never a skip): run `make up` or `make test`.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fusion_celery.config import stack_env  # noqa: E402

RUN_ID = os.environ.setdefault("FUSION_TEST_RUN", uuid.uuid4().hex[:8])


def endpoint(name: str, default: str) -> str:
    return os.environ.get(name) or stack_env().get(name) or default


KAFKA = endpoint("FUSION_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
BROKER = endpoint("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
BACKEND = endpoint("CELERY_RESULT_BACKEND", "redis://127.0.0.1:6379/1")
ZOOKEEPER = endpoint("FUSION_ZOOKEEPER_HOSTS", "127.0.0.1:2181")
for _k, _v in {"FUSION_KAFKA_BOOTSTRAP_SERVERS": KAFKA, "CELERY_BROKER_URL": BROKER,
               "CELERY_RESULT_BACKEND": BACKEND, "FUSION_ZOOKEEPER_HOSTS": ZOOKEEPER}.items():
    os.environ[_k] = _v
os.environ["FUSION_TEST_REDIS"] = BACKEND


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``cond`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


# -- services -------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def kafka() -> str:
    from confluent_kafka.admin import AdminClient
    try:
        AdminClient({"bootstrap.servers": KAFKA}).list_topics(timeout=10)
    except Exception as exc:
        pytest.fail(f"Kafka at {KAFKA} is unreachable ({exc}); start the stack with `make up`", pytrace=False)
    return KAFKA


@pytest.fixture(scope="session")
def redis_client():
    import redis
    client = redis.Redis.from_url(BACKEND)
    try:
        client.ping()
    except Exception as exc:
        pytest.fail(f"Redis at {BACKEND} is unreachable ({exc}); start the stack with `make up`", pytrace=False)
    yield client
    client.close()


@pytest.fixture(scope="session")
def zookeeper() -> Iterator[str]:
    from kazoo.client import KazooClient
    zk = KazooClient(hosts=ZOOKEEPER, timeout=5)
    try:
        zk.start(timeout=10)
    except Exception as exc:
        pytest.fail(f"ZooKeeper at {ZOOKEEPER} is unreachable ({exc}); start the stack with `make up`",
                    pytrace=False)
    zk.stop()
    zk.close()
    yield ZOOKEEPER
    # Remove the registries this run made (workers using them are stopped by now).
    zk = KazooClient(hosts=ZOOKEEPER, timeout=5)
    zk.start(timeout=30)
    for child in zk.get_children("/"):
        if child.startswith((f"fusion-{RUN_ID}", f"fusion-test-{RUN_ID}")):
            zk.delete(f"/{child}", recursive=True)
    zk.stop()
    zk.close()


@pytest.fixture(scope="session")
def stack(kafka, redis_client, zookeeper) -> dict[str, str]:
    return {"kafka": kafka, "broker": BROKER, "backend": BACKEND, "zookeeper": zookeeper}


# -- Kafka helpers -------------------------------------------------------------------------------
class KafkaKit:
    """Small helpers over confluent-kafka for tests (topics, produce, read)."""

    def __init__(self, servers: str) -> None:
        from confluent_kafka import Producer
        from confluent_kafka.admin import AdminClient
        self.servers = servers
        self.admin = AdminClient({"bootstrap.servers": servers})
        self.producer = Producer({"bootstrap.servers": servers, "linger.ms": 0})
        self.created: list[str] = []

    def topic(self, name: str | None = None, partitions: int = 1) -> str:
        from confluent_kafka.admin import NewTopic
        name = name or f"t.{RUN_ID}.{uuid.uuid4().hex[:10]}"
        fut = self.admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])[name]
        try:
            fut.result(30)
        except Exception as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
        self.created.append(name)
        self.wait_visible([name])
        return name

    def topics(self, prefix: str = "") -> set[str]:
        return {t for t in self.admin.list_topics(timeout=10).topics if t.startswith(prefix)}

    def wait_visible(self, names: list[str], timeout: float = 60.0) -> None:
        """Wait until the broker's metadata lists ``names``: the controller answers a creation before
        the broker knows the topic, and a reply sent in between is dropped as "no longer exists"."""
        wait_for(lambda: not set(names) - self.topics(), timeout, f"{len(names)} new topic(s) to be visible")

    def send(self, topic: str, value: bytes | str | dict | None, headers=None, key=None):
        if isinstance(value, dict):
            value = json.dumps(value)
        done: dict[str, Any] = {}
        self.producer.produce(topic, value, key=key, headers=headers,
                              on_delivery=lambda err, msg: done.update(err=err, msg=msg))
        self.producer.flush(30)
        assert done.get("err") is None, done
        return done["msg"]

    def read(self, topic: str, count: int, timeout: float = 30.0, partitions: int = 1,
             at_most: bool = False) -> list[Any]:
        """Read ``count`` records from the beginning of ``topic`` (fail after ``timeout``).

        With ``at_most``, read for ``timeout`` seconds and return what came, up to ``count``
        (to show that no more than some number of records were written)."""
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
        c = Consumer({"bootstrap.servers": self.servers, "group.id": f"reader-{uuid.uuid4().hex}",
                      "enable.auto.commit": False})
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        try:
            while len(out) < count and time.monotonic() < deadline:
                for m in c.consume(count - len(out), timeout=0.5):
                    if m.error() is None:
                        out.append(m)
        finally:
            c.close()
        if len(out) < count and not at_most:
            pytest.fail(f"read {len(out)} of {count} records from {topic} within {timeout}s")
        return out

    def close(self) -> None:
        if self.created:
            # Each name once: confluent-kafka 2.16 crashes on a DeleteTopics result that names a topic twice.
            for f in self.admin.delete_topics(list(dict.fromkeys(self.created))).values():
                f.exception(30)  # waited for: a client is never destroyed with its requests in flight
        self.producer.flush(10)
        self.producer.close()
        self.admin.__exit__(None, None, None)


@pytest.fixture(scope="session")
def kit(kafka) -> Iterator[KafkaKit]:
    k = KafkaKit(kafka)
    yield k
    k.close()


class Service(threading.Thread):
    """A dependency service written with confluent-kafka alone: replies ``fn(data)`` on the return topic."""

    def __init__(self, servers: str, topic: str, fn: Callable[[Any], Any], *, raw: bool = False) -> None:
        super().__init__(daemon=True)
        from confluent_kafka import Consumer, Producer
        self.servers, self.topic, self.fn, self.raw = servers, topic, fn, raw
        self.consumer = Consumer({"bootstrap.servers": servers, "group.id": f"svc-{topic}",
                                  "auto.offset.reset": "earliest"})
        self.producer = Producer({"bootstrap.servers": servers, "linger.ms": 0})
        self.stop_event = threading.Event()
        self.received: list[dict] = []
        self.held: list[tuple[str, Any]] = []
        self.hold = False

    def reply(self, return_topic: str, result: Any, headers=None) -> None:
        self.producer.produce(return_topic, json.dumps(result), headers=headers)
        self.producer.flush(10)

    def release(self) -> None:
        held, self.held = self.held, []
        for return_topic, result in held:
            self.reply(return_topic, result)

    def run(self) -> None:
        self.consumer.subscribe([self.topic])
        while not self.stop_event.is_set():
            msg = self.consumer.poll(0.1)
            if msg is None or msg.error():
                continue
            body = json.loads(msg.value())
            self.received.append({**body, "_t": time.time()})
            out = self.fn(body["data"])
            rt = body.get("return-topic") or body.get("response-topic")
            if rt:
                if self.hold:
                    self.held.append((rt, out))
                else:
                    self.reply(rt, out)
        self.consumer.close()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)
        if not self.is_alive():
            self.producer.flush(10)
            self.producer.close()


@pytest.fixture
def service(kit) -> Iterator[Callable[..., Service]]:
    started: list[Service] = []

    def start(topic: str, fn: Callable[[Any], Any]) -> Service:
        s = Service(kit.servers, topic, fn)
        s.start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


# -- workers -------------------------------------------------------------------------------------
class Worker:
    """A real `celery -A fusion_celery worker` process."""

    def __init__(self, name: str, imports: str, pool: str = "prefork", concurrency: int = 2,
                 env: dict[str, str] | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.name = f"{name}-{uuid.uuid4().hex[:6]}@localhost"
        self.log_path = ROOT / ".stack" / "logs" / f"worker-{self.name.split('@')[0]}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "FUSION_IMPORTS": imports, "PYTHONPATH": str(ROOT), **(env or {})}
        self.cmd = [sys.executable, "-m", "celery", "-A", "fusion_celery", "worker", "-n", self.name,
                    "-P", pool, "-c", str(concurrency), "-l", "info", "--without-mingle", "--without-gossip",
                    *extra_args]
        self.proc: subprocess.Popen | None = None

    def start(self, ready_timeout: float = 60.0) -> Worker:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_for(lambda: self.proc.poll() is not None or b"fusion-celery: serving" in self.log_path.read_bytes(),
                 ready_timeout, f"worker {self.name} to start (log {self.log_path})", interval=0.2)
        if self.proc.poll() is not None:
            pytest.fail(f"worker {self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            pytest.fail(f"worker {self.name} did not stop within {timeout}s of SIGTERM")
        finally:
            self._log.close()

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()


@pytest.fixture
def worker_factory(stack) -> Iterator[Callable[..., Worker]]:
    workers: list[Worker] = []

    def make(imports: str = "tests.apps.services", **kw: Any) -> Worker:
        w = Worker(kw.pop("name", "w"), imports, **kw)
        workers.append(w)
        return w.start()

    yield make
    for w in workers:
        if w.proc is not None and w.proc.poll() is None:
            w.stop()


@pytest.fixture(scope="session")
def services_worker(stack) -> Iterator[Worker]:
    """One worker serving tests/apps/services.py for the whole session."""
    w = Worker("svc", "tests.apps.services", concurrency=2, env={"FUSION_MAX_MESSAGE_BYTES": "100000"}).start()
    yield w
    w.stop()


#: The registry backends the worker-level suites run against (see the `deployment` fixture).
REGISTRIES = ("kafka", "zookeeper")


@dataclass
class Deployment:
    """A worker serving tests/apps/services.py with one registry backend, and how to reach its reactors."""

    registry: str
    worker: Worker
    env: dict[str, str]  # what another worker needs to join it (empty: the default environment)
    run: str

    def topic(self, base: str) -> str:
        """The topic the test reactor ``base`` of this deployment serves."""
        return f"{self.run}.{base}"


@pytest.fixture(scope="session", params=REGISTRIES)
def deployment(request, stack) -> Iterator[Deployment]:
    """The session worker for each registry: the default one (Kafka), and one on ZooKeeper in its own
    environment (its own broker databases, reactor topics and registry path)."""
    if request.param == "kafka":
        yield Deployment("kafka", request.getfixturevalue("services_worker"), {}, RUN_ID)
        return
    env = isolated_env(request.param, db=4)
    w = Worker(f"svc-{request.param}", "tests.apps.services", concurrency=2,
               env={**env, "FUSION_MAX_MESSAGE_BYTES": "100000"}).start()
    yield Deployment(request.param, w, env, env["FUSION_TEST_RUN"])
    w.stop()


@pytest.fixture(scope="session")
def app(stack):
    from fusion_celery import app as fusion_app
    return fusion_app


def topic_name(base: str) -> str:
    """The topic a test reactor in tests/apps serves in this run."""
    return f"{RUN_ID}.{base}"


def return_topic_name(wait_s: float = 3600.0) -> str:
    """A return topic name as fusion-celery makes them, for a caller that waits up to ``wait_s`` seconds
    (the reaper leaves it alone until then, plus its grace)."""
    now = int(time.time() * 1000)
    return f"fusion.rt.{now}.{now + int(wait_s * 1000)}.{uuid.uuid4().hex}"


def registry_url(registry: str, tag: str) -> str:
    """A registry of its own for ``registry`` (kafka | zookeeper), named after ``tag``."""
    if registry == "kafka":
        return f"kafka://fusion.waits.{tag}"
    if registry == "zookeeper":
        return f"zookeeper://{ZOOKEEPER}/fusion-{RUN_ID}{tag}"
    raise ValueError(f"unknown registry {registry!r}")


def isolated_env(registry: str = "kafka", db: int = 2) -> dict[str, str]:
    """Settings for workers that must not share work with the session worker.

    Their own Celery broker and backend databases (``db`` and ``db + 1``), their
    own registry (a topic or ZooKeeper path, so their own waiters) and their own
    reactor topics (another run id).
    """
    base = BROKER.rsplit("/", 1)[0]
    tag = uuid.uuid4().hex[:6]
    return {"CELERY_BROKER_URL": f"{base}/{db}", "CELERY_RESULT_BACKEND": f"{base}/{db + 1}",
            "FUSION_TEST_REDIS": BACKEND, "FUSION_REGISTRY_URL": registry_url(registry, tag),
            "FUSION_TEST_RUN": f"{RUN_ID}{tag}"}


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server(port: int, data_dir: Path) -> subprocess.Popen:
    """Start a private, non-persistent ``redis-server`` on ``port`` and wait until it accepts connections."""
    server = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                               "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(data_dir)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return server.poll() is not None

    wait_for(up, 30, f"redis-server on port {port}", interval=0.05)
    assert server.poll() is None, f"redis-server on port {port} exited with {server.returncode}"
    return server


def high_watermark(servers: str, topic: str) -> int:
    """Sum of the end offsets of all partitions of ``topic`` (records ever written to it)."""
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": servers, "group.id": "hw", "enable.auto.commit": False})
    try:
        md = c.list_topics(topic, timeout=10).topics[topic]
        return sum(c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in md.partitions)
    finally:
        c.close()


def committed_total(servers: str, group: str, topic: str, partitions: int) -> int:
    """Sum of the committed offsets of ``group`` on ``topic``."""
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": servers, "group.id": group, "enable.auto.commit": False})
    try:
        parts = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return sum(max(0, p.offset) for p in parts)
    finally:
        c.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Collect a test's garbage (the frames of a failure keep Kafka clients in reference cycles) here, on
    the main thread: left to the cyclic collector, it may run on a librdkafka thread while that thread
    runs the Python callback of an admin request, and a client destroyed on its own thread aborts."""
    yield
    gc.collect()


@pytest.hookimpl(trylast=True)  # after pytest grouped the items by their parametrized session fixtures
def pytest_collection_modifyitems(session, config, items):
    """Tests that stop stack services (marker ``faults``) run last, so a fault never hits another test."""
    items.sort(key=lambda item: item.get_closest_marker("faults") is not None)
