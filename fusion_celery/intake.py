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

A run handed over is watched until it finishes, by whichever intake owns its
record's partition (:mod:`fusion_celery.runbook`): one whose Celery message was
lost is sent again, one whose canvas lost a step compiles its deps again.  A run
starts once however often it is sent (:func:`fusion_celery.claims.once`).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

from celery import Celery
from celery import states as celery_states
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka import Message as KafkaMessage

from . import claims, faults, progress, tracing
from .clients import clients
from .config import settings
from .dialects import dialect_of_request
from .errors import FusionError, ProtocolError
from .message import Message
from .protocol import PARENT_HEADER, ROOT_HEADER
from .runbook import RunBook
from .signals import dead_lettered
from .transport import client_config, consume_ready, transient

__all__ = ["Intake", "dlq_topic", "dead_letter_copy", "record_size", "consumer_group", "group_defaults", "run_id"]

logger = logging.getLogger(__name__)


_RUN_NS = uuid.UUID("5f0c3a52-8d0e-4a8c-9a4e-6f7573696f6e")


def run_id(topic: str, partition: int, offset: int, timestamp: int) -> str:
    """The Celery task id of the run for one Kafka record.

    Derived from the record's coordinates, so a record delivered twice (at-least-once)
    maps to the same run, which then replies once; and so a caller without a return
    topic can find its result: ``AsyncResult(run_id(topic, partition, offset, ts))``.

    Parameters:
        topic: the record's topic (the reactor's).
        partition: its partition.
        offset: its offset.
        timestamp: its timestamp (epoch ms), as in its delivery report.

    Returns:
        A UUID (version 5) as a string.
    """
    return str(uuid.uuid5(_RUN_NS, f"{topic}/{partition}/{offset}/{timestamp}"))


def dlq_topic(app: Celery, topic: str) -> str:
    """The dead-letter topic of the reactor topic ``topic``: ``topic`` plus ``fusion_dlq_suffix``."""
    return f"{topic}{settings(app).dlq_suffix}"


#: The framing librdkafka's producer adds to a record's key, value and headers when it checks the record against
#: its ``message.max.bytes`` (MessageV2 at its largest); each header adds two varints of at most 5 bytes.
_RECORD_OVERHEAD = 36
_HEADER_OVERHEAD = 10
#: How Kafka refuses a record too large for the producer, the topic or its segments.
_TOO_LARGE = (KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE)

_Headers = list[tuple[str, bytes | None]]


def record_size(value: bytes | None, key: bytes | str | None, headers: _Headers) -> int:
    """The size librdkafka's producer checks against its ``message.max.bytes`` for a record, at most.

    Exact but for the headers' length varints, counted at their largest.

    Parameters:
        value: the record's value.
        key: its key.
        headers: its headers.

    Returns:
        The size in bytes.
    """
    def size(b: bytes | str | None) -> int:
        return len(b.encode() if isinstance(b, str) else b or b"")

    return _RECORD_OVERHEAD + size(key) + size(value) + sum(
        size(name) + size(v) + _HEADER_OVERHEAD for name, v in headers)


def dead_letter_copy(value: bytes | None, key: bytes | str | None, headers: _Headers, *, max_value: int,
                     max_record: int) -> tuple[bytes | None, _Headers]:
    """The value and headers of a record's dead-letter copy: ``headers`` as given, and ``value`` cut if needed.

    The copy must pass librdkafka's producer, which refuses a record larger than its ``message.max.bytes``
    (``max_record``), headers included; and its value is kept to ``max_value`` bytes (``fusion_max_message_bytes``;
    0: no limit).  A cut value is the start of the original, and the header ``fusion-dlq-truncated`` gives the
    original length.  If the headers alone leave no room, the value is empty (and the producer refuses the copy).

    Parameters:
        value: the refused record's value.
        key: its key.
        headers: its headers plus the dead-letter ones.
        max_value: the most bytes of value kept (0: no limit).
        max_record: the producer's ``message.max.bytes``.

    Returns:
        The copy's value and headers.
    """
    if value is None or (record_size(value, key, headers) <= max_record and not 0 < max_value < len(value)):
        return value, headers
    headers = [*headers, ("fusion-dlq-truncated", str(len(value)).encode())]
    room = max_record - record_size(None, key, headers)
    keep = min(room, max_value) if max_value > 0 else room
    return value[:max(0, keep)], headers


