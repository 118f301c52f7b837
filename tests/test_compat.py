"""The Celery and kombu internals fusion_celery.compat uses exist in the installed versions and behave as it expects.

Each test checks the real classes (kombu's virtual and Redis ``QoS``, kombu's
``Connection`` and virtual ``Channel``, Celery's worker ``Consumer`` and its
bootsteps) and names the internal that is missing or changed, so that an
upgrade of Celery or kombu that breaks the prefetched-task restore fails here,
not in a broker outage.  No service is needed: where a channel is used, kombu's
filesystem transport stands in for Redis (a virtual transport that, like the
Redis one, restores unacknowledged messages as a channel closes).
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery, bootsteps
from celery.utils.imports import symbol_by_name
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu import Connection
from kombu.transport import redis as redis_transport
from kombu.transport import virtual

from fusion_celery import compat


def bindable(fn: Any, *args: Any, **kwargs: Any) -> bool:
    """Whether ``fn`` accepts these arguments (its signature, not a call)."""
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError:
        return False
    return True


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[Connection]:
    """A connection to a broker in ``tmp_path`` (kombu's filesystem transport)."""
    with Connection("filesystem://", transport_options={"data_folder_in": str(tmp_path),
                                                        "data_folder_out": str(tmp_path),
                                                        "control_folder": str(tmp_path / "control")}) as connection:
        yield connection


def received(conn: Connection) -> tuple[Any, Any]:
    """A message received, not acknowledged, on a fresh queue and channel: (its queue, the message)."""
    queue = conn.SimpleQueue(f"compat-{uuid.uuid4().hex}", channel=conn.channel())
    queue.put({"n": 1})
    return queue, queue.get(timeout=1)


def queued(conn: Connection, name: str) -> int:
    """How many messages wait in the queue ``name`` (read through a channel of its own)."""
    queue = conn.SimpleQueue(name, channel=conn.channel())
    try:
        return queue.qsize()
    finally:
        queue.channel.close()


# -- versions ---------------------------------------------------------------------------------------
def test_the_installed_celery_and_kombu_are_in_the_verified_ranges():
    outside = compat.unverified_versions()
    assert not outside, (
        f"installed {outside} outside fusion_celery.compat.VERIFIED {compat.VERIFIED}: once every other test "
        f"of this module passes with them, widen VERIFIED")


@pytest.mark.parametrize(("version", "parsed"), [
    ("5.7.0", (5, 7, 0)), ("5.8.0rc1", (5, 8, 0)), ("6", (6,)), ("5.4.0.post1", (5, 4, 0)), ("dev", ())])
def test_release_reads_the_numeric_part_of_a_version(version, parsed):
    assert compat.release(version) == parsed


def test_a_worker_outside_the_verified_ranges_warns_once_naming_the_versions(monkeypatch, caplog):
    versions = {"celery": "5.8.1", "kombu": "5.7.0"}
    monkeypatch.setattr(compat.metadata, "version", versions.__getitem__)
    monkeypatch.setattr(compat, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="fusion_celery"):
        assert compat.check_versions() is False
        assert compat.check_versions() is False
    [record] = caplog.records
    assert "celery 5.8.1" in record.getMessage() and "kombu 5.7.0" not in record.getMessage()
    assert "celery >=5.4,<5.8" in record.getMessage() and "tests/test_compat.py" in record.getMessage()


def test_a_worker_inside_the_verified_ranges_does_not_warn(monkeypatch, caplog):
    monkeypatch.setattr(compat.metadata, "version", {"celery": "5.7.0", "kombu": "5.4.2"}.__getitem__)
    monkeypatch.setattr(compat, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="fusion_celery"):
        assert compat.check_versions() is True
    assert not caplog.records


# -- kombu ------------------------------------------------------------------------------------------
def test_virtual_qos_keeps_unacknowledged_deliveries_in_delivered(conn):
    assert "_delivered" in vars(virtual.QoS), "kombu.transport.virtual.QoS._delivered is gone"
    queue, message = received(conn)
    assert isinstance(queue.channel.qos, virtual.QoS)
    assert compat.delivered_tags(queue.channel.qos) == [message.delivery_tag]
    assert compat.delivered_tags(None) == []


def test_virtual_qos_ack_and_reject_take_a_delivery_tag():
    assert bindable(virtual.QoS.ack, None, "tag"), inspect.signature(virtual.QoS.ack)
    assert bindable(virtual.QoS.reject, None, "tag", requeue=False), inspect.signature(virtual.QoS.reject)


def test_a_closing_channel_restores_what_was_not_acknowledged_while_restore_at_shutdown_is_on(conn):
    assert virtual.QoS.restore_at_shutdown is True and redis_transport.QoS.restore_at_shutdown is True
    queue, _ = received(conn)
    assert queue.channel.qos.restore_at_shutdown is True
    queue.channel.close()
    assert queued(conn, queue.queue.name) == 1, "a closing channel no longer restores unacknowledged messages"
    queue, message = received(conn)
    message.ack()
    queue.channel.close()
    assert queued(conn, queue.queue.name) == 0, "an acknowledged message was restored"


def test_disarm_stops_the_restore_at_close(conn):
    queue, _ = received(conn)
    compat.disarm(queue.channel.qos)
    assert queue.channel.qos.restore_at_shutdown is False
    queue.channel.close()
    assert queued(conn, queue.queue.name) == 0, "a disarmed channel restored its messages as it closed"


def test_disarm_makes_acknowledgements_and_rejections_do_nothing(conn):
    queue, message = received(conn)
    qos = queue.channel.qos
    compat.disarm(qos)
    qos.restore_at_shutdown = True  # to see the acknowledgement had no effect
    message.ack()  # through the channel to qos.ack
    qos.reject("never-delivered", requeue=True)  # kombu's own reject raises KeyError for this tag
    queue.channel.close()
    assert queued(conn, queue.queue.name) == 1, "the acknowledgement of a disarmed channel reached kombu"


def test_only_the_redis_qos_restores_by_tag(conn):
    assert issubclass(redis_transport.QoS, virtual.QoS)
    assert redis_transport.Channel.QoS is redis_transport.QoS
    restore = redis_transport.QoS.restore_by_tag
    assert bindable(restore, None, "tag"), inspect.signature(restore)
    assert compat.can_restore_by_tag(SimpleNamespace(restore_by_tag=lambda tag: None))
    queue, _ = received(conn)
    assert not compat.can_restore_by_tag(queue.channel.qos)
    assert not compat.can_restore_by_tag(None)


def test_restore_by_tag_calls_the_transport_with_the_tag():
    seen: list[str] = []
    compat.restore_by_tag(SimpleNamespace(restore_by_tag=seen.append), "t-1")
    assert seen == ["t-1"]


def test_the_default_channel_and_its_qos_are_read_without_opening_them(conn):
    assert "_default_channel" in vars(Connection), "kombu.Connection._default_channel is gone"
    assert compat.default_channel_qos(conn) is None
    assert conn._default_channel is None, "reading the default channel's QoS opened a channel"
    channel = conn.default_channel
    assert conn._default_channel is channel
    assert channel._qos is None and compat.default_channel_qos(conn) is None
    qos = channel.qos
    assert channel._qos is qos and compat.default_channel_qos(conn) is qos


# -- Celery -----------------------------------------------------------------------------------------
def test_the_worker_consumer_reads_tasks_through_task_consumer_and_its_channel_qos(conn):
    app = Celery("compat-test", set_as_current=False)
    tasks_step = symbol_by_name(compat.TASKS_STEP)
    c = SimpleNamespace()
    tasks_step(c)
    assert c.task_consumer is None, f"{compat.TASKS_STEP} no longer sets Consumer.task_consumer"
    c.task_consumer = app.amqp.TaskConsumer(conn)
    qos = compat.task_channel_qos(c)
    assert isinstance(qos, virtual.QoS) and qos is c.task_consumer.channel.qos
    c.task_consumer.close()
    assert compat.task_channel_qos(SimpleNamespace(task_consumer=None)) is None


def test_the_bootsteps_fusion_requires_exist():
    for name in (compat.POOL_STEP, compat.TASKS_STEP):
        step = symbol_by_name(name)
        assert inspect.isclass(step) and issubclass(step, bootsteps.Step), name


def test_celery_calls_on_connection_error_after_connected_with_the_error():
    hook = CeleryConsumer.on_connection_error_after_connected
    assert bindable(hook, None, OSError("x")), inspect.signature(hook)
    assert "self.on_connection_error_after_connected(" in inspect.getsource(CeleryConsumer.start), (
        "celery.worker.consumer.Consumer.start no longer calls on_connection_error_after_connected")


def test_the_fusion_consumer_disarms_both_channels_then_runs_celerys_hook(conn, monkeypatch):
    calls: list[Exception] = []
    monkeypatch.setattr(CeleryConsumer, "on_connection_error_after_connected", lambda self, exc: calls.append(exc))
    queue, _ = received(conn)
    default_qos = conn.default_channel.qos
    consumer = compat.Consumer.__new__(compat.Consumer)  # the hook needs no more of a consumer than these three
    consumer.task_consumer = SimpleNamespace(channel=queue.channel)
    consumer.connection = conn
    consumer.app = Celery("compat-redis", broker="redis://127.0.0.1:1/0", set_as_current=False)
    error = ConnectionError("gone")
    consumer.on_connection_error_after_connected(error)
    for qos in (queue.channel.qos, default_qos):
        assert qos.restore_at_shutdown is False
        qos.reject("never-delivered", requeue=True)  # disarmed: kombu's own reject would raise KeyError
    assert calls == [error]


def test_the_fusion_consumer_leaves_the_channels_alone_off_redis(conn, monkeypatch):
    """On RabbitMQ the broker puts a closed channel's unacknowledged messages back: nothing to disarm."""
    calls: list[Exception] = []
    monkeypatch.setattr(CeleryConsumer, "on_connection_error_after_connected", lambda self, exc: calls.append(exc))
    queue, _ = received(conn)
    consumer = compat.Consumer.__new__(compat.Consumer)
    consumer.task_consumer = SimpleNamespace(channel=queue.channel)
    consumer.connection = conn
    consumer.app = Celery("compat-amqp", broker="amqp://guest@127.0.0.1:1//", set_as_current=False)
    error = ConnectionError("gone")
    consumer.on_connection_error_after_connected(error)
    assert queue.channel.qos.restore_at_shutdown is True
    assert calls == [error]


def test_the_worker_consumer_setting_names_the_fusion_consumer():
    from fusion_celery.application import create_app
    app = create_app("compat-consumer", broker="memory://", backend="cache+memory://")
    assert symbol_by_name(app.conf.worker_consumer) is compat.Consumer
    assert issubclass(compat.Consumer, CeleryConsumer)


def test_current_app_restored_gives_back_celerys_current_and_default_app_and_join_block():
    from celery import _state
    for name in ("default_app", "get_current_app", "set_default_app", "_set_current_app", "task_join_will_block",
                 "_set_task_join_will_block"):
        assert hasattr(_state, name), f"celery._state.{name} is gone"
    before_current = _state.get_current_app()  # makes Celery's fallback default app if there is none yet
    before_default = _state.default_app
    before_block = _state.task_join_will_block()
    with compat.current_app_restored():
        other = Celery("compat-current", set_as_current=True)
        _state.set_default_app(other)
        _state._set_task_join_will_block(not before_block)  # as a worker's pool step does
        assert _state.get_current_app() is other and _state.default_app is other
    assert _state.default_app is before_default and _state.get_current_app() is before_current
    assert _state.task_join_will_block() is before_block


def test_the_redis_backend_connects_through_create_client_and_waits_through_wait_for_pubsub():
    import inspect

    from celery.backends.redis import RedisBackend, ResultConsumer
    assert list(inspect.signature(RedisBackend._create_client).parameters) == ["self", "params"]
    assert list(inspect.signature(ResultConsumer._wait_for_pubsub).parameters)[:3] == ["self", "pubsub", "timeout"]
    source = inspect.getsource(RedisBackend)
    assert "self._create_client(" in source, "RedisBackend no longer makes its clients with _create_client"
    assert "_wait_for_pubsub(" in inspect.getsource(ResultConsumer), "the result consumer no longer waits there"


def test_redis_backend_class_replaces_the_client_and_the_wait():
    from celery.backends.redis import RedisBackend

    from fusion_celery.compat import redis_backend_class
    made, waited = [], []
    cls = redis_backend_class("B", lambda backend, **params: made.append(params) or "client",
                              lambda pubsub, timeout: waited.append(timeout) or True, extra=1)
    assert issubclass(cls, RedisBackend) and cls.extra == 1
    assert cls._create_client(object.__new__(cls), db=3) == "client" and made == [{"db": 3}]
    consumer = object.__new__(cls.ResultConsumer)
    assert consumer._wait_for_pubsub(object(), 0.5) is True and waited == [0.5]
