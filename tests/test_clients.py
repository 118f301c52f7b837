"""Where a process's Kafka clients come from: confluent_kafka, or the in-memory stub for memory:// (no services)."""

from __future__ import annotations

import sys
import time
import types

import confluent_kafka
import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from fusion_celery import clients as clients_module
from fusion_celery.application import create_app
from fusion_celery.clients import Clients, kafka_api
from fusion_celery.errors import ConfigurationError


@pytest.fixture
def app():
    app = create_app("clients-test", broker="memory://", backend="cache+memory://")
    yield app
    app.close()


class FakeClient:
    """Records the librdkafka settings it was made with."""

    def __init__(self, config):
        self.config = config


@pytest.fixture
def stub(monkeypatch):
    """A stand-in for fusion_celery.testing.kafka."""
    module = types.ModuleType("fake_kafka_stub")
    module.Producer = type("Producer", (FakeClient,), {})
    module.Consumer = type("Consumer", (FakeClient,), {})
    module.AdminClient = type("AdminClient", (FakeClient,), {})
    module.NewTopic = NewTopic
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(clients_module, "STUB_MODULE", module.__name__)
    return module


def test_real_servers_get_confluent_kafka(app):
    app.conf.fusion_kafka_bootstrap_servers = "127.0.0.1:9092"
    api = kafka_api(app)
    assert (api.Producer, api.Consumer, api.AdminClient, api.NewTopic) == \
        (confluent_kafka.Producer, confluent_kafka.Consumer, AdminClient, NewTopic)


def test_memory_servers_get_the_stub_for_every_client(app, stub):
    app.conf.fusion_kafka_bootstrap_servers = "memory://clients-test"
    c = Clients(app)
    assert c.api is stub
    assert isinstance(c.producer, stub.Producer) and isinstance(c.admin, stub.AdminClient)
    consumer = c.consumer(**{"group.id": "g"})
    assert isinstance(consumer, stub.Consumer)
    assert consumer.config["bootstrap.servers"] == "memory://clients-test"
    assert consumer.config["group.id"] == "g"


def test_memory_servers_without_the_stub_are_a_configuration_error_naming_it(app, monkeypatch):
    monkeypatch.setattr(clients_module, "STUB_MODULE", "fusion_celery.no_such_stub")
    app.conf.fusion_kafka_bootstrap_servers = "memory://"
    with pytest.raises(ConfigurationError, match="fusion_celery.no_such_stub"):
        Clients(app)


# -- a process's clients on the in-memory stub --------------------------------------------------------
@pytest.fixture
def on_stub(app):
    """``(clients, broker)``: the app's clients on an in-memory broker of their own."""
    import uuid

    from fusion_celery.config import reload
    from fusion_celery.testing.broker import Broker
    name = f"clients-{uuid.uuid4().hex[:8]}"
    app.conf.fusion_kafka_bootstrap_servers = f"memory://{name}"
    app.conf.fusion_kafka_retry_timeout = 1.0
    app.conf.fusion_kafka_client_recycle_topics = 3
    reload(app)
    c = Clients(app)
    yield c, Broker.named(name)
    c.close()


def test_topics_are_created_seen_and_deleted(on_stub):
    c, _ = on_stub
    assert not c.topic_exists("t.one", ttl=0, wait=0)
    c.create_topics(["t.one"], partitions=2, visible=True)
    assert c.topic_exists("t.one", ttl=0, wait=0)
    c.delete_topics(["t.one", "t.one"], wait=True)  # a name twice is deleted once
    assert not c.topic_exists("t.one", ttl=0, wait=0)


def test_produce_waits_for_the_acknowledgement_and_returns_where_the_record_went(on_stub):
    c, _ = on_stub
    c.create_topics(["t.two"], partitions=1, visible=True)
    first = c.produce("t.two", b"a", key="k", headers=[("h", b"1")])
    second = c.produce("t.two", b"b", key="k")
    assert (first.topic(), first.partition(), first.offset()) == ("t.two", 0, 0)
    assert second.offset() == 1


