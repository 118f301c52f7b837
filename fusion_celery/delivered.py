"""Whether a record that an earlier attempt may have sent is on its topic already.

A reply is guarded by a lease that is marked done once Kafka acknowledged the
reply (:func:`fusion_celery.answer.reply`).  A worker killed between the
acknowledgement and the mark leaves the lease to run out, and the next attempt
would send the reply a second time.  The attempt that finds an earlier one
unfinished therefore looks on the return topic first, from a little before the
time the earlier attempt started, for a record carrying the run's id
(:data:`~fusion_celery.protocol.RUN_HEADER`), and sends only when there is none.

This is the rare path: it runs only after a sender died, and reads only the
records written since that sender started.
"""

from __future__ import annotations

import time
import uuid

from celery import Celery
from confluent_kafka import TopicPartition

from .clients import clients

__all__ = ["on_topic"]

#: Milliseconds before the earlier attempt's start that the search begins: the record's timestamp is set by
#: the producing host, whose clock may be behind the one that noted the attempt.
CLOCK_SLACK_MS = 30_000


def on_topic(app: Celery, topic: str, since_ms: int, header: str, value: str,
             timeout: float = 30.0) -> dict[str, bytes] | None:
    """The headers of a record of ``topic`` with header ``header`` = ``value`` written at ``since_ms`` or later.

    Parameters:
        app: the fusion app (its Kafka clients).
        topic: the topic to look on, every partition of it.
        since_ms: epoch milliseconds from which on to look (less :data:`CLOCK_SLACK_MS`).
        header: the header's name.
        value: the value it must have.
        timeout: seconds to spend reading at most.

    Returns:
        The headers of the first such record found; None when none is on the topic up to its end
        as it was when the search began.

    Raises:
        KafkaException: Kafka did not answer the metadata or offset requests.
        TimeoutError: the topic could not be read to its end within ``timeout``.
    """
    wanted = value.encode()
    consumer = clients(app).consumer(**{"group.id": f"fusion-delivered-{uuid.uuid4().hex}",
                                        "enable.auto.commit": False, "enable.partition.eof": False})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            return None
        starts = consumer.offsets_for_times(
            [TopicPartition(topic, p, max(0, since_ms - CLOCK_SLACK_MS)) for p in sorted(meta.partitions)],
            timeout=10)
        ends: dict[int, int] = {}
        todo = []
        for tp in starts:
            if tp.offset < 0:  # no record at or after the time
                continue
            end = consumer.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=10)[1]
            if tp.offset < end:
                ends[tp.partition] = end
                todo.append(TopicPartition(topic, tp.partition, tp.offset))
        if not todo:
            return None
        consumer.assign(todo)
        deadline = time.monotonic() + timeout
        while ends:
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {topic} to its end within {timeout:.0f}s")
            for msg in consumer.consume(500, 0.5):
                if msg.error() is not None:
                    continue
                headers = dict(msg.headers() or ())
                if headers.get(header) == wanted:
                    return headers
                if msg.offset() + 1 >= ends.get(msg.partition(), 0):
                    ends.pop(msg.partition(), None)
        return None
    finally:
        consumer.close()
