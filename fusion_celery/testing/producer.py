"""confluent-kafka's ``Producer`` on an in-memory broker."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_INVALID, TIMESTAMP_NOT_AVAILABLE, KafkaError, KafkaException, Message
from confluent_kafka.admin import ClusterMetadata

from .broker import Headers, kafka_error, partition_for
from .client import Client, Config, as_bytes, as_headers, deadline_after, record_size, seconds_of, sooner, time_left

__all__ = ["Producer"]


@dataclass
class _Pending:
    """A record produced and not yet written (the broker is down, or its topic does not exist yet)."""

    topic: str
    partition: int
    key: bytes | None
    value: bytes | None
    headers: Headers | None
    timestamp: int
    callback: Callable[[KafkaError | None, Message], Any] | None
    expires: float  # message.timeout.ms
    unknown_until: float  # topic.metadata.propagation.max.ms


class Producer(Client):
    """confluent-kafka's ``Producer`` on an in-memory broker.

    A record is written when it is produced if the broker is up and its topic
    exists; otherwise it waits, and is written as soon as the broker comes back or
    the topic is created, or fails once ``message.timeout.ms`` passed (``_MSG_TIMED_OUT``)
    or, for a topic that still does not exist, ``topic.metadata.propagation.max.ms``
    (``_UNKNOWN_TOPIC``).  Delivery reports are served by :meth:`poll` and
    :meth:`flush`, in order; like librdkafka's they carry no headers.

    Like librdkafka, the producer remembers the topics it has seen exist (a
    :meth:`list_topics` answer listed them, or it wrote to them).  The propagation
    allowance is for topics it never saw: a record for a known topic that has been
    deleted fails at once with ``UNKNOWN_TOPIC_OR_PART`` (librdkafka: the broker refuses
    it, and the metadata refresh that follows says the topic is gone).  A known topic
    found gone, by that or by a metadata answer that lists it as missing, is refused by
    ``produce`` with ``_UNKNOWN_TOPIC`` until it exists again.
    """

    _closed_text = "Producer has been closed"

    def __init__(self, config: Config | None = None, **kwargs: Any) -> None:
        super().__init__(config, kwargs)
        c = self.config
        self.message_timeout = seconds_of(c, 300_000, "message.timeout.ms", "delivery.timeout.ms")
        self.propagation = seconds_of(c, 30_000, "topic.metadata.propagation.max.ms")
        self.max_messages = int(c.get("queue.buffering.max.messages", 100_000))
        self.max_bytes = int(c.get("message.max.bytes", 1_000_000))
        self.partitioner = str(c.get("partitioner", "consistent_random"))
        partition_for(None, 1, self.partitioner)  # an unknown partitioner fails here, as librdkafka's config does
        self._default_callback = c.get("on_delivery")
        self._queue: list[_Pending] = []
        self._reports: deque[tuple[Callable[..., Any] | None, KafkaError | None, Message]] = deque()
        self._sending = False
        self._known: set[str] = set()  # topics this producer has seen exist
        self._gone: set[str] = set()  # topics it knew, then learned were deleted

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue) + len(self._reports)

    def produce(self, topic: str, value: Any = None, key: Any = None, partition: int = -1,
                on_delivery: Callable[[KafkaError | None, Message], Any] | None = None,
                callback: Callable[[KafkaError | None, Message], Any] | None = None, timestamp: int = 0,
                headers: Any = None) -> None:
        """Produce one record; its delivery report comes from :meth:`poll` or :meth:`flush`.

        Parameters:
            topic: the topic.
            value: the value (bytes, str or None).
            key: the key (bytes, str or None); without ``partition`` it picks the partition.
            partition: the partition (-1: the ``partitioner``'s choice).
            on_delivery: called as ``on_delivery(err, msg)`` with the outcome (``callback`` is an alias).
            callback: see ``on_delivery``.
            timestamp: ``CreateTime`` in epoch ms (0: now).
            headers: a list of ``(name, value)`` or a dict; values bytes, str or None.

        Raises:
            KafkaException: ``MSG_SIZE_TOO_LARGE`` (larger than ``message.max.bytes``), ``_UNKNOWN_PARTITION``.
            BufferError: ``queue.buffering.max.messages`` records and reports are outstanding.
            RuntimeError: the producer was closed.
            KafkaException: ``_UNKNOWN_TOPIC`` for a topic this producer learned was deleted.
        """
        self._check_open()
        value_b, key_b, hdrs = as_bytes(value, "value"), as_bytes(key, "key"), as_headers(headers)
        if record_size(key_b, value_b, hdrs) > self.max_bytes:
            raise KafkaException(kafka_error(KafkaError.MSG_SIZE_TOO_LARGE,
                                             "Unable to produce message: Broker: Message size too large"))
        now = time.monotonic()
        with self._cond:
            if len(self._queue) + len(self._reports) >= self.max_messages:
                raise BufferError("Local: Queue full")
            known = self.broker.topics.get(topic)
            if topic in self._gone:
                if known is None:
                    raise KafkaException(kafka_error(KafkaError._UNKNOWN_TOPIC,
                                                     "Unable to produce message: Local: Unknown topic"))
                self._gone.discard(topic)  # made again (the stub's metadata is never stale)
            if known is not None and partition >= len(known.partitions):
                raise KafkaException(kafka_error(KafkaError._UNKNOWN_PARTITION,
                                                 "Unable to produce message: Local: Unknown partition"))
            self._queue.append(_Pending(topic, partition, key_b, value_b, hdrs,
                                        int(timestamp) or int(time.time() * 1000),
                                        on_delivery or callback or self._default_callback,
                                        now + self.message_timeout, now + self.propagation))
            self._send()

    def _broker_changed(self, went_down: bool) -> None:
        super()._broker_changed(went_down)
        self._send()

    def _send(self) -> None:
        """Write what can be written now and report what failed (with the broker's lock held)."""
        if self._sending:  # a topic this very call auto-created tells every client, this one too
            return
        self._sending = True
        try:
            self._send_queued()
        finally:
            self._sending = False

    def _send_queued(self) -> None:
        now = time.monotonic()
        broker, kept = self.broker, []
        for p in self._queue:
            t = broker.topics.get(p.topic) if broker.available else None
            if t is None and broker.available and broker.auto_create_topics and p.expires > now:
                try:
                    broker.create_topic(p.topic)
                except KafkaException as exc:  # an illegal name
                    self._report(p, exc.args[0])
                    continue
                t = broker.topics[p.topic]
            if t is None:
                if broker.available and (p.topic in self._known or p.topic in self._gone):
                    self._known.discard(p.topic)
                    self._gone.add(p.topic)
                    self._report(p, kafka_error(KafkaError.UNKNOWN_TOPIC_OR_PART,
                                                "Broker: Unknown topic or partition"))
                elif p.expires <= now:
                    self._report(p, kafka_error(KafkaError._MSG_TIMED_OUT, "Local: Message timed out"))
                elif broker.available and p.unknown_until <= now:
                    self._report(p, kafka_error(KafkaError._UNKNOWN_TOPIC, "Local: Unknown topic"))
                else:
                    kept.append(p)
                continue
            partition = p.partition if p.partition >= 0 else partition_for(p.key, len(t.partitions),
                                                                           self.partitioner)
            if partition >= len(t.partitions):
                self._report(p, kafka_error(KafkaError._UNKNOWN_PARTITION, "Local: Unknown partition"), partition)
            elif record_size(p.key, p.value, p.headers) > t.max_message_bytes():
                self._report(p, kafka_error(KafkaError.MSG_SIZE_TOO_LARGE, "Broker: Message size too large"),
                             partition)
            else:
                self._known.add(p.topic)
                r = broker.append(p.topic, partition, p.key, p.value, p.headers, p.timestamp)
                self._reports.append((p.callback, None, Message(
                    topic=p.topic, partition=partition, offset=r.offset, key=p.key, value=p.value,
                    timestamp=r.timestamp)))
        self._queue = kept
        if self._reports:
            self._cond.notify_all()

    def _report(self, p: _Pending, err: KafkaError, partition: int | None = None) -> None:
        # -1 and OFFSET_INVALID read back as None, as a failed record's partition and offset do.
        self._reports.append((p.callback, err, Message(
            topic=p.topic, partition=-1 if partition is None else partition, offset=OFFSET_INVALID, key=p.key,
            value=p.value, error=err, timestamp=(TIMESTAMP_NOT_AVAILABLE, -1))))

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> ClusterMetadata:
        """The cluster's metadata (see :meth:`Client.list_topics`), which this producer also learns from.

        A topic listed with partitions is known from now on; a known topic listed as missing
        is gone (see the class's docstring).
        """
        md = super().list_topics(topic, timeout)
        with self._cond:
            for name, tmd in md.topics.items():
                if tmd.error is None:
                    self._known.add(name)
                    self._gone.discard(name)
                elif name in self._known:
                    self._known.discard(name)
                    self._gone.add(name)
        return md

    def poll(self, timeout: float | None = None) -> int:
        """Serve delivery reports and errors.

        Parameters:
            timeout: seconds to wait for the first one (None or negative: for ever).

        Returns:
            The number of reports and errors served.
        """
        deadline = deadline_after(timeout)
        with self._cond:
            while True:
                self._send()
                if self._reports or self._errors:
                    break
                remaining = time_left(deadline)
                if remaining == 0:
                    break
                due = min((min(p.expires, p.unknown_until) for p in self._queue), default=None)
                self._cond.wait(sooner(remaining, None if due is None else due - time.monotonic()))
            reports, self._reports = list(self._reports), deque()
        for callback, err, msg in reports:
            if callback is not None:
                callback(err, msg)
        return len(reports) + self._serve_errors()

    def flush(self, timeout: float | None = None) -> int:
        """Wait until every record was written or failed and its report served.

        Parameters:
            timeout: seconds to wait at most (None: for ever).

        Returns:
            The number of records and reports still outstanding (0: all done).
        """
        deadline = deadline_after(timeout)
        self.poll(0)
        while len(self):
            remaining = time_left(deadline)
            if remaining == 0:
                break
            self.poll(remaining if remaining is not None else 1.0)
        return len(self)

    def purge(self, in_queue: bool = True, in_flight: bool = True, blocking: bool = True) -> None:
        """Fail the records not yet written with ``_PURGE_QUEUE`` (reported by the next poll).

        Parameters:
            in_queue: purge the records not yet written.
            in_flight: accepted for confluent-kafka's signature (nothing is ever in flight here).
            blocking: accepted for confluent-kafka's signature.
        """
        self._check_open()
        with self._cond:
            if in_queue:
                for p in self._queue:
                    self._report(p, kafka_error(KafkaError._PURGE_QUEUE, "Local: Purged in queue"))
                self._queue = []

    def close(self) -> bool:
        """Flush, then close; later calls raise ``RuntimeError``."""
        if not self._closed:
            self.flush()
            self._closed = True
            self.broker.detach(self)
        return True
