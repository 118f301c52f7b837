"""Kafka clients built from the app's settings, one set per process.

librdkafka handles must never cross a ``fork`` (billiard forks pool children from
the worker's main process, also later on).  :func:`clients` therefore keys the
shared producer and admin client by process id: a forked child that asks for
them gets fresh ones and never touches its parent's.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Iterable

from celery import Celery
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from .config import setting
from .errors import ConfigurationError, FusionError

__all__ = ["Clients", "clients", "close_clients", "client_config", "consume_ready"]

logger = logging.getLogger(__name__)
#: librdkafka's own log lines go here instead of straight to stderr.
rdkafka_logger = logging.getLogger("fusion_celery.rdkafka")

_SECRET_WORDS = ("password", "secret", "token", "key")


def redact(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a librdkafka config that is safe to log (secrets replaced by ``***``)."""
    return {k: ("***" if any(w in k.lower() for w in _SECRET_WORDS) and "location" not in k else v)
            for k, v in config.items()}


def client_config(app: Celery, kind: str, **extra: Any) -> dict[str, Any]:
    """librdkafka settings for a client of ``kind`` (``producer``, ``consumer`` or ``admin``)."""
    config: dict[str, Any] = {"bootstrap.servers": setting(app, "fusion_kafka_bootstrap_servers")}
    config.update(setting(app, "fusion_kafka_config") or {})
    config.update(setting(app, f"fusion_kafka_{kind}_config") or {})
    config.update(extra)
    config.setdefault("logger", rdkafka_logger)
    return config


def consume_ready(consumer: Consumer, max_messages: int, timeout: float) -> list[Any]:
    """Wait at most ``timeout`` seconds for a record, then take what else is already there (``max_messages`` in all).

    ``Consumer.consume(n, timeout)`` returns only when it has ``n`` records or the
    timeout expired, so a lone request waited out the whole timeout.
    """
    first = consumer.poll(timeout)
    if first is None:
        return []
    return [first, *consumer.consume(max_messages - 1, timeout=0)] if max_messages > 1 else [first]


def _error_logger(err: KafkaError) -> None:
    # librdkafka reports transient trouble (broker down, retrying) through this callback.
    logger.warning("kafka: %s", err)