def test_produce_rides_out_a_short_outage_and_names_the_topic_after_a_long_one(on_stub):
    import threading

    from fusion_celery.errors import FusionError
    c, broker = on_stub
    c.create_topics(["t.three"], visible=True)
    broker.down()
    threading.Timer(0.3, broker.up).start()
    assert c.produce("t.three", b"after the outage").offset() == 0
    broker.down()
    try:
        with pytest.raises(FusionError, match="t.three"):
            c.produce("t.three", b"never")
    finally:
        broker.up()


def test_a_client_that_touched_too_many_topics_is_replaced(on_stub):
    c, _ = on_stub
    c.create_topics([f"t.r{i}" for i in range(5)], visible=True)
    first = c.producer
    for i in range(5):
        c.produce(f"t.r{i}", b"x")
    assert c.producer is not first, "the producer was replaced after 3 distinct topics"
    assert c.produce("t.r0", b"y").offset() == 1, "the new producer writes where the old one did"


# -- the cache of topics known to exist ---------------------------------------------------------------
class LookupCounter:
    """Counts the metadata requests for each topic that go through the clients' current producer."""

    def __init__(self, c: Clients, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts: dict[str | None, int] = {}
        producer = c.producer
        real = producer.list_topics

        def counting(topic=None, timeout=-1):
            self.counts[topic] = self.counts.get(topic, 0) + 1
            return real(topic, timeout)

        monkeypatch.setattr(producer, "list_topics", counting)


def test_a_topic_known_to_exist_costs_no_metadata_request_until_its_answer_expires(on_stub, monkeypatch):
    c, _ = on_stub
    c.create_topics(["t.cached"], visible=True)
    lookups = LookupCounter(c, monkeypatch)
    assert all(c.topic_exists("t.cached") for _ in range(50))
    assert lookups.counts == {"t.cached": 1}, "only the first look-up asks the broker"
    assert c.topic_exists("t.cached", ttl=0), "ttl=0 asks the broker whatever the cache holds"
    assert lookups.counts == {"t.cached": 2}
    assert c.topic_exists("t.cached", ttl=0.05)
    time.sleep(0.1)
    assert c.topic_exists("t.cached")
    assert lookups.counts == {"t.cached": 4}, "a positive answer is trusted for the ttl of the look-up that gave it"


def test_a_send_to_a_cached_topic_that_was_deleted_fails_at_once_naming_it_and_uncaches_it(on_stub):
    from fusion_celery.errors import UnknownTopic
    c, broker = on_stub
    c.create_topics(["t.gone"], visible=True)
    assert c.topic_exists("t.gone")
    broker.delete_topic("t.gone")
    assert c.topic_exists("t.gone"), "the cache still says yes: no metadata request was made"
    started = time.monotonic()
    with pytest.raises(UnknownTopic, match=r"Kafka topic 't\.gone' does not exist \(Broker: Unknown topic"):
        c.produce("t.gone", b"x")
    assert time.monotonic() - started < 0.5, "refused by the broker, not held for the metadata propagation"
    assert not c.topic_exists("t.gone", wait=0), "the refusal dropped the topic from the cache"


def test_a_send_to_a_topic_the_producer_never_saw_fails_after_the_propagation_allowance(on_stub):
    from fusion_celery.config import reload
    from fusion_celery.errors import UnknownTopic
    c, _ = on_stub
    c.app.conf.fusion_kafka_producer_config = {"topic.metadata.propagation.max.ms": 200}
    reload(c.app)
    with pytest.raises(UnknownTopic, match=r"'t\.never' does not exist \(Local: Unknown topic\)"):
        c.produce("t.never", b"x")


def test_a_replaced_producer_looks_the_cached_topics_up_again(on_stub, monkeypatch):
    c, _ = on_stub  # the producer is replaced after 3 distinct topics
    c.create_topics(["t.a", "t.b", "t.c"], visible=True)
    assert c.topic_exists("t.a")
    first = c.producer
    for name in ("t.a", "t.b", "t.c"):
        c.produce(name, b"x")
    assert c.producer is not first
    lookups = LookupCounter(c, monkeypatch)
    assert c.topic_exists("t.a")
    assert lookups.counts == {"t.a": 1}, "the new producer never saw t.a: it is asked again, and knows it then"


# -- replication of the topics fusion-celery creates --------------------------------------------------
class _Admin:
    """An admin client whose cluster lists ``brokers`` brokers and that records the topics asked for."""

    def __init__(self, brokers: int) -> None:
        self.brokers = {i: object() for i in range(1, brokers + 1)}
        self.created: list[NewTopic] = []

    def list_topics(self, timeout: float = -1, topic: str | None = None):
        return types.SimpleNamespace(brokers=self.brokers, topics={})

    def create_topics(self, new, operation_timeout=0, request_timeout=0):
        import concurrent.futures
        self.created.extend(new)
        futures = {}
        for t in new:
            f = concurrent.futures.Future()
            f.set_result(None)
            futures[t.topic] = f
        return futures


@pytest.mark.parametrize(("brokers", "expected"), [(1, (1, 1)), (2, (2, 1)), (3, (3, 2)), (5, (3, 2))])
def test_topics_are_replicated_min_3_brokers_times_with_2_in_sync_from_3_copies(app, brokers, expected):
    c = Clients(app)
    c._admin = admin = _Admin(brokers)
    assert c.replication() == expected
    c.create_topics(["t.rep"], partitions=2, config={"retention.ms": "1000"})
    (topic,) = admin.created
    assert (topic.replication_factor, topic.num_partitions) == (expected[0], 2)
    assert topic.config == {"min.insync.replicas": str(expected[1]), "retention.ms": "1000"}


def test_replication_settings_win_over_the_cluster_size(app):
    from fusion_celery.config import reload
    app.conf.fusion_topic_replication_factor = 2
    app.conf.fusion_topic_min_insync_replicas = 2
    reload(app)
    c = Clients(app)
    c._admin = _Admin(5)
    assert c.replication() == (2, 2)


def test_the_shared_producer_waits_for_every_in_sync_replica_and_is_idempotent(app, stub):
    app.conf.fusion_kafka_bootstrap_servers = "memory://clients-test"
    config = Clients(app).producer.config
    assert (config["acks"], config["enable.idempotence"]) == ("all", True)


def test_topics_on_the_stub_are_made_with_their_min_insync_replicas(on_stub):
    c, broker = on_stub
    c.create_topics(["t.isr"], partitions=1)
    assert c.replication() == (1, 1)
    assert broker.topics["t.isr"].config["min.insync.replicas"] == "1"


class _Restarting(_Admin):
    """A cluster of three that refuses ``refusals`` creations as a restarting broker re-registers."""

    def __init__(self, refusals: int) -> None:
        super().__init__(3)
        self.refusals = refusals

    def create_topics(self, new, operation_timeout=0, request_timeout=0):
        import concurrent.futures

        from confluent_kafka import KafkaError, KafkaException
        if self.refusals <= 0:
            return super().create_topics(new)
        self.refusals -= 1
        futures = {}
        for t in new:
            f = concurrent.futures.Future()
            f.set_exception(KafkaException(KafkaError(
                KafkaError.INVALID_REPLICATION_FACTOR, "Unable to replicate the partition 3 time(s): The target "
                "replication factor of 3 cannot be reached because only 2 broker(s) are registered.")))
            futures[t.topic] = f
        return futures


def test_a_creation_refused_while_a_broker_re_registers_is_tried_again(app):
    c = Clients(app)
    c._admin = admin = _Restarting(refusals=2)
    c.create_topics(["t.restart"])
    assert [t.topic for t in admin.created] == ["t.restart"] and admin.refusals == 0


def test_a_replication_factor_the_cluster_never_had_brokers_for_fails_at_once_naming_it(app):
    from fusion_celery.config import reload
    from fusion_celery.errors import FusionError
    app.conf.fusion_topic_replication_factor = 5
    reload(app)
    c = Clients(app)
    c._admin = admin = _Restarting(refusals=100)
    with pytest.raises(FusionError, match="cannot create Kafka topic.*t.five.*replication factor of 3"):
        c.create_topics(["t.five"])
    assert admin.refusals == 99, "asked once, not again"
