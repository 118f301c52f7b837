"""Where a process's Kafka clients come from: confluent_kafka, or the in-memory stub for memory:// (no services)."""

from __future__ import annotations

import sys
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