def _deliver(app: Celery, topic: str, value: bytes | None, key: bytes | str | None,
             headers: _Headers) -> KafkaError | None:
    """Produce one record with this process's producer and wait for its delivery report: None once Kafka has it.

    Otherwise the :class:`KafkaError` itself (:meth:`Clients.produce` raises a message instead), so that the
    caller can tell Kafka being away (:func:`transient`) from a refusal for good (``MSG_SIZE_TOO_LARGE``,
    ``TOPIC_AUTHORIZATION_FAILED``).  No report within as long as :meth:`Clients.produce` waits is
    ``_MSG_TIMED_OUT``.
    """
    c = clients(app)
    producer = c.producer
    reports: list[KafkaError | None] = []
    try:
        producer.produce(topic, value, key=key, headers=headers, on_delivery=lambda err, _msg: reports.append(err))
    except KafkaException as exc:  # refused before it was sent, e.g. larger than message.max.bytes
        return exc.args[0]
    deadline = time.monotonic() + c.retry_timeout + 10
    while not reports and time.monotonic() < deadline:
        producer.poll(0.5)
    return reports[0] if reports else KafkaError(KafkaError._MSG_TIMED_OUT)


def consumer_group(app: Celery, task: Any) -> str:
    """The consumer group of a reactor's task: its ``group_id``, or ``fusion_consumer_group_prefix`` plus its topic."""
    return getattr(task, "group_id", None) or f"{settings(app).consumer_group_prefix}{task.topic}"


#: Group membership of the intakes' and the registry's consumers under the classic protocol.  The
#: coordinator gives a dead member's partitions away once its session expires, and the survivors hear
#: of it at their next heartbeat: a worker killed with ``kill -9`` is replaced within about 7 s instead
#: of librdkafka's 45-s default session.  6 s is the broker's default ``group.min.session.timeout.ms``.
CLASSIC_GROUP_DEFAULTS: dict[str, Any] = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}


def group_defaults(app: Celery, assignor: str | None = None) -> tuple[dict[str, Any], bool]:
    """Defaults for a subscribing consumer's group membership, and whether its assignment is incremental.

    The user's consumer settings decide the protocol.  Under the classic one (the default) the defaults
    are :data:`CLASSIC_GROUP_DEFAULTS`, plus ``assignor`` as ``partition.assignment.strategy``.  With
    ``group.protocol=consumer`` (KIP-848) there are none: the broker owns session, heartbeat and
    assignment, and librdkafka refuses a consumer that sets them.  Assignment is incremental with
    KIP-848 and with the classic ``cooperative-sticky`` assignor: rebalance callbacks then receive only
    the partitions added or taken away, and must use ``incremental_assign``/``incremental_unassign``.

    Parameters:
        app: the app whose consumer settings decide.
        assignor: the ``partition.assignment.strategy`` wanted under the classic protocol
            (the user's wins); None: librdkafka's.

    Returns:
        The defaults to pass as a consumer's ``defaults``, and whether assignment is incremental.
    """
    user = client_config(app, "consumer")
    if str(user.get("group.protocol", "classic")).lower() == "consumer":
        return {}, True
    defaults = dict(CLASSIC_GROUP_DEFAULTS)
    if assignor:
        defaults["partition.assignment.strategy"] = assignor
    strategy = str(user.get("partition.assignment.strategy") or assignor or "")
    return defaults, "cooperative" in strategy


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


