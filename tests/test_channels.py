"""Reply channels (``leased``, ``shared``, ``ephemeral``): their safety rules, on the stub and on real Kafka.

Every test runs twice: on the in-process tier (stub Kafka, fakeredis, ``memory://``
registry) and against the real services (Apache Kafka with the Kafka registry, and
Redis as the result backend that holds the lease pools), each time with a worker
running fusion's bootstep in this process.  What must hold: a leased topic serves
one wait at a time and each wait reads only what came after its lease; a record
that carries another id never completes a wait; a topic whose wait timed out, or
that received a record it should not have, is retired (deleted, never leased
again); a pool never holds more topics than its bound; the reaper never deletes a
live pool's topics; ``shared`` creates no topic per request.  The ``kill -9``
test with 50 leased waits is in ``test_crash.py``.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from confluent_kafka import TopicPartition
from support.waiting import wait_for

from fusion_celery import DependencyTimeout, Message, Pipeline, reactor, signals
from fusion_celery.channels import channel
from fusion_celery.channels.leased import LeasedChannel, LeasePool, lease_counts, pool_of_topic
from fusion_celery.claims import with_retry
from fusion_celery.clients import clients
from fusion_celery.reaper import reap
from fusion_celery.testing import in_process_app, worker

ANSWER_TIMEOUT = 30.0
POOL_MAX = 32
BATCH = 8
COOLDOWN = 0.2
PREFIX = "fusion.rt."


def t(app: Celery, base: str) -> str:
    """The topic ``base`` of this app (names of their own on a broker other runs share)."""
    return f"{app.conf.fusion_test_tag}.{base}"


def define(app: Celery) -> None:
    add_topic = t(app, "add")

    @reactor(add_topic, app=app)
    def add(message: Message) -> Any:
        return sum(message.data)

    @reactor(t(app, "math"), app=app, deps=lambda m: {
        "one": {"topic": add_topic, "args": m.data},
        "two": {"topic": add_topic, "args": [2], "deps": ["one"]}})
    def math(message: Message, results: dict[str, Any]) -> Any:
        return results["two"]

    @reactor(t(app, "shared-math"), app=app, reply="shared", deps=lambda m: {
        "one": {"topic": add_topic, "args": m.data},
        "two": {"topic": add_topic, "args": [2], "deps": ["one"]}})
    def shared_math(message: Message, results: dict[str, Any]) -> Any:
        return results["two"]

    @reactor(t(app, "mixed"), app=app, deps=lambda m: {
        "e": {"topic": add_topic, "args": m.data, "reply": "ephemeral"},
        "l": {"topic": add_topic, "args": [1], "deps": ["e"], "reply": "leased"},
        "s": {"topic": add_topic, "args": [10], "deps": ["l"], "reply": "shared"}})
    def mixed(message: Message, results: dict[str, Any]) -> Any:
        return results


def make_app(variant: str, kafka: str | None) -> Celery:
    conf = {"fusion_lease_pool_max": POOL_MAX, "fusion_lease_batch": BATCH, "fusion_lease_cooldown": COOLDOWN,
            "fusion_default_timeout": ANSWER_TIMEOUT, "fusion_return_topic_prefix": PREFIX}
    tag = uuid.uuid4().hex[:8]
    app = in_process_app(f"channels-{variant}", fusion_test_tag=f"ch{tag}", fusion_test_variant=variant, **conf)
    if variant == "kafka":
        from support.stack import BACKEND
        app.backend_cls = BACKEND  # the real Redis
        app.conf.update(fusion_kafka_bootstrap_servers=kafka, fusion_registry_url=f"kafka://fusion.waits.ch{tag}",
                        fusion_return_topic_prefix=f"fusion.rt.ch{tag}.")
    from fusion_celery.config import reload
    reload(app)
    return app


@pytest.fixture(scope="module", params=["stub", pytest.param("kafka", marks=pytest.mark.integration)])
def fusion(request) -> Iterator[Celery]:
    kafka = request.getfixturevalue("kafka") if request.param == "kafka" else None
    app = make_app(request.param, kafka)
    define(app)
    clients(app).create_topics([t(app, "plain"), t(app, "silent")], partitions=1, visible=True)
    with worker(app, hostname=f"channels-{uuid.uuid4().hex[:6]}@test"):
        yield app
    if request.param == "kafka":  # the run's topics on the shared broker: its shared reply topics are permanent
        from confluent_kafka.admin import AdminClient
        admin = AdminClient({"bootstrap.servers": kafka})
        ours = [n for n in admin.list_topics(timeout=10).topics
                if n.startswith((prefix(app), f"{app.conf.fusion_test_tag}."))]
        for future in admin.delete_topics([*ours, app.conf.fusion_registry_url.removeprefix("kafka://")]).values():
            future.result(60)


@pytest.fixture
def sent(fusion) -> Iterator[list[dict[str, Any]]]:
    """The ``dependency_sent`` signals of the test (each names its return topic)."""
    seen: list[dict[str, Any]] = []
    lock = threading.Lock()

    def receiver(sender: Any = None, **fields: Any) -> None:
        with lock:
            seen.append(fields)
    signals.dependency_sent.connect(receiver, weak=False)
    yield seen
    signals.dependency_sent.disconnect(receiver)


def prefix(app: Celery) -> str:
    return app.conf.fusion_return_topic_prefix


def topics(app: Celery) -> set[str]:
    return {t for t in clients(app).admin.list_topics(timeout=10).topics if t.startswith(prefix(app))}


def pool(app: Celery) -> str:
    """The id of the worker's lease pool."""
    return app._fusion_waiter.lease_pool.id


