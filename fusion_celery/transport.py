"""Stateless helpers around librdkafka: client settings, error classification, reading, logging.

Nothing here holds a client: :mod:`fusion_celery.clients` owns the long-lived
ones.  What is here is shared by every piece of code that talks to Kafka:

- :func:`client_config` builds a client's librdkafka settings from the app's
  ``fusion_kafka_*`` settings, and :func:`redact` makes them safe to log;
- :func:`transient` tells an error that goes away by itself (a broker down or
  restarting) from one that does not;
- :func:`consume_ready` reads what a consumer has without waiting for a full batch;
- librdkafka's own log lines and error callbacks go to the loggers
  ``fusion_celery.rdkafka`` and ``fusion_celery.transport.errors``, throttled:
  while a broker is down every client reports every failed connection attempt,
  several times a second.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import Celery
from confluent_kafka import Consumer, KafkaError

from .config import settings

__all__ = ["client_config", "redact", "transient", "consume_ready", "log_error", "rdkafka_logger", "errors_logger"]

_SECRET_WORDS = ("password", "secret", "token", "key")


def redact(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a librdkafka config that is safe to log.

    Parameters:
        config: librdkafka settings.

    Returns:
        The same settings, with the value of every setting whose name speaks of a
        password, secret, token or key replaced by ``***`` (file locations kept).
    """
    return {k: ("***" if any(w in k.lower() for w in _SECRET_WORDS) and "location" not in k else v)
            for k, v in config.items()}


class _Throttle(logging.Filter):
    """Lets one line of a kind through per ``interval`` seconds, then says how many it held back.

    Lines are of a kind when they are equal once digits are ignored (broker ids,
    ports and counters vary).  Without it a worker writes thousands of identical
    lines a minute while a broker is down.
    """

    def __init__(self, interval: float = 10.0) -> None:
        super().__init__()
        self.interval = interval
        self._last: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        kind = "".join(c for c in record.getMessage() if not c.isdigit())[:300]
        now = time.monotonic()
        with self._lock:
            last, skipped = self._last.get(kind, (0.0, 0))
            if now - last < self.interval:
                self._last[kind] = (last, skipped + 1)
                return False
            if len(self._last) > 1000:
                self._last.clear()
            self._last[kind] = (now, 0)
        if skipped:
            record.msg = f"{record.msg} (and {skipped} similar in the last {self.interval:.0f}s)"
        return True


#: librdkafka's own log lines (every client's ``logger``), throttled.
rdkafka_logger = logging.getLogger("fusion_celery.rdkafka")
rdkafka_logger.addFilter(_Throttle())
#: Errors librdkafka reports through ``error_cb`` and retries of :class:`~fusion_celery.clients.Clients`, throttled.
errors_logger = logging.getLogger(f"{__name__}.errors")
errors_logger.addFilter(_Throttle())


def log_error(err: KafkaError) -> None:
    """librdkafka's ``error_cb``: log an error a client reports (mostly transient: a broker down, a retry)."""
    errors_logger.warning("kafka: %s", err)


def client_config(app: Celery, kind: str, defaults: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """librdkafka settings for a client of ``app``.

    Precedence, highest first: ``extra`` (what fusion-celery needs to work), the
    user's ``fusion_kafka_<kind>_config``, ``fusion_kafka_config``, ``defaults``.

    Parameters:
        app: the app whose ``fusion_kafka_*`` settings apply.
        kind: ``"producer"``, ``"consumer"`` or ``"admin"``.
        defaults: settings the user's may override.
        extra: settings that override the user's (dots in names need ``**{...}``).

    Returns:
        The settings, with ``bootstrap.servers`` and a ``logger`` (:data:`rdkafka_logger`
        unless given).
    """
    s = settings(app)
    config: dict[str, Any] = {"bootstrap.servers": s.kafka_bootstrap_servers}
    config.update(defaults or {})
    config.update(s.kafka_config or {})
    config.update(getattr(s, f"kafka_{kind}_config") or {})
    config.update(extra)
    config.setdefault("logger", rdkafka_logger)
    return config


#: librdkafka errors that say "not now" (broker down or restarting) rather than "never".
_TRANSIENT = {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT, KafkaError._MSG_TIMED_OUT,
              KafkaError._RESOLVE, KafkaError._WAIT_COORD, KafkaError.REQUEST_TIMED_OUT, KafkaError.NOT_CONTROLLER,
              KafkaError.BROKER_NOT_AVAILABLE, KafkaError.LEADER_NOT_AVAILABLE,
              KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.COORDINATOR_NOT_AVAILABLE,
              KafkaError.NETWORK_EXCEPTION}


def transient(err: KafkaError) -> bool:
    """Whether ``err`` may go away by itself: the broker is unreachable, restarting or electing a leader.

    Parameters:
        err: an error from a client, a delivery report or an admin request.

    Returns:
        True for connection and timeout errors, errors librdkafka marks retriable, and
        the refusal of a restarted KRaft broker to create topics until it is unfenced.
    """
    if err.code() in _TRANSIENT or err.retriable():
        return True
    return err.code() == KafkaError.INVALID_REPLICATION_FACTOR and "fenced" in err.str()


def consume_ready(consumer: Consumer, max_messages: int, timeout: float) -> list[Any]:
    """Wait at most ``timeout`` seconds for one record, then take what else is there already.

    ``Consumer.consume(n, timeout)`` returns only once it has ``n`` records or the
    timeout expired, so a lone record would wait out the whole timeout.

    Parameters:
        consumer: a subscribed or assigned consumer.
        max_messages: most records (and errors) returned.
        timeout: seconds to wait for the first record.

    Returns:
        Up to ``max_messages`` messages, errors included (check ``msg.error()``); empty
        when nothing came within ``timeout``.
    """
    first = consumer.poll(timeout)
    if first is None:
        return []
    return [first, *consumer.consume(max_messages - 1, timeout=0)] if max_messages > 1 else [first]