#: Seconds between two checks of a run that has not started, at most.
MAX_RESEND_DELAY = 600.0

#: Seconds between two measurements of an intake's lag (see :meth:`ReactorIntake._measure_lag`).
LAG_INTERVAL = 2.0
#: Seconds between two requests to the broker for the offsets of a partition not being read, at most.
LAG_QUERY_INTERVAL = 10.0


@dataclass
class Handed:
    """A run handed to Celery and not finished: how to send it again, and when to look at it next."""

    partition: int
    kwargs: dict[str, Any]
    options: dict[str, Any]
    delay: float
    due: float
    redrives: int = 0


class ReactorIntake(threading.Thread):
    """Feeds one reactor's Celery task from its Kafka topic."""

    #: Whether the group assigns partitions incrementally (see :func:`group_defaults`); set by :meth:`run`.
    incremental: bool = False

    def __init__(self, app: Celery, task: Any, stop: threading.Event) -> None:
        super().__init__(name=f"fusion-intake-{task.topic}", daemon=True)
        self.app, self.task, self.stop_event = app, task, stop
        self.topic = task.topic
        self.max_in_flight = settings(app).max_in_flight
        self.in_flight: dict[str, Handed] = {}
        self.book = RunBook(app, consumer_group(app, task))
        self.to_read: set[int] = set()  # partitions assigned whose run book is not read yet
        self.restart_after = settings(app).run_restart_after
        self.resent = 0
        self.paused = False
        self.full = False  # at fusion_max_in_flight; until half of it is left
        self.pending: deque[KafkaMessage] = deque()  # read, not yet handed to Celery, in order
        self.consumer: Consumer | None = None
        # received = started + dead_lettered + dropped + len(pending); dropped: refused by the dead-letter topic
        self.counts = {"received": 0, "dead_lettered": 0, "started": 0, "dropped": 0}
        #: Records of each assigned partition not yet handed to Celery (the metrics read it from another thread).
        self.lag: dict[int, int] = {}
        # For the partitions the consumer has not read since they were assigned: where reading starts, and the
        # high watermark last asked of the broker (when, offset).
        self._lag_start: dict[int, int] = {}
        self._lag_high: dict[int, tuple[float, int]] = {}
        self._lag_pause_until = 0.0

    def _decode(self, msg: KafkaMessage) -> Message:
        """The request ``msg`` carries, read in the dialect it speaks (:func:`dialect_of_request`)."""
        conf = settings(self.app)
        return dialect_of_request(msg.value(), msg.headers()).decode_request(
            msg.value(), topic=msg.topic(), headers=msg.headers(), key=msg.key(), partition=msg.partition(),
            offset=msg.offset(), timestamp=msg.timestamp()[1], max_bytes=conf.max_message_bytes,
            prefix=conf.return_topic_prefix, allowlist=conf.reply_allowlist)

    def _dead_letter(self, msg: KafkaMessage, err: ProtocolError) -> None:
        """Send a copy of ``msg`` to the dead-letter topic, with why it was refused, cut to what Kafka takes.

        A copy refused as too large (the topic allows less than the producer) is sent again as the dead-letter
        headers alone, without key or value.  A record Kafka refuses for good (an ACL, no such topic, or too
        large even so) is dropped: an ERROR names it and it counts as ``dropped``, so that it does not stall
        its partition.  Kafka being away (:func:`transient`) raises: the record is kept and sent again later.
        """
        source = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
        why = [("fusion-dlq-reason", err.reason.encode()), ("fusion-dlq-error", str(err)[:1000].encode()),
               ("fusion-dlq-source", source.encode())]
        value, headers = dead_letter_copy(
            msg.value(), msg.key(), list(msg.headers() or []) + why,
            max_value=settings(self.app).max_message_bytes,
            max_record=int(client_config(self.app, "producer").get("message.max.bytes", 1_000_000)))
        topic = dlq_topic(self.app, self.topic)
        failure = _deliver(self.app, topic, value, msg.key(), headers)
        if failure is not None and failure.code() in _TOO_LARGE:
            logger.warning("reactor %s: %s refused the dead-letter copy of %s (%s); sending its headers alone",
                           self.topic, topic, source, failure.str())
            cut = [("fusion-dlq-truncated", str(len(msg.value())).encode())] if msg.value() else []
            failure = _deliver(self.app, topic, None, None, why + cut)
        if failure is None:
            self.counts["dead_lettered"] += 1
            logger.warning("reactor %s: dead-lettered %s: %s", self.topic, source, err)
            dead_lettered.send(sender=self, topic=self.topic, dlq=topic, partition=msg.partition(),
                               offset=msg.offset(), reason=err.reason)
        elif transient(failure):
            raise FusionError(f"cannot send to Kafka topic {topic!r}: {failure.str()}")
        else:
            self.counts["dropped"] += 1
            logger.error("reactor %s: dropped %s (%s: %s): the dead-letter topic %s refuses it: %s", self.topic,
                         source, err.reason, err, topic, failure.str())

    def _start(self, msg: KafkaMessage) -> None:
        try:
            message = self._decode(msg)
        except ProtocolError as err:
            self._dead_letter(msg, err)
            return
        except Exception as exc:
            # A fault of a decoder, not of the record's transport: decoding again gives the same error, so
            # the record goes where a malformed one goes instead of stopping its partition.
            logger.exception("reactor %s: cannot decode %s[%d]@%d", self.topic, msg.topic(), msg.partition(),
                             msg.offset())
            self._dead_letter(msg, ProtocolError(f"decoding the request failed: {type(exc).__name__}: {exc}",
                                                 "undecodable"))
            return
        task_id = run_id(msg.topic(), msg.partition(), msg.offset(), msg.timestamp()[1])
        # The run's span is a child of this one, through the task message's headers (resent with them).
        with tracing.receive(self.app, self.topic, parent=message.headers, **{
                "messaging.destination.partition.id": str(msg.partition()), "messaging.kafka.offset": msg.offset(),
                "celery.task_id": task_id}) as context:
            options = {"task_id": task_id, "shadow": f"{self.task.name}[{self.topic}]",
                       "root_id": message.headers.get(ROOT_HEADER) or None,
                       "parent_id": message.headers.get(PARENT_HEADER) or None}
            if context:
                options["headers"] = context
            run = Handed(partition=msg.partition(), kwargs={"message": message.to_dict()}, options=options,
                         delay=self.restart_after, due=time.monotonic() + self.restart_after)
            self.book.add(run.partition, task_id, run.kwargs, run.options)
            self.task.apply_async(kwargs=run.kwargs, **run.options)
        faults.point("intake.after-handover")
        self.in_flight[task_id] = run
        self.counts["started"] += 1

    def _refresh_in_flight(self) -> None:
        """Forget the runs that finished; send again those that show no sign of having started."""
        if self.to_read:
            self._read_books()
        if not self.in_flight:
            return
        unfinished = _unfinished(self.app, list(self.in_flight))
        self.book.remove([(run.partition, i) for i, run in self.in_flight.items() if i not in unfinished])
        self.in_flight = {i: run for i, run in self.in_flight.items() if i in unfinished}
        if self.restart_after > 0:
            self._resend_stalled()

    def _read_books(self) -> None:
        """Watch the unfinished runs of the partitions this intake was given, as written down by whoever
        handed them over (this intake before a rebalance, or a worker that has died since)."""
        now = time.monotonic()
        for partition in sorted(self.to_read):
            for run_id, (kwargs, options) in self.book.read(partition).items():
                if run_id not in self.in_flight:
                    self.in_flight[run_id] = Handed(partition, kwargs, options, delay=self.restart_after,
                                                    due=now + self.restart_after)
            self.to_read.discard(partition)

    def _resend_stalled(self) -> None:
        """Send again the runs due for a check that have not started or have stalled.

        A message can be lost after the hand-over: kombu's Redis transport drops one it
        popped as Redis went away.  If it was the run's, the run never takes its run-once
        claim (:func:`fusion_celery.claims.once`); if it was one of the steps of its
        deps' canvas, the run waits on no reply and has not moved for a while
        (:func:`fusion_celery.progress.stalled`).  The first is sent again as it was, the
        second with ``redrive``: it compiles its canvas again.  Either way a copy is
        harmless (a run starts once, a step runs once), so a run that merely waits
        behind a backlog costs a copy dropped later.  Checks back off (doubling, up to
        ten minutes).
        """
        now = time.monotonic()
        due = [i for i, run in self.in_flight.items() if run.due <= now]
        if not due:
            return
        started = claims.started(self.app, "run", due)
        stalled = progress.stalled(self.app, [i for i in due if i in started], self.restart_after)
        for task_id in due:
            run = self.in_flight[task_id]
            run.delay = min(run.delay * 2, MAX_RESEND_DELAY)
            run.due = now + run.delay
            if task_id not in started:
                self.task.apply_async(kwargs=run.kwargs, **run.options)
                what = "has not started; sent it again"
            elif task_id in stalled:
                run.redrives += 1
                self.task.apply_async(kwargs={**run.kwargs, "redrive": run.redrives}, **run.options)
                what = "has stalled (no reply awaited, no step lately); compiling its deps again"
            else:
                continue
            self.resent += 1
            logger.warning("reactor %s: run %s %s (next check in %.0fs)", self.topic, task_id, what, run.delay)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Take the partitions and give each the pause state in force now, both ways: librdkafka keeps
        a partition's pause across a revoke and a later re-assignment, so a partition paused while
        assigned here and resumed while another member held it would come back paused for good.

        Eager assignment (the classic protocol's default assignors) hands over the whole assignment;
        incremental assignment only the partitions added, next to those kept, which already have the
        pause state in force (``_set_paused`` applies it to the whole assignment)."""
        if self.incremental:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        self.to_read |= {p.partition for p in partitions}
        for p in partitions:  # another member may have read them meanwhile
            self._lag_start.pop(p.partition, None)
            self._lag_high.pop(p.partition, None)
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
        group, self.incremental = group_defaults(self.app)
        self.consumer = clients(self.app).consumer(
            defaults={"auto.offset.reset": "earliest", "auto.commit.interval.ms": 1000,
                      "topic.metadata.refresh.interval.ms": 10000, "client.id": f"fusion-intake-{self.topic}",
                      **group},
            **{"group.id": consumer_group(self.app, self.task),
               "enable.auto.commit": True,
               "enable.auto.offset.store": False})
        self.consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        last_check = last_lag = 0.0
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
                if now - last_lag >= LAG_INTERVAL:
                    last_lag = now
                    self._measure_lag()
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
            if self.resent:
                logger.info("reactor %s: sent %d runs again that had not started", self.topic, self.resent)

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

    def _measure_lag(self) -> None:
        """Measure :attr:`lag`: per assigned partition, its high watermark minus the next record to hand over.

        The next record is the consumer's position, less the records read but waiting in
        :attr:`pending` (the worker is at ``fusion_max_in_flight``, or the Celery broker is
        away): they are not handed over.  The high watermark is librdkafka's cached one,
        updated by every fetch, so a partition being read costs no request.  A partition the
        consumer has returned nothing from since it was assigned has no position: its committed
        offset stands in (else the low watermark), asked of the broker once per assignment.  A
        partition without a cached high watermark (none fetched yet), or paused (no fetch updates
        it then, and a paused intake is when the lag grows), has it asked of the broker at most
        every :data:`LAG_QUERY_INTERVAL` seconds.  After a failed request
        (Kafka away, a rebalance) nothing is measured for as long, so that the intake's loop is
        not held up.
        """
        now = time.monotonic()
        if now < self._lag_pause_until:
            return
        waiting: dict[int, int] = {}
        for msg in self.pending:
            waiting[msg.partition()] = waiting.get(msg.partition(), 0) + 1
        lag: dict[int, int] = {}
        try:
            for tp in self.consumer.position(self.consumer.assignment()):
                p, offset = tp.partition, tp.offset
                high = self.consumer.get_watermark_offsets(tp, cached=True)[1]
                if self.paused or high is None or high < 0:
                    asked = self._lag_high.get(p)
                    if asked is None or now - asked[0] > LAG_QUERY_INTERVAL:
                        asked = self._lag_high[p] = (now, self.consumer.get_watermark_offsets(tp, timeout=2)[1])
                    high = asked[1]
                if offset < 0:
                    if p not in self._lag_start:
                        committed = self.consumer.committed([TopicPartition(self.topic, p)], timeout=2)[0].offset
                        self._lag_start[p] = committed if committed >= 0 else \
                            self.consumer.get_watermark_offsets(tp, timeout=2)[0]
                    offset = self._lag_start[p]
                lag[p] = max(0, high - offset) + waiting.get(p, 0)
        except KafkaException as exc:
            logger.debug("reactor %s: cannot measure the lag: %s", self.topic, exc)
            self._lag_pause_until = now + LAG_QUERY_INTERVAL
            return
        self.lag = lag

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Commit what was handed over; forget what was not (the partitions' next owner reads it).

        ``partitions`` are the ones taken away: all of them under eager assignment, some under
        incremental.  Also called for partitions lost with the session (no ``on_lost`` is given); the
        commit then fails and is logged.  confluent-kafka unassigns them after this returns, with
        the call the protocol needs."""
        gone = {(p.topic, p.partition) for p in partitions}
        kept = deque(m for m in self.pending if (m.topic(), m.partition()) not in gone)
        self.counts["received"] -= len(self.pending) - len(kept)  # see the counts in __init__
        self.pending = kept
        # The partitions' runs are the next owner's to watch (it reads them from the run book).
        lost = {p for _, p in gone}
        self.to_read -= lost
        self.in_flight = {i: run for i, run in self.in_flight.items() if run.partition not in lost}
        self._commit()

    def _commit(self) -> None:
        try:
            self.consumer.commit(asynchronous=False)
        except Exception as exc:  # nothing stored yet, or the group is rebalancing
            if not (hasattr(exc, "args") and exc.args and getattr(exc.args[0], "code", lambda: None)()
                    == KafkaError._NO_OFFSET):
                logger.debug("reactor %s: commit: %s", self.topic, exc)


class Intake:
    """All reactor intakes of a worker: one :class:`ReactorIntake` thread per reactor.

    Parameters:
        app: the app whose reactors are served.
    """

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.stop_event = threading.Event()
        self.threads: list[ReactorIntake] = []

    def ensure_topics(self, tasks: list[Any]) -> None:
        """Create the reactors' topics (``fusion_reactor_partitions`` unless a reactor says) and dead-letter topics.

        Raises:
            FusionError: a topic cannot be created.
        """
        c = clients(self.app)
        default = settings(self.app).reactor_partitions
        for task in tasks:
            c.create_topics([task.topic], partitions=task.partitions or default, visible=True)
            c.create_topics([dlq_topic(self.app, task.topic)], partitions=1)

    def start(self, tasks: list[Any]) -> None:
        """Start one intake per reactor task, after creating their topics when ``fusion_create_topics`` is on."""
        if settings(self.app).create_topics:
            self.ensure_topics(tasks)
        for task in tasks:
            t = ReactorIntake(self.app, task, self.stop_event)
            t.start()
            self.threads.append(t)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the intakes (each commits what it handed over) and wait up to ``timeout`` seconds for each."""
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout)
