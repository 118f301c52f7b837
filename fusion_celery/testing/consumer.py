"""confluent-kafka's ``Consumer`` on an in-memory broker, a member of the broker's consumer groups."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    OFFSET_INVALID,
    OFFSET_STORED,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from .broker import kafka_error
from .client import Client, Config, as_bool, deadline_after, error_message, seconds_of, sooner, time_left
from .groups import TP

__all__ = ["Consumer"]


@dataclass
class _Assigned:
    """One partition in a consumer's assignment."""

    offset: int  # as assigned (what assignment() shows)
    start: int  # where to start reading: ``offset``, or where seek() said
    next: int | None = None  # the next offset to read; None: resolve ``start`` first
    position: int = OFFSET_INVALID  # after the last record returned (what position() shows)
    at_end: bool = False  # EOF reported for the current end
    missing: bool = False  # the topic or partition is missing, and that was reported


class Consumer(Client):
    """confluent-kafka's ``Consumer`` on an in-memory broker.

    ``poll``/``consume`` block on the broker's condition until records come (no
    polling loop); group callbacks and ``error_cb`` run inside them, in the
    caller's thread, as librdkafka's do.
    """

    _closed_text = "Consumer closed"

    def __init__(self, config: Config | None = None, **kwargs: Any) -> None:
        super().__init__(config, kwargs)
        c = self.config
        if not c.get("group.id"):
            self.broker.detach(self)
            raise ValueError("Failed to create consumer: group.id must be set")
        self.group_id = str(c["group.id"])
        self.auto_commit = as_bool(c.get("enable.auto.commit", True))
        self.auto_commit_interval = seconds_of(c, 5000, "auto.commit.interval.ms")
        self.auto_store = as_bool(c.get("enable.auto.offset.store", True))
        self.partition_eof = as_bool(c.get("enable.partition.eof", False))
        reset = str(c.get("auto.offset.reset", "latest")).lower()
        self.offset_reset = {"smallest": "earliest", "beginning": "earliest", "largest": "latest",
                             "end": "latest"}.get(reset, reset)
        strategies = [s.strip() for s in str(c.get("partition.assignment.strategy", "range,roundrobin")).split(",")]
        self.assignor = strategies[0]
        self.cooperative = str(c.get("group.protocol", "classic")).lower() == "consumer" or \
            "cooperative" in self.assignor
        self.rebalance_timeout = seconds_of(c, 300_000, "max.poll.interval.ms")
        self._assignment: dict[TP, _Assigned] = {}
        self._paused: set[TP] = set()
        self._stored: dict[TP, int] = {}
        self._member: str | None = None
        self._subscription: list[str] = []
        self._callbacks: dict[str, Callable[..., Any] | None] = {}
        self._rebalance_done = False
        self._last_auto_commit = time.monotonic()
        self._turn = 0

    # -- group membership --------------------------------------------------------------------------------------
    def subscribe(self, topics: list[str], on_assign: Callable[..., Any] | None = None,
                  on_revoke: Callable[..., Any] | None = None, on_lost: Callable[..., Any] | None = None) -> None:
        """Join the group ``group.id`` for ``topics``; partitions come and go through the callbacks.

        The callbacks run in this consumer's :meth:`poll`/:meth:`consume` with ``(consumer, partitions)``;
        without them, or when they do not assign, the consumer assigns as confluent-kafka does.

        Parameters:
            topics: topic names, and regular expressions starting with ``^``.
            on_assign: called with the partitions given (all of them under eager assignment, the added
                ones under cooperative).
            on_revoke: called with the partitions taken away, before they go to another member.
            on_lost: called with the partitions lost when the group removed this member (it did not
                give its partitions back within ``max.poll.interval.ms``); default ``on_revoke``.

        Raises:
            TypeError: ``topics`` is not a list.
        """
        self._check_open()
        if not isinstance(topics, list):
            raise TypeError("expected list of topic unicode strings")
        with self._cond:
            self._subscription = list(topics)
            self._callbacks = {"assign": on_assign, "revoke": on_revoke, "lost": on_lost}
            self._member = self.broker.group(self.group_id).join(
                self._subscription, cooperative=self.cooperative, assignor=self.assignor,
                rebalance_timeout=self.rebalance_timeout, member_id=self._member)

    def unsubscribe(self) -> None:
        """Give back the partitions (``on_revoke`` runs now) and leave the group."""
        self._check_open()
        self._leave()

    def _leave(self) -> None:
        with self._cond:
            member, self._member = self._member, None
            self._subscription = []
        if member is None:
            return
        held = list(self._assignment)
        if held:
            self._auto_commit(force=True)
            self._run_rebalance("revoke", held)
        with self._cond:
            self.broker.group(self.group_id).leave(member)

    def memberid(self) -> str | None:
        """This consumer's member id in its group (None when it has not subscribed)."""
        return self._member

    def _serve_group(self) -> bool:
        """Run the rebalance step the group asks of this consumer, if any; True if one ran."""
        with self._cond:
            if self._member is None or not self.broker.available:
                return False
            group = self.broker.group(self.group_id)
            group.expire(time.monotonic())
            action = group.next_action(self._member)
            if action is None:
                return False
            kind, parts = action
            if kind == "lost":
                parts = list(self._assignment)
        if kind == "revoke":
            self._auto_commit(force=True)
        self._run_rebalance(kind, parts)
        with self._cond:
            if kind == "revoke" and self._member is not None:
                self.broker.group(self.group_id).revoked(self._member)
            elif kind == "lost" and self._subscription:
                self._member = self.broker.group(self.group_id).join(
                    self._subscription, cooperative=self.cooperative, assignor=self.assignor,
                    rebalance_timeout=self.rebalance_timeout)
        return True

    def _run_rebalance(self, kind: str, parts: list[TP]) -> None:
        """Call the application's callback for ``kind``, then assign as confluent-kafka does if it did not."""
        tps = [TopicPartition(t, p) for t, p in parts]
        callback = self._callbacks.get(kind) or (self._callbacks.get("revoke") if kind == "lost" else None)
        self._rebalance_done = False
        try:
            if callback is not None:
                callback(self, tps)
        finally:
            if not self._rebalance_done:
                if kind == "assign":
                    self.incremental_assign(tps) if self.cooperative else self.assign(tps)
                elif self.cooperative:
                    self.incremental_unassign([tp for tp in tps if (tp.topic, tp.partition) in self._assignment])
                else:
                    self.unassign()

    # -- assignment ---------------------------------------------------------------------------------------------
    def assign(self, partitions: list[TopicPartition]) -> None:
        """Make ``partitions`` the whole assignment.

        Parameters:
            partitions: each read from its offset: a number, ``OFFSET_BEGINNING``, ``OFFSET_END``, or
                ``OFFSET_STORED``/``OFFSET_INVALID`` (the group's committed offset, else ``auto.offset.reset``).
        """
        self._check_open()
        with self._cond:
            self._assignment = {}
            self._add(partitions)

    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        """Add ``partitions`` to the assignment (offsets as for :meth:`assign`).

        Raises:
            KafkaException: ``_CONFLICT`` when one is assigned already.
        """
        self._check_open()
        with self._cond:
            for tp in partitions:
                if (tp.topic, tp.partition) in self._assignment:
                    raise KafkaException(kafka_error(
                        KafkaError._CONFLICT, f"{tp.topic} [{tp.partition}] is already part of the current assignment"))
            self._add(partitions)

    def _add(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            offset = OFFSET_STORED if tp.offset == OFFSET_INVALID else tp.offset
            self._assignment[(tp.topic, tp.partition)] = _Assigned(offset, offset)
        self._rebalance_done = True
        self._cond.notify_all()

    def incremental_unassign(self, partitions: list[TopicPartition]) -> None:
        """Take ``partitions`` out of the assignment.

        Raises:
            KafkaException: ``_INVALID_ARG`` when one is not assigned.
        """
        self._check_open()
        with self._cond:
            for tp in partitions:
                if (tp.topic, tp.partition) not in self._assignment:
                    raise KafkaException(kafka_error(
                        KafkaError._INVALID_ARG,
                        f"{tp.topic} [{tp.partition}] can't be unassigned since it is not in the current assignment"))
            for tp in partitions:
                del self._assignment[(tp.topic, tp.partition)]
            self._rebalance_done = True

    def unassign(self) -> None:
        """Empty the assignment."""
        self._check_open()
        with self._cond:
            self._assignment = {}
            self._rebalance_done = True

    def assignment(self) -> list[TopicPartition]:
        """The assigned partitions, with the offsets they were assigned at."""
        self._check_open()
        with self._cond:
            return [TopicPartition(t, p, a.offset) for (t, p), a in self._assignment.items()]

    def pause(self, partitions: list[TopicPartition]) -> None:
        """Stop reading ``partitions`` (the pause outlives a revoke and a later re-assignment, as librdkafka's)."""
        self._check_open()
        with self._cond:
            self._paused.update((tp.topic, tp.partition) for tp in partitions)

    def resume(self, partitions: list[TopicPartition]) -> None:
        """Read ``partitions`` again, from where reading stopped."""
        self._check_open()
        with self._cond:
            self._paused.difference_update((tp.topic, tp.partition) for tp in partitions)
            self._cond.notify_all()

    def seek(self, partition: TopicPartition) -> None:
        """Read an assigned partition from ``partition.offset`` next (logical offsets allowed).

        Raises:
            KafkaException: ``_STATE`` when the partition is not assigned.
        """
        self._check_open()
        with self._cond:
            a = self._assignment.get((partition.topic, partition.partition))
            if a is None:
                raise KafkaException(kafka_error(
                    KafkaError._STATE, f"Failed to seek to offset {partition.offset}: Local: Erroneous state"))
            a.next, a.start, a.position, a.at_end = None, partition.offset, OFFSET_INVALID, False
            self._cond.notify_all()

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        """The offset after the last record returned of each partition (``OFFSET_INVALID`` if none)."""
        self._check_open()
        with self._cond:
            out = []
            for tp in partitions:
                a = self._assignment.get((tp.topic, tp.partition))
                out.append(TopicPartition(tp.topic, tp.partition, a.position if a else OFFSET_INVALID))
            return out

    # -- reading ------------------------------------------------------------------------------------------------
    def poll(self, timeout: float | None = None) -> Message | None:
        """The next record or event (an error, or ``_PARTITION_EOF`` with ``enable.partition.eof``).

        Rebalance callbacks and ``error_cb`` run first.

        Parameters:
            timeout: seconds to wait (None or negative: for ever).

        Returns:
            The message, or None if none came in time.
        """
        got = self._read(1, timeout)
        return got[0] if got else None

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
        """Up to ``num_messages`` records and events; returns when it has them all or ``timeout`` passed.

        Parameters:
            num_messages: how many to wait for.
            timeout: seconds to wait at most (negative: for ever).

        Returns:
            The messages (fewer than ``num_messages``, maybe none, when the timeout passed).

        Raises:
            ValueError: ``num_messages`` is larger than 1000000.
            RuntimeError: the consumer was closed.
        """
        if num_messages > 1_000_000:
            raise ValueError("num_messages must be between 0 and 1000000 (1M)")
        return self._read(num_messages, timeout)

    def _read(self, n: int, timeout: float | None) -> list[Message]:
        self._check_open()
        deadline = deadline_after(timeout)
        out: list[Message] = []
        while True:
            while self._serve_group():
                pass
            self._serve_errors()
            self._auto_commit()
            with self._cond:
                if self.broker.available:
                    out.extend(self._fetch(n - len(out)))
                if len(out) >= n:
                    break
                if self._group_waiting():
                    continue
                remaining = time_left(deadline)
                if remaining == 0:
                    break
                self._cond.wait(self._wait_time(remaining))
        return out

    def _group_waiting(self) -> bool:
        """Whether an error or a rebalance step waits to be served by this consumer (with the lock held)."""
        if self._errors:
            return True
        if self._member is None or not self.broker.available:
            return False
        m = self.broker.group(self.group_id).members.get(self._member)
        return m is None or (m.revoke is not None and m.revoking is None) or m.assign is not None

    def _wait_time(self, remaining: float | None) -> float | None:
        """How long to wait for news: at most ``remaining``, and not past the group's next rebalance deadline."""
        due = self.broker.group(self.group_id).next_deadline() if self._member is not None else None
        return sooner(remaining, None if due is None else due - time.monotonic())

    def _fetch(self, room: int) -> list[Message]:
        """Take up to ``room`` records and events from the readable partitions (with the lock held)."""
        out: list[Message] = []
        parts = [tp for tp in self._assignment if tp not in self._paused]
        if not parts or room <= 0:
            return out
        self._turn = (self._turn + 1) % len(parts)
        for tp in parts[self._turn:] + parts[:self._turn]:
            if len(out) >= room:
                break
            a = self._assignment[tp]
            log = self.broker.log(*tp)
            if log is None:
                if not a.missing:
                    a.missing = True
                    out.append(error_message(kafka_error(KafkaError.UNKNOWN_TOPIC_OR_PART,
                                                          "Broker: Unknown topic or partition"), *tp))
                continue
            a.missing = False
            if a.next is None or a.next > len(log):
                event = self._resolve(tp, a, len(log))
                if event is not None:
                    out.append(event)
                    continue
            batch = log[a.next:a.next + room - len(out)]
            for r in batch:
                out.append(Message(topic=tp[0], partition=tp[1], offset=r.offset, key=r.key, value=r.value,
                                   headers=list(r.headers) if r.headers is not None else None,
                                   timestamp=r.timestamp))
            if batch:
                a.next = a.position = batch[-1].offset + 1
                a.at_end = False
                if self.auto_store:
                    self._stored[tp] = a.next
            if self.partition_eof and a.next == len(log) and not a.at_end and len(out) < room:
                a.at_end = True
                out.append(error_message(kafka_error(KafkaError._PARTITION_EOF, f"Fetch from broker 0 reached end "
                                                      f"of partition at offset {a.next}"), *tp, a.next))
        return out

    def _resolve(self, tp: TP, a: _Assigned, high: int) -> Message | None:
        """Turn a logical or out-of-range offset into the next offset to read; an event if it cannot be."""
        wanted = a.start if a.next is None else a.next
        if wanted == OFFSET_BEGINNING:
            a.next = 0
        elif wanted == OFFSET_END:
            a.next = high
        elif wanted in (OFFSET_STORED, OFFSET_INVALID):
            committed = self.broker.group(self.group_id).committed_offset(tp)
            wanted = committed if committed is not None and committed >= 0 else None
            a.next = wanted if wanted is not None and wanted <= high else None
        elif 0 <= wanted <= high:
            a.next = wanted
        if a.next is None or a.next > high:
            if self.offset_reset == "earliest":
                a.next = 0
            elif self.offset_reset == "latest":
                a.next = high
            else:
                a.next = high
                return error_message(kafka_error(KafkaError._AUTO_OFFSET_RESET,
                                                  "no committed offset and auto.offset.reset=error"), *tp)
        return None

    # -- offsets ------------------------------------------------------------------------------------------------
    def store_offsets(self, message: Message | None = None, offsets: list[TopicPartition] | None = None) -> None:
        """Store the offset to commit next (with ``enable.auto.offset.store`` off).

        Parameters:
            message: store its offset + 1.
            offsets: store each as given.

        Raises:
            KafkaException: ``_INVALID_ARG`` with ``enable.auto.offset.store`` on; ``_UNKNOWN_PARTITION`` for a
                partition not assigned.
        """
        self._check_open()
        if self.auto_store:
            raise KafkaException(kafka_error(KafkaError._INVALID_ARG,
                                             "StoreOffsets failed: Local: Invalid argument or configuration"))
        items = [(message.topic(), message.partition(), message.offset() + 1)] if message is not None else [
            (tp.topic, tp.partition, tp.offset) for tp in offsets or []]
        with self._cond:
            if any((t, p) not in self._assignment for t, p, _ in items):
                raise KafkaException(kafka_error(KafkaError._UNKNOWN_PARTITION,
                                                 "StoreOffsets failed: Local: Unknown partition"))
            for t, p, o in items:
                self._stored[(t, p)] = o

    def commit(self, message: Message | None = None, offsets: list[TopicPartition] | None = None,
               asynchronous: bool = True) -> list[TopicPartition] | None:
        """Commit offsets for the group.

        Parameters:
            message: commit its offset + 1.
            offsets: commit each as given.
            asynchronous: return None instead of the committed offsets (the commit is done at once either way).

        Returns:
            The committed offsets when synchronous, else None.

        Raises:
            KafkaException: ``_NO_OFFSET`` when there is nothing to commit, ``_TRANSPORT`` when the broker is down.
        """
        self._check_open()
        if message is not None:
            items = {(message.topic(), message.partition()): message.offset() + 1}
        elif offsets is not None:
            items = {(tp.topic, tp.partition): tp.offset for tp in offsets}
        else:
            with self._cond:
                items = {tp: o for tp, o in self._stored.items() if tp in self._assignment}
        if not items:
            raise KafkaException(kafka_error(KafkaError._NO_OFFSET, "Commit failed: Local: No offset stored"))
        with self._cond:
            self.broker.check_up("Commit failed")
            self.broker.group(self.group_id).commit({tp: (o, None) for tp, o in items.items()})
            for tp, o in items.items():
                if self._stored.get(tp) == o:
                    del self._stored[tp]
        return None if asynchronous else [TopicPartition(t, p, o) for (t, p), o in items.items()]

    def _auto_commit(self, force: bool = False) -> None:
        if not self.auto_commit or self._closed:
            return
        now = time.monotonic()
        if not force and now - self._last_auto_commit < self.auto_commit_interval:
            return
        self._last_auto_commit = now
        try:
            self.commit(asynchronous=True)
        except KafkaException:
            pass  # nothing stored, or the broker is down: librdkafka tries again at the next interval

    def committed(self, partitions: list[TopicPartition], timeout: float | None = None) -> list[TopicPartition]:
        """The group's committed offsets.

        Parameters:
            partitions: the partitions.
            timeout: seconds to wait for an unreachable broker (None: for ever).

        Returns:
            ``partitions`` with their committed offsets (``OFFSET_INVALID`` where there is none).

        Raises:
            KafkaException: ``_TIMED_OUT`` when the broker stayed unreachable for ``timeout`` seconds.
        """
        self._check_open()
        if not self.broker.wait_until_up(timeout):
            raise KafkaException(kafka_error(KafkaError._TIMED_OUT,
                                             "Failed to get committed offsets: Local: Timed out"))
        with self._cond:
            group = self.broker.group(self.group_id)
            out = []
            for tp in partitions:
                found = group.committed_offset((tp.topic, tp.partition))
                out.append(TopicPartition(tp.topic, tp.partition, OFFSET_INVALID if found is None else found))
            return out

    def get_watermark_offsets(self, partition: TopicPartition, timeout: float | None = None,
                              cached: bool = False) -> tuple[int, int]:
        """The low and high watermarks of ``partition`` (the low one is always 0: logs are never truncated).

        Parameters:
            partition: the partition.
            timeout: seconds to wait for an unreachable broker (None: for ever).
            cached: accepted for confluent-kafka's signature (the answer is always current).

        Returns:
            ``(low, high)``.

        Raises:
            KafkaException: ``UNKNOWN_TOPIC_OR_PART``; ``_TRANSPORT`` when the broker stayed unreachable.
        """
        self._check_open()
        self.broker.wait_until_up(timeout)
        return self.broker.watermarks(partition.topic, partition.partition)

    def offsets_for_times(self, partitions: list[TopicPartition], timeout: float | None = None
                          ) -> list[TopicPartition]:
        """For each partition, the offset of its first record stamped at or after the partition's ``offset``
        (epoch ms), or -1 when there is none.

        Raises:
            KafkaException: ``UNKNOWN_TOPIC_OR_PART``; ``_TRANSPORT`` when the broker stayed unreachable.
        """
        self._check_open()
        self.broker.wait_until_up(timeout)
        return [TopicPartition(tp.topic, tp.partition, self.broker.offset_for_time(tp.topic, tp.partition,
                                                                                   tp.offset))
                for tp in partitions]

    def close(self) -> None:
        """Commit (with auto-commit), give back the partitions (``on_revoke`` runs), leave the group."""
        if self._closed:
            return
        self._leave()
        self._auto_commit(force=True)
        with self._cond:
            self._closed = True
            self._assignment = {}
        self.broker.detach(self)
