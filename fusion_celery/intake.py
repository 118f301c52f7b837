"""Intake: consume each reactor's topic and turn every request into a run of its Celery task.

One consumer (and one thread) per reactor, in the worker's main process, in the
reactor's consumer group.  Delivery is at-least-once: a record's offset is
stored for commit only after its task was handed to the Celery broker (or the
record was dead-lettered); a record whose hand-over fails (the broker is away)
is kept, in order, and handed over again, its partitions paused meanwhile.
Backpressure: at most ``fusion_max_in_flight`` runs per reactor are unfinished
at a time; past that the consumer pauses its partitions and resumes when runs
finish, so a backlog stays in Kafka instead of flooding the Celery broker.  Bad
input goes to the dead-letter topic with its reason in the headers, and
consumption goes on.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from typing import Any

from celery import Celery
from celery import states as celery_states
from confluent_kafka import Consumer, KafkaError, TopicPartition
from confluent_kafka import Message as KafkaMessage

from .config import setting
from .errors import ProtocolError
from .kafka import clients, consume_ready
from .protocol import PARENT_HEADER, ROOT_HEADER, decode_request

__all__ = ["Intake", "dlq_topic", "consumer_group", "run_id"]

logger = logging.getLogger(__name__)


_RUN_NS = uuid.UUID("5f0c3a52-8d0e-4a8c-9a4e-6f7573696f6e")


def run_id(topic: str, partition: int, offset: int, timestamp: int) -> str:
    """The Celery task id of the run for one Kafka record.

    Derived from the record's coordinates, so a record delivered twice (at-least-once)
    maps to the same run, which then replies once; and so a caller without a return
    topic can find its result: ``AsyncResult(run_id(topic, partition, offset, ts))``.
    """
    return str(uuid.uuid5(_RUN_NS, f"{topic}/{partition}/{offset}/{timestamp}"))


def dlq_topic(app: Celery, topic: str) -> str:
    return f"{topic}{setting(app, 'fusion_dlq_suffix')}"


def consumer_group(app: Celery, task: Any) -> str:
    return getattr(task, "group_id", None) or f"{setting(app, 'fusion_consumer_group_prefix')}{task.topic}"


def _unfinished(app: Celery, ids: list[str]) -> set[str]:
    """Which of ``ids`` have no final state in the result backend yet (one MGET on Redis)."""
    backend = app.backend
    if not ids:
        return set()
    client = getattr(backend, "client", None)
    if client is not None and hasattr(backend, "get_key_for_task"):
        raw = client.mget([backend.get_key_for_task(i) for i in ids])
        out = set()
        for task_id, value in zip(ids, raw, strict=True):
            if value is None or backend.decode_result(value)["status"] not in celery_states.READY_STATES:
                out.add(task_id)
        return out
    return {i for i in ids if backend.get_state(i) not in celery_states.READY_STATES}


class ReactorIntake(threading.Thread):
    """Feeds one reactor's Celery task from its Kafka topic."""

    def __init__(self, app: Celery, task: Any, stop: threading.Event) -> None:
        super().__init__(name=f"fusion-intake-{task.topic}", daemon=True)
        self.app, self.task, self.stop_event = app, task, stop
        self.topic = task.topic
        self.max_in_flight = int(setting(app, "fusion_max_in_flight"))
        self.in_flight: set[str] = set()
        self.paused = False
        self.full = False  # at fusion_max_in_flight; until half of it is left
        self.pending: deque[KafkaMessage] = deque()  # read, not yet handed to Celery, in order
        self.consumer: Consumer | None = None
        self.counts = {"received": 0, "dead_lettered": 0, "started": 0}

    def _decode(self, msg: KafkaMessage):
        return decode_request(
            msg.value(), topic=msg.topic(), headers=msg.headers(), key=msg.key(), partition=msg.partition(),
            offset=msg.offset(), timestamp=msg.timestamp()[1],
            max_bytes=int(setting(self.app, "fusion_max_message_bytes")),
            prefix=setting(self.app, "fusion_return_topic_prefix"),
            allowlist=setting(self.app, "fusion_reply_allowlist"))

    def _dead_letter(self, msg: KafkaMessage, err: ProtocolError) -> None:
        headers = list(msg.headers() or []) + [
            ("fusion-dlq-reason", err.reason.encode()),
            ("fusion-dlq-error", str(err)[:1000].encode()),
            ("fusion-dlq-source", f"{msg.topic()}[{msg.partition()}]@{msg.offset()}".encode()),
        ]
        value = msg.value()
        limit = int(setting(self.app, "fusion_max_message_bytes"))
        if value is not None and limit and len(value) > limit:
            value = value[:limit]  # keep what fits; the headers say it was cut
            headers.append(("fusion-dlq-truncated", str(len(msg.value())).encode()))
        clients(self.app).produce(dlq_topic(self.app, self.topic), value, key=msg.key(), headers=headers)
        self.counts["dead_lettered"] += 1
        logger.warning("reactor %s: dead-lettered %s[%d]@%d: %s", self.topic, msg.topic(), msg.partition(),
                       msg.offset(), err)

    def _start(self, msg: KafkaMessage) -> None:
        try:
            message = self._decode(msg)
        except ProtocolError as err:
            self._dead_letter(msg, err)
            return
        task_id = run_id(msg.topic(), msg.partition(), msg.offset(), msg.timestamp()[1])
        self.task.apply_async(kwargs={"message": message.to_dict()}, task_id=task_id,
                              shadow=f"{self.task.name}[{self.topic}]",
                              root_id=message.headers.get(ROOT_HEADER) or None,
                              parent_id=message.headers.get(PARENT_HEADER) or None)
        self.in_flight.add(task_id)
        self.counts["started"] += 1

    def _refresh_in_flight(self) -> None:
        if self.in_flight:
            self.in_flight &= _unfinished(self.app, list(self.in_flight))

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Take the partitions and give each the pause state in force now, both ways: librdkafka keeps
        a partition's pause across a revoke and a later re-assignment, so a partition paused while
        assigned here and resumed while another member held it would come back paused for good."""
        consumer.assign(partitions)
        if self.paused:
            consumer.pause(partitions)
        else:
            consumer.resume(partitions)

    def _set_paused(self, paused: bool) -> None:
        if paused == self.paused:
            return
        assignment = self.consumer.assignment()
        if paused:
            self.consumer.pause(assignment)
            logger.info("reactor %s: %d runs in flight, pausing (%d records not yet handed over)",
                        self.topic, len(self.in_flight), len(self.pending))
        else:
            self.consumer.resume(assignment)
            logger.info("reactor %s: %d runs in flight, resuming", self.topic, len(self.in_flight))
        self.paused = paused

    def run(self) -> None:
        self.consumer = clients(self.app).consumer(
            defaults={"auto.offset.reset": "earliest", "auto.commit.interval.ms": 1000,
                      "topic.metadata.refresh.interval.ms": 10000, "client.id": f"fusion-intake-{self.topic}"},
            **{"group.id": consumer_group(self.app, self.task),
               "enable.auto.commit": True,
               "enable.auto.offset.store": False})
        self.consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        last_check = 0.0
        try:
            while not self.stop_event.is_set():
                try:
                    self._step()
                except Exception:
                    # Not a failed hand-over (that is handled in _step) but, e.g., Kafka refusing a pause:
                    # the records not handed over stay in ``pending`` and are handed over next time.
                    logger.exception("reactor %s: intake step failed (%d records not yet handed over); retrying",
                                     self.topic, len(self.pending))
                    self.stop_event.wait(1.0)
                now = time.monotonic()
                if now - last_check > 0.25 or len(self.in_flight) >= self.max_in_flight:
                    last_check = now
                    try:
                        self._refresh_in_flight()
                    except Exception:
                        logger.exception("reactor %s: cannot read run states", self.topic)
                        self.stop_event.wait(1.0)
        finally:
            self._commit()
            self.consumer.close()
            logger.info("reactor %s: intake stopped (%s)", self.topic, self.counts)

    def _step(self) -> None:
        """Read what may be read, then hand records to Celery in order while capacity allows.

        Records read but not handed over (the broker failed, or the pause came after
        the fetch) wait in ``pending``; while any wait, the partitions are paused
        so Kafka keeps the backlog.  No seek: librdkafka resumes a paused partition
        after the last record it returned, and ``pending`` holds the rest.
        """
        if len(self.in_flight) >= self.max_in_flight:
            self.full = True
        elif self.full and len(self.in_flight) <= self.max_in_flight // 2:
            self.full = False
        self._set_paused(self.full or bool(self.pending))
        # Never take more records than may be in flight: the bound holds within a batch too.
        capacity = self.max_in_flight - len(self.in_flight) - len(self.pending)
        for msg in consume_ready(self.consumer, min(100, max(1, capacity)), 0.2):
            err = msg.error()
            if err is None:
                self.counts["received"] += 1
                self.pending.append(msg)
            elif err.code() != KafkaError._PARTITION_EOF:
                logger.warning("reactor %s: consume error: %s", self.topic, err.str())
        while self.pending and len(self.in_flight) < self.max_in_flight:
            msg = self.pending[0]
            try:
                self._start(msg)
            except Exception:
                logger.exception("reactor %s: cannot hand %s[%d]@%d to Celery; retrying", self.topic,
                                 msg.topic(), msg.partition(), msg.offset())
                self._set_paused(True)
                self.stop_event.wait(1.0)
                return
            self.pending.popleft()
            self.consumer.store_offsets(message=msg)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Commit what was handed over; forget what was not (the partitions' next owner reads it)."""
        gone = {(p.topic, p.partition) for p in partitions}
        kept = deque(m for m in self.pending if (m.topic(), m.partition()) not in gone)
        self.counts["received"] -= len(self.pending) - len(kept)  # received = started + dead-lettered + pending
        self.pending = kept
        self._commit()

    def _commit(self) -> None:
        try:
            self.consumer.commit(asynchronous=False)
        except Exception as exc:  # nothing stored yet, or the group is rebalancing
            if not (hasattr(exc, "args") and exc.args and getattr(exc.args[0], "code", lambda: None)()
                    == KafkaError._NO_OFFSET):
                logger.debug("reactor %s: commit: %s", self.topic, exc)


class Intake:
    """All reactor intakes of a worker."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.stop_event = threading.Event()
        self.threads: list[ReactorIntake] = []

    def ensure_topics(self, tasks: list[Any]) -> None:
        c = clients(self.app)
        default = int(setting(self.app, "fusion_reactor_partitions"))
        for task in tasks:
            c.create_topics([task.topic], partitions=task.partitions or default, visible=True)
            c.create_topics([dlq_topic(self.app, task.topic)], partitions=1)

    def start(self, tasks: list[Any]) -> None:
        if setting(self.app, "fusion_create_topics"):
            self.ensure_topics(tasks)
        for task in tasks:
            t = ReactorIntake(self.app, task, self.stop_event)
            t.start()
            self.threads.append(t)

    def stop(self, timeout: float = 30.0) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout)
