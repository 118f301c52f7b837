"""What the in-memory Kafka clients share: the broker they name, ``error_cb``, ``list_topics``, closing,
and how they read librdkafka settings and record fields."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import OFFSET_INVALID, KafkaError, Message
from confluent_kafka.admin import ClusterMetadata

from .broker import SCHEME, Broker, Headers, kafka_error

__all__ = ["Client", "Config", "as_bool", "as_bytes", "as_headers", "deadline_after", "error_message",
           "record_size", "seconds_of", "sooner", "time_left"]

Config = Mapping[str, Any]
#: The framing librdkafka adds to a record when it checks it against ``message.max.bytes`` (at its largest).
RECORD_OVERHEAD = 36
HEADER_OVERHEAD = 10


def as_bool(value: Any) -> bool:
    """A librdkafka boolean setting (``True``, ``"true"``, ``"1"``...) as a bool."""
    return value.strip().lower() in ("true", "1", "yes", "on") if isinstance(value, str) else bool(value)


def seconds_of(config: Config, default: int, *names: str) -> float:
    """Seconds from the first of ``names`` (librdkafka milliseconds) set in ``config``."""
    for name in names:
        if config.get(name) is not None:
            return float(config[name]) / 1000
    return default / 1000


def deadline_after(timeout: float | None) -> float | None:
    """The monotonic time ``timeout`` seconds from now (None for None or a negative timeout: never)."""
    return None if timeout is None or timeout < 0 else time.monotonic() + timeout


def time_left(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` (0 once passed; None: for ever)."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def sooner(*waits: float | None) -> float | None:
    """The shortest of some waits in seconds (None: for ever)."""
    known = [max(0.0, w) for w in waits if w is not None]
    return min(known) if known else None


def as_bytes(value: Any, what: str) -> bytes | None:
    """A key, value or header value as confluent-kafka takes it (str is UTF-8 encoded).

    Raises:
        TypeError: any other type, with confluent-kafka's message naming ``what``.
    """
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"expected {what} to be None, binary, or unicode string, not {type(value).__name__}")


def as_headers(headers: Any) -> Headers | None:
    """Headers given as a list of pairs or a dict, as ``(name, bytes or None)`` pairs in order (None: none)."""
    if not headers:
        return None
    items = headers.items() if isinstance(headers, Mapping) else headers
    return tuple((str(name), as_bytes(value, "header value")) for name, value in items)


def record_size(key: bytes | None, value: bytes | None, headers: Headers | None) -> int:
    """The size librdkafka checks against ``message.max.bytes`` (an upper bound of the encoded record)."""
    return RECORD_OVERHEAD + len(key or b"") + len(value or b"") + sum(
        len(name.encode()) + len(v or b"") + HEADER_OVERHEAD for name, v in headers or ())


def error_message(err: KafkaError, topic: str, partition: int, offset: int = OFFSET_INVALID) -> Message:
    """A consumer event carrying ``err`` (its value is the error's text, as librdkafka's are)."""
    return Message(topic=topic, partition=partition, offset=offset, value=err.str().encode(), error=err)


class Client:
    """What every in-memory client shares: its broker, ``error_cb``, ``list_topics`` and closing.

    Parameters:
        config: librdkafka settings; ``bootstrap.servers`` (``memory://<name>``) picks the broker,
            ``error_cb`` is called from the client's poll when the broker goes down; settings the
            stub does not model are ignored.
        kwargs: more settings, as confluent-kafka accepts them.

    Raises:
        KafkaException: ``_INVALID_ARG`` when ``bootstrap.servers`` names no in-memory broker.
    """

    _closed_text = "client closed"

    def __init__(self, config: Config | None, kwargs: dict[str, Any]) -> None:
        self.config: dict[str, Any] = {**(config or {}), **kwargs}
        self.broker = Broker.for_servers(self.config.get("bootstrap.servers"))
        self._cond = self.broker.cond
        self._error_cb: Callable[[KafkaError], Any] | None = self.config.get("error_cb")
        self._errors: deque[KafkaError] = deque()
        self._closed = False
        self.broker.attach(self)

    def _broker_changed(self, went_down: bool) -> None:
        if went_down and self._error_cb is not None:
            self._errors.append(kafka_error(KafkaError._ALL_BROKERS_DOWN,
                                            f"1/1 brokers are down ({SCHEME}{self.broker.name})"))

    def _serve_errors(self) -> int:
        """Call ``error_cb`` for the errors queued so far (outside the broker's lock)."""
        with self._cond:
            errors, self._errors = list(self._errors), deque()
        for err in errors:
            self._error_cb(err)  # type: ignore[misc]
        return len(errors)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(self._closed_text)

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> ClusterMetadata:
        """The cluster's metadata: every topic, or only ``topic`` (listed with an error if it does not exist).

        Parameters:
            topic: the one topic to list (None: all).
            timeout: seconds to wait for an unreachable broker (negative: for ever).

        Returns:
            confluent-kafka's ``ClusterMetadata``: one broker (id 0, leader of every partition).

        Raises:
            KafkaException: ``_TRANSPORT`` when the broker stayed unreachable.
        """
        self._check_open()
        self.broker.wait_until_up(timeout)
        return self.broker.metadata(topic)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> Any:  # pragma: no cover - every client overrides it
        raise NotImplementedError