class Clients:
    """A producer and an admin client for one process, plus topic helpers."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._producer: Producer | None = None
        self._admin: AdminClient | None = None
        self._known_topics: dict[str, float] = {}

    @property
    def producer(self) -> Producer:
        with self._lock:
            if self._producer is None:
                self._producer = Producer(client_config(
                    self.app, "producer",
                    **{"linger.ms": 0, "acks": "all", "enable.idempotence": True, "error_cb": _error_logger},
                ))
            return self._producer

    @property
    def admin(self) -> AdminClient:
        with self._lock:
            if self._admin is None:
                self._admin = AdminClient(client_config(self.app, "admin", error_cb=_error_logger))
            return self._admin

    def consumer(self, **extra: Any) -> Consumer:
        """A new consumer (the caller owns and closes it)."""
        extra.setdefault("error_cb", _error_logger)
        return Consumer(client_config(self.app, "consumer", **extra))

    def produce(self, topic: str, value: bytes | None, *, key: bytes | str | None = None,
                headers: list[tuple[str, bytes]] | None = None, timeout: float = 30.0) -> Any:
        """Produce one record and wait until Kafka acknowledged it; return its delivery record.

        Raises :class:`FusionError` naming the topic when delivery fails.
        """
        done = threading.Event()
        outcome: dict[str, Any] = {}

        def on_delivery(err: KafkaError | None, msg: Any) -> None:
            outcome["err"], outcome["msg"] = err, msg
            done.set()

        producer = self.producer
        try:
            producer.produce(topic, value, key=key, headers=headers, on_delivery=on_delivery)
        except BufferError:
            producer.poll(1.0)
            producer.produce(topic, value, key=key, headers=headers, on_delivery=on_delivery)
        except KafkaException as exc:
            raise FusionError(f"cannot send to Kafka topic {topic!r}: {exc.args[0]}") from None
        deadline = time.monotonic() + timeout
        while not done.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FusionError(f"no delivery report for Kafka topic {topic!r} within {timeout:.0f}s "
                                  f"(is Kafka at {setting(self.app, 'fusion_kafka_bootstrap_servers')} up?)")
            producer.poll(min(remaining, 0.5))
        if outcome["err"] is not None:
            raise FusionError(f"cannot send to Kafka topic {topic!r}: {outcome['err'].str()}")
        return outcome["msg"]

    def topic_exists(self, topic: str, ttl: float = 60.0) -> bool:
        """Whether ``topic`` exists (positive answers are cached for ``ttl`` seconds)."""
        now = time.monotonic()
        if self._known_topics.get(topic, 0) > now:
            return True
        md = self.producer.list_topics(topic, timeout=10)
        tmd = md.topics.get(topic)
        exists = tmd is not None and tmd.error is None
        if exists:
            self._known_topics[topic] = now + ttl
        return exists

    def create_topics(self, names: Iterable[str], partitions: int = 1, config: dict[str, str] | None = None,
                      timeout: float = 30.0, exist_ok: bool = True) -> None:
        """Create topics and wait for the controller's answer."""
        new = [NewTopic(n, num_partitions=partitions, replication_factor=-1, config=config or {}) for n in names]
        if not new:
            return
        futures = self.admin.create_topics(new, operation_timeout=timeout, request_timeout=timeout)
        for name, fut in futures.items():
            try:
                fut.result(timeout=timeout + 5)
            except KafkaException as exc:
                err = exc.args[0]
                if exist_ok and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    continue
                raise FusionError(f"cannot create Kafka topic {name!r}: {err.str()}") from None

    def delete_topics(self, names: Iterable[str], wait: bool = False, timeout: float = 30.0) -> None:
        """Delete topics; missing ones are fine.  With ``wait`` block until the controller answered."""
        names = list(names)
        if not names:
            return
        futures = self.admin.delete_topics(names, operation_timeout=timeout, request_timeout=timeout)
        if not wait:
            return
        for name, fut in futures.items():
            try:
                fut.result(timeout=timeout + 5)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                    logger.warning("cannot delete topic %s: %s", name, exc.args[0].str())

    def check_reachable(self, timeout: float) -> None:
        """Raise :class:`ConfigurationError` unless a Kafka broker answers within ``timeout`` seconds."""
        servers = setting(self.app, "fusion_kafka_bootstrap_servers")
        try:
            self.admin.list_topics(timeout=timeout)
        except KafkaException as exc:
            raise ConfigurationError(
                f"Kafka at {servers} did not answer within {timeout:.0f}s ({exc.args[0].str()}); "
                f"check fusion_kafka_bootstrap_servers / FUSION_KAFKA_BOOTSTRAP_SERVERS") from None

    def close(self) -> None:
        """Flush the producer and drop the clients."""
        with self._lock:
            producer, self._producer, self._admin = self._producer, None, None
        if producer is not None:
            remaining = producer.flush(10)
            if remaining:
                logger.warning("%d Kafka message(s) were not delivered before close", remaining)


_clients: dict[tuple[int, int], Clients] = {}
_clients_lock = threading.Lock()


def clients(app: Celery) -> Clients:
    """This process's :class:`Clients` for ``app`` (new ones after a fork)."""
    key = (id(app), os.getpid())
    with _clients_lock:
        found = _clients.get(key)
        if found is None:
            for stale in [k for k in _clients if k[1] != key[1]]:
                del _clients[stale]  # a parent's handles: never use, never close, just forget
            found = _clients[key] = Clients(app)
        return found


def close_clients(app: Celery) -> None:
    """Flush and drop this process's clients for ``app`` (warm shutdown)."""
    with _clients_lock:
        found = _clients.pop((id(app), os.getpid()), None)
    if found is not None:
        found.close()