def settled(app: Celery) -> None:
    """Wait until every topic of the pool is ready again (no wait holds one, no cooldown runs)."""
    def done() -> bool:
        ready, total = lease_counts(app, pool(app))
        return ready == total
    wait_for(done, 30, "every leased topic back in the pool")


def call(app: Celery, topic: str, data: Any, timeout: float = ANSWER_TIMEOUT, reply: str | None = None) -> Any:
    return Pipeline(t(app, topic), app=app, reply=reply).delay(data, timeout=timeout).get(timeout=timeout + 10)


class PlainService:
    """A service on topic ``plain`` that knows nothing of fusion-celery: it reads a request and the test
    writes its answer (a bare JSON value, no headers, unless told otherwise)."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.c = clients(app)
        self.consumer = self.c.consumer(**{"group.id": f"plain-{uuid.uuid4().hex[:6]}", "enable.auto.commit": False})
        topic = t(app, "plain")
        _, high = self.consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        self.consumer.assign([TopicPartition(topic, 0, high)])  # what is sent from now on

    def request(self, timeout: float = 30) -> dict[str, Any]:
        found: list[Any] = []

        def got() -> bool:
            found.extend(m for m in self.consumer.consume(10, 0.1) if m.error() is None)
            return bool(found)
        wait_for(got, timeout, "a request on topic plain")
        assert len(found) == 1
        return json.loads(found[0].value())

    def answer(self, request: dict[str, Any], value: Any, headers: list[tuple[str, bytes]] | None = None) -> None:
        self.c.produce(request["return-topic"], json.dumps(value).encode(), headers=headers)

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture
def plain(fusion) -> Iterator[PlainService]:
    service = PlainService(fusion)
    yield service
    service.close()


def free_topics(app: Celery) -> list[str]:
    raw = with_retry(app, lambda c: c.lrange(f"fusion-lease-{pool(app)}-free", 0, -1))
    return [e.decode().split(" ")[0] for e in raw]


# -- leased -----------------------------------------------------------------------------------------
def test_leased_topics_serve_one_wait_after_another_and_no_topic_is_created_in_steady_state(fusion, sent):
    for i in range(4):
        assert call(fusion, "math", [i, 1]) == i + 3
        settled(fusion)  # past the cooldown: the topics are ready again
    first = {s["return_topic"] for s in sent}
    assert all(pool_of_topic(t, prefix(fusion)) == pool(fusion) for t in first), first
    assert len(first) < len(sent), "a leased topic serves one wait after another"
    existing = topics(fusion)
    sent.clear()
    for i in range(4):
        assert call(fusion, "math", [i, 2]) == i + 4
        settled(fusion)
    assert {s["return_topic"] for s in sent} <= existing, "steady state: every wait got a topic that existed"
    assert topics(fusion) == existing, "no topic was created or deleted"


def test_a_service_that_replies_with_a_bare_value_and_no_id_works_with_leased(fusion, plain):
    settled(fusion)
    backs = []
    for n in (1, 2, 3):
        result = Pipeline(t(fusion, "plain"), app=fusion, reply="leased").delay(n, timeout=ANSWER_TIMEOUT)
        request = plain.request()
        backs.append(request["return-topic"])
        plain.answer(request, n * 100)  # no fusion-id, no fusion-status: a fusion-clj-style service
        assert result.get(timeout=ANSWER_TIMEOUT) == n * 100
        settled(fusion)
    # The most recently given back topic is leased next: each later wait read only what came after its lease.
    assert backs[0] == backs[1] == backs[2], backs


def test_a_record_with_another_id_never_completes_a_leased_wait_and_its_topic_is_retired(fusion, plain):
    settled(fusion)
    waiter = fusion._fusion_waiter
    rejected = waiter.rejected
    result = Pipeline(t(fusion, "plain"), app=fusion, reply="leased").delay(41, timeout=ANSWER_TIMEOUT)
    request = plain.request()
    back = request["return-topic"]
    plain.answer(request, "forged", headers=[("fusion-status", b"ok"), ("fusion-id", b"somebody-else")])
    wait_for(lambda: waiter.rejected == rejected + 1, 30, "the waiter to drop the forged record")
    assert not result.ready()
    plain.answer(request, 42, headers=[("fusion-status", b"ok"), ("fusion-id", request["id"].encode())])
    assert result.get(timeout=ANSWER_TIMEOUT) == 42
    wait_for(lambda: back not in topics(fusion), 30, f"the retired topic {back} to be deleted")
    assert back not in free_topics(fusion)


def test_a_leased_topic_whose_wait_timed_out_is_retired(fusion, sent):
    settled(fusion)
    with pytest.raises(DependencyTimeout):
        call(fusion, "silent", None, timeout=0.5, reply="leased")
    [back] = [s["return_topic"] for s in sent]
    assert pool_of_topic(back, prefix(fusion)) == pool(fusion)
    wait_for(lambda: back not in topics(fusion), 30, f"the timed-out wait's topic {back} to be deleted")
    assert back not in free_topics(fusion)


def test_a_leased_topic_that_receives_a_record_after_its_reply_is_retired(fusion, plain):
    settled(fusion)
    result = Pipeline(t(fusion, "plain"), app=fusion, reply="leased").delay(7, timeout=ANSWER_TIMEOUT)
    request = plain.request()
    back = request["return-topic"]
    plain.answer(request, 70)
    assert result.get(timeout=ANSWER_TIMEOUT) == 70
    plain.answer(request, 71)  # a second answer, within the cooldown: the topic may not serve anybody else
    wait_for(lambda: back not in topics(fusion), 30, f"the topic {back} to be retired")
    assert back not in free_topics(fusion)


def test_the_pool_never_exceeds_its_bound_under_1000_waits_in_flight(fusion, plain):
    """1,000 waits on real Kafka; 100 (three times the bound) on the stub, which keeps the fast tier fast."""
    settled(fusion)
    n, peak, stop = 1000 if fusion.conf.fusion_test_variant == "kafka" else 100, [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], lease_counts(fusion, pool(fusion))[1])
            stop.wait(0.02)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        results = [Pipeline(t(fusion, "plain"), app=fusion).delay(i, timeout=300) for i in range(n)]
        requests: list[dict[str, Any]] = []

        def all_in() -> bool:
            requests.extend(json.loads(m.value()) for m in plain.consumer.consume(500, 0.2) if m.error() is None)
            return len(requests) >= n
        wait_for(all_in, 240, f"{n} requests in flight")
        for r in requests:
            plain.answer(r, r["data"] * 2, headers=[("fusion-id", r["id"].encode())])
        assert sorted(r.get(timeout=240) for r in results) == [2 * i for i in range(n)]
    finally:
        stop.set()
        sampler.join()
    assert 0 < peak[0] <= POOL_MAX, f"the pool held {peak[0]} topics (bound {POOL_MAX})"
    leased = channel(fusion, "leased")
    assert isinstance(leased, LeasedChannel) and leased.counts["overflow"] >= n - POOL_MAX


def test_the_reaper_never_deletes_a_live_pools_topics_and_deletes_a_dead_ones(fusion):
    """And leaves alone a pool its result backend knows nothing of (another app's on the same Kafka)."""
    assert call(fusion, "math", [1, 1]) == 4
    settled(fusion)
    mine = {t for t in topics(fusion) if pool_of_topic(t, prefix(fusion)) == pool(fusion)}
    assert mine
    ghost = LeasePool(fusion, f"ghost-{uuid.uuid4().hex[:6]}@test")
    ghost.start()
    opened = channel(fusion, "leased").open("w-ghost", 0, ghost.worker)
    assert opened.pool == ghost.id
    ghosts = {t for t in topics(fusion) if pool_of_topic(t, prefix(fusion)) == ghost.id}
    assert opened.return_topic in ghosts
    stranger = f"{prefix(fusion)}lease.{uuid.uuid4().hex[:12]}.{uuid.uuid4().hex[:16]}"  # another app's pool
    clients(fusion).create_topics([stranger], partitions=1, visible=True)
    assert not set(reap(fusion, grace=0)) & (mine | ghosts | {stranger}), "live and unknown pools keep their topics"
    with_retry(fusion, lambda c: c.delete(f"fusion-lease-{ghost.id}"))  # the ghost worker died
    deleted = set(reap(fusion, grace=0))
    assert ghosts <= deleted and not deleted & (mine | {stranger})
    wait_for(lambda: not ghosts & topics(fusion), 30, "the dead pool's topics to go")
    clients(fusion).delete_topics([stranger], wait=True)


# -- shared and mixed ---------------------------------------------------------------------------------
def test_shared_with_a_fusion_reactor_as_the_dependency_creates_no_topic_per_request(fusion, sent):
    assert call(fusion, "shared-math", [1, 1], reply="shared") == 4  # the shared topics now exist
    settled(fusion)
    before = topics(fusion)
    sent.clear()
    for i in range(3):
        assert call(fusion, "shared-math", [i, 1], reply="shared") == i + 3
    assert len(sent) == 9 and all(s["return_topic"].startswith(f"{prefix(fusion)}shared.") for s in sent)
    assert topics(fusion) == before, "no topic created or deleted"


def test_a_shared_reply_without_the_id_completes_nothing(fusion, plain):
    waiter = fusion._fusion_waiter
    rejected = waiter.rejected
    result = Pipeline(t(fusion, "plain"), app=fusion, reply="shared").delay(5, timeout=1)
    request = plain.request()
    plain.answer(request, 50)  # no fusion-id: nobody can tell whose it is
    wait_for(lambda: waiter.rejected == rejected + 1, 30, "the waiter to drop the record without an id")
    with pytest.raises(DependencyTimeout):
        result.get(timeout=30)


def test_one_deps_map_mixes_the_three_channels(fusion, sent):
    assert call(fusion, "mixed", [1, 2]) == {"e": 3, "l": 4, "s": 14}
    by_dep = {s["dep"]: s["return_topic"] for s in sent if s["dep"]}
    p = prefix(fusion)
    assert pool_of_topic(by_dep["l"], p) == pool(fusion)
    assert by_dep["s"].startswith(f"{p}shared.")
    assert by_dep["e"][len(p)].isdigit(), by_dep["e"]  # <created>.<deadline>.<random>
    wait_for(lambda: by_dep["e"] not in topics(fusion), 30, "the ephemeral topic to be deleted")


def test_a_leased_topic_whose_end_offset_cannot_be_read_cools_again_and_is_given_back_once_it_can():
    """While Kafka elects a new leader for a leased topic's partition, its end offset is unknown: the topic
    is neither given back nor retired on a guess; it cools again and is given back once the offset is read
    (on the real cluster: tests/test_cluster.py kills the leader of such partitions)."""
    from fusion_celery.testing.app import kafka_broker
    app = make_app("stub", None)
    with worker(app, hostname=f"channels-{uuid.uuid4().hex[:6]}@test"):
        ch = channel(app, "leased")
        assert isinstance(ch, LeasedChannel)
        opened = ch.open("wait-1", 0, owner=app._fusion_waiter.worker_name)
        assert opened.pool == pool(app)
        released = ch.counts["released"]
        broker = kafka_broker(app)
        broker.down()
        try:
            ch.end("wait-1", opened, 0)
            wait_for(lambda: ch._unsure, 10, "a give-back attempted while Kafka is down", interval=0.05)
            assert ch.counts["retired"] == 0 and ch.counts["released"] == released
        finally:
            broker.up()
        wait_for(lambda: ch.counts["released"] > released, 10, "the topic given back once Kafka answers")
        assert ch.counts["retired"] == 0
        assert opened.return_topic in free_topics(app)


def test_an_ephemeral_topic_whose_deletion_the_controller_refused_is_deleted_on_a_later_try():
    """A deletion refused while a broker restarts (on the real cluster: tests/test_cluster.py's rolling
    restart, which asserts that no return topic is left) is sent again on a later tick."""
    from confluent_kafka import KafkaError, KafkaException

    from fusion_celery.channels.ephemeral import EphemeralChannel
    from fusion_celery.clients import clients
    from fusion_celery.testing.app import kafka_broker
    app = make_app("stub", None)
    try:
        ch = EphemeralChannel(app)
        opened = ch.open("wait-1", int(time.time() * 1000) + 60_000)
        admin = clients(app).admin
        real, refused = admin.delete_topics, []

        def refuse_twice(names, **kw):
            if len(refused) < 2:
                refused.append(list(names))
                failed = concurrent.futures.Future()
                failed.set_exception(KafkaException(KafkaError(KafkaError.REQUEST_TIMED_OUT, "controller moved")))
                return {n: failed for n in names}
            return real(names, **kw)

        admin.delete_topics = refuse_twice
        ch.end("wait-1", opened, 0)

        def gone() -> bool:
            ch.tick(force=True)
            return opened.return_topic not in kafka_broker(app).topics

        wait_for(gone, 10, "the return topic deleted after two refusals", interval=0.05)
        assert refused == [[opened.return_topic]] * 2
    finally:
        app.close()
