"""confluent-kafka's ``AdminClient`` on an in-memory broker: topics, and ACLs kept but never enforced."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AclBinding, AclBindingFilter, ListOffsetsResultInfo, NewTopic

from .client import Client, Config

__all__ = ["AdminClient"]


def _future(error: KafkaError | None = None, result: Any = None) -> concurrent.futures.Future:
    f: concurrent.futures.Future = concurrent.futures.Future()
    f.set_running_or_notify_cancel()
    if error is None:
        f.set_result(result)
    else:
        f.set_exception(KafkaException(error))
    return f


def _outcome(fn: Callable[[], Any]) -> concurrent.futures.Future:
    try:
        return _future(result=fn())
    except KafkaException as exc:
        return _future(exc.args[0])


class AdminClient(Client):
    """confluent-kafka's ``AdminClient`` on an in-memory broker: topics and ACLs (kept, never enforced).

    Requests are answered at once: the futures returned are already done.  While the
    broker is down they fail with ``_TRANSPORT``.
    """

    _closed_text = "AdminClient closed"

    def __init__(self, conf: Config | None = None, **kwargs: Any) -> None:
        super().__init__(conf, kwargs)

    def create_topics(self, new_topics: list[NewTopic], operation_timeout: float = 0,
                      request_timeout: float | None = None,
                      validate_only: bool = False) -> dict[str, concurrent.futures.Future]:
        """Create topics.

        Parameters:
            new_topics: confluent-kafka ``NewTopic`` objects (``num_partitions`` -1: one partition;
                ``replication_factor`` -1 or 1, this broker being a cluster of one).
            operation_timeout: accepted for confluent-kafka's signature.
            request_timeout: accepted for confluent-kafka's signature.
            validate_only: check the request, create nothing.

        Returns:
            A done future per topic name: its result is None, or it raises ``KafkaException``
            (``TOPIC_ALREADY_EXISTS``, ``TOPIC_EXCEPTION``, ``INVALID_REPLICATION_FACTOR``, ``_TRANSPORT``).

        Raises:
            ValueError: a topic named twice.
        """
        self._check_open()
        names = [t.topic for t in new_topics]
        if len(set(names)) != len(names):
            raise ValueError("duplicate topics in the request")
        return {t.topic: _outcome(lambda t=t: self.broker.create_topic(
            t.topic, t.num_partitions, t.config, t.replication_factor, validate_only)) for t in new_topics}

    def delete_topics(self, topics: list[str], operation_timeout: float = 0,
                      request_timeout: float | None = None) -> dict[str, concurrent.futures.Future]:
        """Delete topics and their records.

        Parameters:
            topics: the names.
            operation_timeout: accepted for confluent-kafka's signature.
            request_timeout: accepted for confluent-kafka's signature.

        Returns:
            A done future per name: its result is None, or it raises ``KafkaException``
            (``UNKNOWN_TOPIC_OR_PART``, ``_TRANSPORT``).

        Raises:
            ValueError: a topic named twice.
        """
        self._check_open()
        if len(set(topics)) != len(topics):
            raise ValueError("duplicate topics in the request")
        return {name: _outcome(lambda name=name: self.broker.delete_topic(name)) for name in topics}

    def create_acls(self, acls: list[AclBinding],
                    request_timeout: float | None = None) -> dict[AclBinding, concurrent.futures.Future]:
        """Store ACL bindings (the in-memory broker lists them but enforces none).

        Parameters:
            acls: the bindings.
            request_timeout: accepted for confluent-kafka's signature.

        Returns:
            A done future per binding (result None).

        Raises:
            TypeError: an item is not an ``AclBinding``.
        """
        self._check_open()
        if not all(isinstance(b, AclBinding) for b in acls):
            raise TypeError("Expected list of AclBinding")
        return {b: _outcome(lambda b=b: self.broker.add_acl(b)) for b in acls}

    def describe_acls(self, acl_binding_filter: AclBindingFilter,
                      request_timeout: float | None = None) -> concurrent.futures.Future:
        """The stored ACL bindings a filter selects, with Kafka's rules (``ANY``, ``MATCH``).

        Parameters:
            acl_binding_filter: the filter.
            request_timeout: accepted for confluent-kafka's signature.

        Returns:
            A done future whose result is the list of bindings.
        """
        self._check_open()
        return _outcome(lambda: self.broker.find_acls(acl_binding_filter))

    def delete_acls(self, acl_binding_filters: list[AclBindingFilter],
                    request_timeout: float | None = None) -> dict[AclBindingFilter, concurrent.futures.Future]:
        """Delete the stored ACL bindings each filter selects.

        Parameters:
            acl_binding_filters: the filters.
            request_timeout: accepted for confluent-kafka's signature.

        Returns:
            A done future per filter whose result lists the bindings it deleted.
        """
        self._check_open()
        return {f: _outcome(lambda f=f: self.broker.remove_acls(f)) for f in acl_binding_filters}

    def list_offsets(self, topic_partition_offsets: dict[TopicPartition, Any], isolation_level: Any = None,
                     request_timeout: float | None = None) -> dict[TopicPartition, concurrent.futures.Future]:
        """The latest (high watermark) or earliest (0) offset of each partition.

        Parameters:
            topic_partition_offsets: partition -> ``OffsetSpec.latest()`` or ``OffsetSpec.earliest()``
                (a spec by time is not supported).

        Returns:
            A done future per partition: its result has ``.offset``, or it raises ``KafkaException``
            (``UNKNOWN_TOPIC_OR_PART``, ``_TRANSPORT``).
        """
        self._check_open()
        out = {}
        for tp, spec in topic_partition_offsets.items():
            earliest = type(spec).__name__ == "EarliestSpec"

            def answer(tp: TopicPartition = tp, earliest: bool = earliest) -> Any:
                low, high = self.broker.watermarks(tp.topic, tp.partition)
                return ListOffsetsResultInfo(low if earliest else high, -1, -1)
            out[tp] = _outcome(answer)
        return out

    def poll(self, timeout: float | None = None) -> int:
        """Serve ``error_cb`` (admin results need no polling here).

        Parameters:
            timeout: accepted for confluent-kafka's signature (never waits).

        Returns:
            The number of errors served.
        """
        return self._serve_errors()

    def close(self) -> None:
        """Close the client; later calls raise ``RuntimeError``."""
        self._closed = True
        self.broker.detach(self)
