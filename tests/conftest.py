"""Fixtures and hooks of the test suite; the helpers they use are in ``tests/support``.

Tests marked ``integration`` talk to the real stack (Kafka, Redis, ZooKeeper)
and to real ``celery worker`` processes.  If a service is unreachable the test
fails with a message naming it, never a skip: run ``make up`` or ``make test``.
Unmarked tests need no service (``make test-unit``); a test that asks for one of
the service fixtures without the ``integration`` marker is a collection error.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.register_assert_rewrite("support")  # the helpers' asserts explain themselves as a test's do

from support.kafka import KafkaKit, Service  # noqa: E402
from support.stack import BACKEND, BROKER, KAFKA, RUN_ID, ZOOKEEPER  # noqa: E402
from support.workers import REGISTRIES, Deployment, Worker, isolated_env  # noqa: E402

#: The fixtures that reach a service; every other service fixture depends on one of them.
SERVICE_FIXTURES = frozenset({"kafka", "redis_client", "zookeeper", "stack", "rabbitmq"})


# -- services -------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _no_stack_urls_without_integration(request, monkeypatch) -> None:
    """Celery takes ``CELERY_BROKER_URL`` and ``CELERY_RESULT_BACKEND`` from the environment over the URLs
    an app is given.  A test without the ``integration`` marker runs without them, so the app it makes
    with ``broker="memory://"`` uses that and never the stack's Redis (support.stack exports them)."""
    if request.node.get_closest_marker("integration") is None:
        for name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
            monkeypatch.delenv(name, raising=False)


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
def rabbitmq() -> str:
    """The stack's broker, which must be RabbitMQ and answer (``make test-rabbitmq`` starts it)."""
    from support.brokers import is_rabbitmq
    if not is_rabbitmq():
        pytest.fail(f"the Celery broker is {BROKER}, not RabbitMQ: run `make test-rabbitmq` "
                    f"(or `FUSION_BROKER=rabbitmq make up`)", pytrace=False)
    import kombu
    try:
        with kombu.Connection(BROKER, connect_timeout=10) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        pytest.fail(f"RabbitMQ at {BROKER} is unreachable ({exc}); start it with `FUSION_BROKER=rabbitmq make up`",
                    pytrace=False)
    return BROKER


@pytest.fixture(scope="session", autouse=True)
def _rabbitmq_vhosts() -> Iterator[None]:
    """The vhosts isolated deployments got on RabbitMQ go at the end of the session (after their workers)."""
    yield
    from support.brokers import delete_vhosts
    delete_vhosts()


@pytest.fixture(autouse=True)
def _rabbitmq_when_asked(request) -> None:
    """A test marked ``rabbitmq``, and every test of a run that asks for RabbitMQ (``FUSION_TEST_BROKER=rabbitmq``,
    as ``make test-rabbitmq`` sets it), runs on RabbitMQ or fails."""
    asked = os.environ.get("FUSION_TEST_BROKER") == "rabbitmq" and request.node.get_closest_marker("integration")
    if request.node.get_closest_marker("rabbitmq") is not None or asked:
        request.getfixturevalue("rabbitmq")


@pytest.fixture(scope="session")
def stack(kafka, redis_client, zookeeper) -> dict[str, str]:
    return {"kafka": kafka, "broker": BROKER, "backend": BACKEND, "zookeeper": zookeeper}


@pytest.fixture(scope="session")
def app(stack):
    from fusion_celery import app as fusion_app
    return fusion_app


# -- Kafka ----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def kit(kafka) -> Iterator[KafkaKit]:
    k = KafkaKit(kafka)
    yield k
    k.close()


@pytest.fixture
def service(kit) -> Iterator[Callable[..., Service]]:
    """Start dependency services (``service(topic, fn)``); they stop at the end of the test."""
    started: list[Service] = []

    def start(topic: str, fn: Callable[[Any], Any]) -> Service:
        s = Service(kit.servers, topic, fn)
        s.start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def gates(kit) -> Iterator[Callable[[], Any]]:
    """Start dependencies that hold their replies until released (``gates()``; see support.reliability.Gate);
    they stop at the end of the test."""
    from support.reliability import start_gate
    started: list[Any] = []

    def make() -> Any:
        g = start_gate(kit)
        started.append(g)
        return g

    yield make
    for g in started:
        g.stop()


# -- workers --------------------------------------------------------------------------------------
@pytest.fixture
def worker_factory(stack) -> Iterator[Callable[..., Worker]]:
    """Start workers (``worker_factory(imports=..., name=..., env=...)``); those still running stop after the test."""
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


# -- hooks ----------------------------------------------------------------------------------------
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Collect a test's garbage (the frames of a failure keep Kafka clients in reference cycles) here, on
    the main thread: left to the cyclic collector, it may run on a librdkafka thread while that thread
    runs the Python callback of an admin request, and a client destroyed on its own thread aborts."""
    yield
    gc.collect()


@pytest.hookimpl(trylast=True)  # after pytest grouped the items by their parametrized session fixtures
def pytest_collection_modifyitems(session, config, items):
    """Refuse a test that uses a service fixture without the ``integration`` marker (``make test-unit``
    would run it without the stack), then order the tests that stop stack services (``faults``) last,
    so a fault never hits another test."""
    unmarked = [item.nodeid for item in items if item.get_closest_marker("integration") is None
                and SERVICE_FIXTURES & set(getattr(item, "fixturenames", ()))]
    if unmarked:
        raise pytest.UsageError("tests that use the stack without the `integration` marker:\n  "
                                + "\n  ".join(unmarked))
    items.sort(key=lambda item: item.get_closest_marker("faults") is not None)
