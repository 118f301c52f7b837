"""The waiter: one per worker, it completes parked tasks when their replies arrive.

It follows the registry for the waits this worker owns (see
:mod:`fusion_celery.registry`), keeps them in a :class:`~fusion_celery.waitbook.WaitBook`,
and reads their return topics by explicit, incremental partition assignment (no
consumer per wait, no regex subscription).  A new wait starts on a *fresh*
consumer that long-polls for only 10 ms, so that a partition assigned while a
fetch is in flight is fetched almost at once; a wait still pending after
:data:`FRESH_SECONDS` moves to a *settled* consumer that long-polls for 500 ms,
so that thousands of long waits cost the broker a few fetches per second instead
of a hundred.  For each reply it completes the wait's task
(:func:`fusion_celery.completion.complete`), then removes the wait from the
registry, then ends its return topic as its reply channel says (an ephemeral
topic is deleted, a leased one goes back to its pool or is retired; see
:mod:`fusion_celery.channels`).  A wait whose deadline passes fails
with :class:`~fusion_celery.errors.DependencyTimeout`.  A record is read in the
dialect of its wait's service (:mod:`fusion_celery.dialects`): whether it may
complete the wait, and what result it carries.

A wait reads its own topic from the offset it was registered with (0, or a
leased topic's end at lease time).  The ``shared`` channel's topics serve many
waits: the fresh consumer reads each one a waiter holds a wait on, from a little
before that wait's creation (found by time), and a record finds its wait by the
id it carries (``fusion-id``, or the correlation id of another dialect:
:func:`~fusion_celery.dialects.correlation_of`).  A record whose id no held wait has is kept for
:data:`ORPHAN_SECONDS`, because the registry may report a wait after its reply
was read; a wait that arrives later than that is read again from its creation.  If completing fails (the
result backend is down) the wait stays and is retried; nothing is removed before
its completion was stored.

Both reply consumers are replaced by new ones, which read every held wait's
return topic again from its start:

- one that was given ``fusion_kafka_client_recycle_topics`` return topics more
  than it holds (librdkafka keeps every topic a client touched, see
  :mod:`fusion_celery.clients`);
- both, once :data:`OUTAGE_QUIET_SECONDS` passed after the last transport-level
  error either reported (Kafka unreachable): a consumer that lived through an
  outage can stop fetching partitions it holds, with their replies on them.
  Reading again from the waits' own start offsets cannot lose or double a
  completion: a wait is completed at most once, and a record of a wait no longer
  held is ignored.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from celery import Celery
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from . import tracing
from .channels import CHANNELS, ReplyChannel, channel, wait_opened
from .channels.leased import LeasePool
from .clients import clients
from .clock import now_ms
from .completion import Events, complete
from .config import settings
from .dialects import correlation_of, dialect
from .errors import DependencyFailed, DependencyTimeout, PayloadTooLarge, ProtocolError, RemoteError
from .protocol import ID_HEADER, check_size
from .registry import Change, Wait, Watcher
from .runtime import registry
from .transport import consume_ready, log_error
from .waitbook import WaitBook

__all__ = ["Waiter", "FRESH_SECONDS", "OUTAGE_QUIET_SECONDS", "OUTAGE_ERRORS", "ORPHAN_SECONDS", "LOOKBACK_MS"]

logger = logging.getLogger(__name__)

#: Seconds a wait stays on the fresh (low-latency) reply consumer before it moves to the settled one.
FRESH_SECONDS = 1.0
FRESH_FETCH_WAIT_MS = 10
SETTLED_FETCH_WAIT_MS = 500
#: Waits younger than this get their topic's metadata fetched before assignment (older ones, recovered from
#: the registry after a restart or a rebalance, are many and in no hurry: librdkafka's scan finds them).
YOUNG_MS = 10_000
#: Seconds a record on a shared topic whose id no held wait has is kept for a wait that may still come.
ORPHAN_SECONDS = 60.0
#: Most such records kept (the oldest go first).
ORPHAN_MAX = 20_000
#: A shared topic is read for a wait from this many milliseconds before the wait's creation (clocks of the
#: worker and the broker, which stamps the records, may differ).
LOOKBACK_MS = 10_000
#: Seconds without a transport-level error, after one, before both reply consumers are replaced.
OUTAGE_QUIET_SECONDS = 5.0
#: Error codes that say a reply consumer lost its brokers (connection refused or reset, name resolution
#: failed, requests timed out, every broker down).  Narrower than :func:`fusion_celery.transport.transient`,
#: whose leader and coordinator codes come and go while the brokers stay reachable and need no new consumer.
OUTAGE_ERRORS = frozenset({KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT,
                           KafkaError._RESOLVE})
#: Consumer errors that are part of normal operation (a partition read to its end, a return topic deleted).
_QUIET_ERRORS = frozenset({KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART})
_ROLES = ("replies", "settled")


def _unique(parts: list[TopicPartition]) -> list[TopicPartition]:
    """``parts`` with one entry per partition (the first): librdkafka refuses an assignment that names one twice."""
    return list({(tp.topic, tp.partition): tp for tp in reversed(parts)}.values())[::-1]


class Waiter(threading.Thread):
    """The thread that holds this worker's pending waits, reads their replies and completes them.

    Parameters:
        app: the fusion app (its registry, Kafka and result backend settings apply).
        name: this worker's name, under which it joins the registry's waiters.
        now_ms: the wall clock in epoch milliseconds (deadlines, ages).
        monotonic: a monotonic clock in seconds (retries, settling, deletion batches, outages).

    Attributes:
        ready: set once the waiter follows the registry and its consumers exist.
        book: the waits held (:class:`~fusion_celery.waitbook.WaitBook`).
        completed: waits completed with a reply.
        failed: waits completed with a failure (an error reply, an unreadable one, a timeout).
        rejected: records on a return topic that were not a reply to its wait (dropped).
        consumers_replaced: times both reply consumers were replaced after a Kafka outage.
    """

    def __init__(self, app: Celery, name: str, *, now_ms: Callable[[], int] = now_ms,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        super().__init__(name="fusion-waiter", daemon=True)
        self.app, self.worker_name = app, name
        self.now_ms, self.monotonic = now_ms, monotonic
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.open_error: BaseException | None = None  # why the waiter could not start (ready is set then too)
        self.book = WaitBook(now_ms=now_ms, monotonic=monotonic)
        self.registry: Any = None
        self.replies: Any = None  # the fresh consumer
        self.settled: Any = None
        self._watcher: Watcher | None = None
        self._new: list[str] = []  # added since the last _assign_new()
        self._unassign_due: dict[str, list[TopicPartition]] = {"replies": [], "settled": []}
        self._fresh: dict[str, float] = {}  # wait id -> when it was assigned (insertion order = age order)
        self._settled: set[str] = set()
        # return topics each consumer was given since it was made (librdkafka keeps them all)
        self._touched: dict[str, set[str]] = {"replies": set(), "settled": set()}
        self._made = {"replies": 0, "settled": 0}  # consumers made per role: the last one made is the current one
        self._outage_error: float | None = None  # when a current consumer last reported a transport error
        self._to_remove: dict[str, Wait] = {}  # finished waits whose registry removal failed
        self._next_offset: dict[str, int | None] = {}  # finished wait -> where its topic's next wait reads from
        self._tainted: set[str] = set()  # waits whose topic received a record it should not have
        self._last_remove = 0.0
        # shared topics: topic -> waits held on it; where reading starts (epoch ms: every record stamped
        # since was read or is being read); and the topics to (re)position, with the time to read from
        self._shared: dict[str, set[str]] = {}
        self._shared_since: dict[str, int] = {}
        self._shared_due: dict[str, int] = {}
        self._orphans: dict[str, tuple[Any, float]] = {}  # id -> (record, when read)
        self.channels: dict[str, ReplyChannel] = {}
        self.lease_pool: LeasePool | None = None
        self.completed = 0
        self.failed = 0
        self.rejected = 0
        self.consumers_replaced = 0
        self.require_id = settings(app).reply_id_required
        self.events = Events(app, hostname=name)

    # -- the waits held and their assignment -----------------------------------------------------
    def _apply(self, change: Change) -> None:
        if change.kind == "add" and change.wait is not None:
            self._add(change.wait)
        else:
            for wait_id in change.ids:
                self._forget(wait_id)

    def _add(self, wait: Wait) -> None:
        if wait.channel == "leased" and not self._take_topic(wait):
            return
        added = self.book.add(wait)
        if added.replaced is not None:
            # Registered again with another topic (an attempt of its task that ran again): its request
            # names the new one, and nobody reads the old one any more.
            self._release(added.replaced)
            self._channel(added.replaced).end(added.replaced.id, wait_opened(added.replaced), None)
        if added.added:
            self._new.append(wait.id)

    def _take_topic(self, wait: Wait) -> bool:
        """Whether ``wait`` may read its leased topic: False when a held wait leased it later.

        A leased topic is given back only after its wait's completion was stored, so of two
        waits registered on one topic the one that leased it earlier (the lower start
        offset) is finished, and only its registry removal was lost (its waiter died between
        the two).  That one is removed again; it never reads the topic alongside the other.
        """
        other = self.book.for_topic(wait.return_topic)
        if other is None or other.id == wait.id:
            return True
        stale = other if other.offset < wait.offset else wait
        logger.warning("waiter: %s and %s name the leased topic %s; the earlier lease (%s, from offset %d) is "
                       "finished and is removed again", wait.label, other.label, wait.return_topic, stale.id,
                       stale.offset)
        if stale is other:
            self._forget(other.id)
        try:
            self.registry.remove(stale)
        except Exception as exc:
            logger.warning("waiter: cannot remove %s from the registry: %s", stale.label, exc)
        return stale is not wait

    def _forget(self, wait_id: str) -> None:
        wait = self.book.forget(wait_id)
        if wait is not None:
            self._release(wait)

    def _release(self, wait: Wait) -> None:
        """Stop reading ``wait``'s return topic, on whichever consumer reads it.

        A shared topic stays assigned while the waiter runs (it serves the waits to come).
        """
        if wait.channel == "shared":
            self._shared.get(wait.return_topic, set()).discard(wait.id)
        elif wait.id in self._settled:
            self._settled.discard(wait.id)
            self._unassign("settled", wait.return_topic)
        elif self._fresh.pop(wait.id, None) is not None:
            self._unassign("replies", wait.return_topic)

    def _assign_new(self) -> None:
        """Assign the return topics of the waits added since the last call (and still held), at once.

        Runs after a whole batch of registry changes, so that a wait replayed from
        the registry together with its removal (a restart reads the registry from
        its beginning) is never assigned at all.
        """
        new, self._new = self._new, []
        now, young, parts = self.monotonic(), self.now_ms() - YOUNG_MS, []
        for wait_id in new:
            wait = self.book.get(wait_id)
            if wait is None or wait_id in self._fresh or wait_id in self._settled:
                continue
            if wait.channel == "shared":
                self._add_shared(wait)
                continue
            if wait.created >= young:
                self._learn_topic("replies", wait.return_topic)
            # An explicit offset, not OFFSET_BEGINNING: a logical offset costs an offset lookup first; a
            # return topic starts at 0, a leased one at its end at lease time (and auto.offset.reset=earliest
            # covers a topic whose start moved).
            parts.append(TopicPartition(wait.return_topic, 0, wait.offset))
            self._fresh[wait_id] = now
        if parts:
            self.replies.incremental_assign(_unique(parts))
            self._touched["replies"].update(tp.topic for tp in parts)
        self._position_shared()


    def _add_shared(self, wait: Wait) -> None:
        """Read ``wait``'s shared topic from before the wait's creation, unless it is read from there already;
        complete it at once from a record read before the registry reported it."""
        topic, start = wait.return_topic, wait.created - LOOKBACK_MS
        self._shared.setdefault(topic, set()).add(wait.id)
        since = self._shared_since.get(topic)
        if since is None or start < since:
            due = self._shared_due.get(topic)
            self._shared_due[topic] = start if due is None else min(due, start)
            return
        found = self._orphans.pop(wait.id, None)
        if found is not None:
            self._on_reply(found[0])

    def _position_shared(self) -> None:
        """(Re)assign the shared topics waiting for it, each from the first record stamped at or after the
        time it must be read from (its end when there is none)."""
        if not self._shared_due:
            return
        due, self._shared_due = self._shared_due, {}
        try:
            # The ends first: when no record is stamped at or after the time, every record before the end
            # is older, and every later one lies past it.
            ends = {t: self.replies.get_watermark_offsets(TopicPartition(t, 0), timeout=10, cached=False)[1]
                    for t in due}
            found = self.replies.offsets_for_times([TopicPartition(t, 0, ms) for t, ms in due.items()], timeout=10)
        except KafkaException as exc:  # tried again at the next turn
            logger.warning("waiter: cannot look up where to read %d shared topic(s): %s", len(due), exc)
            self._shared_due.update(due)
            return
        parts = [TopicPartition(tp.topic, 0, tp.offset if tp.offset >= 0 else ends[tp.topic]) for tp in found]
        assigned = [TopicPartition(t, 0) for t in due if t in self._shared_since]
        if assigned:
            self.replies.incremental_unassign(assigned)
        for topic in due:
            self._learn_topic("replies", topic)
        self.replies.incremental_assign(parts)
        self._touched["replies"].update(due)
        self._shared_since.update(due)
        for topic in due:  # replies of these waits may have been read before: read them again
            for wait_id in self._shared.get(topic, ()):
                self._orphans.pop(wait_id, None)

    def _settle(self) -> None:
        """Move the waits older than FRESH_SECONDS from the fresh consumer to the settled one."""
        horizon = self.monotonic() - FRESH_SECONDS
        moved: list[TopicPartition] = []
        while self._fresh:
            wait_id, since = next(iter(self._fresh.items()))
            if since > horizon:
                break
            del self._fresh[wait_id]
            wait = self.book.get(wait_id)
            if wait is None:
                continue
            self._unassign("replies", wait.return_topic)
            # From its start again: a reply that came meanwhile is read by the settled consumer.
            if wait.created >= self.now_ms() - YOUNG_MS:
                self._learn_topic("settled", wait.return_topic)
            moved.append(TopicPartition(wait.return_topic, 0, wait.offset))
            self._settled.add(wait_id)
        if moved:
            self.settled.incremental_assign(_unique(moved))
            self._touched["settled"].update(tp.topic for tp in moved)

    def _unassign(self, which: str, topic: str) -> None:
        """Queue ``topic`` for unassignment from consumer ``which`` (see :meth:`_flush_unassign`)."""
        self._unassign_due[which].append(TopicPartition(topic, 0))

    def _flush_unassign(self) -> None:
        """Unassign the queued partitions, one call per consumer.

        librdkafka's incremental_unassign costs time in proportion to the whole
        assignment, so one call per finished wait would make draining thousands of
        waits take minutes.
        """
        for which, parts in self._unassign_due.items():
            if not parts:
                continue
            self._unassign_due[which] = []
            consumer = getattr(self, which)
            try:
                consumer.incremental_unassign(parts)
            except Exception:  # one of them not assigned (any more): do them one by one
                for tp in parts:
                    try:
                        consumer.incremental_unassign([tp])
                    except Exception as exc:
                        logger.debug("waiter: unassign %s: %s", tp.topic, exc)

    def _learn_topic(self, which: str, topic: str) -> None:
        """Fetch a return topic's metadata before consumer ``which`` is first assigned it, so its reply is
        fetched at once.

        librdkafka learns the leader of a partition assigned by name only on its
        once-a-second scan of unknown topics: without this, every reply would wait
        0.5 s on average (up to 1 s) before the consumer fetched it.  A topic the
        consumer was given before (a leased or shared one) is known already.
        """
        if topic in self._touched[which]:
            return
        try:
            getattr(self, which).list_topics(topic, timeout=5)
        except KafkaException as exc:  # the scan will find it later
            logger.debug("waiter: metadata of %s: %s", topic, exc)

    # -- replies and completion ------------------------------------------------------------------
    def _read(self) -> None:
        """Read what the consumers have (the fresh one waits up to 10 ms for a first record)."""
        msgs = [(m, "replies") for m in consume_ready(self.replies, 500, 0.01)] \
            if self._fresh or self._shared_since else []
        if self._settled:
            msgs += [(m, "settled") for m in self.settled.consume(500, timeout=0 if self._fresh else 0.01)]
        for msg, which in msgs:
            err = msg.error()
            if err is None:
                self._on_reply(msg)
            elif err.code() not in _QUIET_ERRORS:
                logger.debug("waiter: %s consumer: %s", which, err.str())
                self.on_kafka_error(err, which)

    def _on_reply(self, msg: Any) -> None:
        """Complete the wait ``msg`` answers, or drop ``msg`` when it may not complete it."""
        if msg.topic() in self._shared_since:
            self._on_shared_reply(msg)
            return
        wait = self.book.for_topic(msg.topic())
        if wait is None or self.book.retrying(wait.id):
            return  # not a held wait, or a wait whose completion is being retried
        if msg.offset() < wait.offset:
            return  # a leased topic's record from before this wait's lease
        why = dialect(wait.dialect).rejection(msg.value(), msg.headers(), wait.id, require_id=self.require_id)
        if why is not None:
            self.rejected += 1
            self._tainted.add(wait.id)
            logger.warning("waiter: dropped the record %s[%d]@%d: %s; %s still waits", msg.topic(),
                           msg.partition(), msg.offset(), why, wait.label)
            return
        self._complete_from(msg, wait)

    def _on_shared_reply(self, msg: Any) -> None:
        """Complete the held wait whose id ``msg`` carries; keep ``msg`` a while when no held wait has it.

        The id is read as any dialect carries it (:func:`~fusion_celery.dialects.correlation_of`), and the
        record must then be an answer in the dialect of the wait it names.
        """
        wait_id = correlation_of(msg.value(), msg.headers())
        if wait_id is None:
            self.rejected += 1
            logger.warning("waiter: dropped the record %s[%d]@%d: a shared reply topic's record needs a %s "
                           "header (or the correlation id of a dialect)", msg.topic(), msg.partition(),
                           msg.offset(), ID_HEADER)
            return
        wait = self.book.get(wait_id)
        if wait is None or wait.return_topic != msg.topic():
            if len(self._orphans) >= ORPHAN_MAX:
                self._forget_orphan(next(iter(self._orphans)))
            self._orphans[wait_id] = (msg, self.monotonic())
            return
        if self.book.retrying(wait.id):
            return
        why = dialect(wait.dialect).rejection(msg.value(), msg.headers(), wait.id, require_id=True)
        if why is not None:
            self.rejected += 1
            logger.warning("waiter: dropped the record %s[%d]@%d: %s; %s still waits", msg.topic(),
                           msg.partition(), msg.offset(), why, wait.label)
            return
        self._complete_from(msg, wait)

    def _forget_orphan(self, wait_id: str) -> None:
        """Drop a kept record; its topic counts as read from after it only (see :meth:`_add_shared`)."""
        msg, _ = self._orphans.pop(wait_id)
        stamped = msg.timestamp()[1]
        if msg.topic() in self._shared_since and stamped > 0:
            self._shared_since[msg.topic()] = max(self._shared_since[msg.topic()], stamped + 1)

    def _expire_orphans(self) -> None:
        horizon = self.monotonic() - ORPHAN_SECONDS
        while self._orphans:
            wait_id, (_, seen) = next(iter(self._orphans.items()))
            if seen > horizon:
                return
            self._forget_orphan(wait_id)

    def _complete_from(self, msg: Any, wait: Wait) -> None:
        """Complete ``wait`` with the reply ``msg`` (which may complete it), in the reply's span: a child of
        the request's (the wait's ``trace``), linked to the reply's own ``traceparent`` when it has another."""
        with tracing.receive(self.app, wait.return_topic, parent={"traceparent": wait.trace} if wait.trace else None,
                             link=msg.headers(), name=f"receive {wait.topic} reply",
                             **{"fusion.dep": wait.dep, "fusion.request_topic": wait.topic,
                                "celery.task_id": wait.id}):
            self._complete_reply(msg, wait)

    def _complete_reply(self, msg: Any, wait: Wait) -> None:
        try:
            check_size(msg.value() or b"", settings(self.app).max_message_bytes, "the reply")
        except PayloadTooLarge as err:
            self._finish(wait, exc=DependencyFailed(f"{wait.label}: {err}"))
            return
        try:
            result = dialect(wait.dialect).decode_reply(msg.value(), msg.headers())
        except RemoteError as err:
            self._finish(wait, exc=DependencyFailed(f"{wait.label} replied with an error: {err}"))
        except ProtocolError as err:
            self._finish(wait, exc=DependencyFailed(f"{wait.label} sent an unreadable reply: {err}"))
        else:
            if wait.id not in self._tainted:  # its topic may serve another wait, from after this reply
                self._next_offset[wait.id] = msg.offset() + 1
            self._finish(wait, result=result)

    def _finish(self, wait: Wait, result: Any = None, exc: BaseException | None = None) -> None:
        """Complete ``wait``'s task; then remove the wait from the registry and end its topic.

        A completion that raises leaves everything in place and is tried again later
        with the same outcome (:meth:`WaitBook.failed`).
        """
        try:
            complete(self.app, wait, result=result, exc=exc, events=self.events, done=self.book.done(wait.id))
        except Exception as err:
            retry = self.book.failed(wait.id, result, exc)
            logger.warning("waiter: cannot complete %s (%s); retry %d in %.1fs", wait.label, err, retry.attempt,
                           retry.due - self.monotonic())
            return
        if exc is None:
            self.completed += 1
        else:
            self.failed += 1
        self._forget(wait.id)
        self._remove(wait)

    def _remove(self, wait: Wait) -> None:
        """Remove a finished wait from the registry, then end its topic (see :meth:`ReplyChannel.end`).

        A registry that cannot be reached keeps the wait in ``_to_remove`` (tried
        again every second): the waiter goes on, and should it die first, the
        waiter that replays the wait finds its outcome stored and only replays the
        idempotent steps after it.
        """
        try:
            self.registry.remove(wait)
        except Exception as err:
            if wait.id not in self._to_remove:
                logger.warning("waiter: cannot remove %s from the registry (%s); trying again", wait.label, err)
            self._to_remove[wait.id] = wait
            return
        self._to_remove.pop(wait.id, None)
        self._tainted.discard(wait.id)
        self._channel(wait).end(wait.id, wait_opened(wait), self._next_offset.pop(wait.id, None))

    def _channel(self, wait: Wait) -> ReplyChannel:
        found = self.channels.get(wait.channel)
        if found is None:
            found = self.channels[wait.channel] = channel(self.app, wait.channel)
        return found

    def _remove_pending(self) -> None:
        now = self.monotonic()
        if self._to_remove and now - self._last_remove >= 1.0:
            self._last_remove = now
            for wait in list(self._to_remove.values()):
                self._remove(wait)
                if wait.id in self._to_remove:
                    break  # still unreachable: the rest waits for the next turn

    def _expire(self) -> None:
        for wait in self.book.expired():
            waited = (wait.deadline - wait.created) / 1000
            with tracing.timed_out(self.app, wait.topic, parent=wait.trace,
                                   **{"fusion.dep": wait.dep, "celery.task_id": wait.id}):
                self._finish(wait, exc=DependencyTimeout(
                    f"{wait.label} did not reply within {waited:g}s (return topic {wait.return_topic})"))

    def _retry_due(self) -> None:
        for wait, retry in self.book.retries_due():
            self._finish(wait, retry.result, retry.exc)

    def _tick_channels(self, force: bool = False) -> None:
        """The channels' upkeep: deletions, leased topics given back, the lease pool kept alive."""
        if self.lease_pool is not None and not force:
            self.lease_pool.tick()
        for ch in self.channels.values():
            try:
                ch.tick(force=force)
            except Exception as exc:
                logger.warning("waiter: %s reply channel: %s", ch.name, exc)

    # -- the reply consumers ---------------------------------------------------------------------
    def _consumer(self, which: str) -> Any:
        """A new reply consumer for role ``which`` (``replies``: fresh, ``settled``), the current one from now."""
        self._made[which] += 1
        serial, me = self._made[which], weakref.ref(self)

        def on_error(err: KafkaError) -> None:
            log_error(err)
            waiter = me()
            if waiter is not None:
                waiter.on_kafka_error(err, which, serial)

        return clients(self.app).consumer(**{
            "group.id": "fusion.reply-readers",  # never joined nor committed: partitions are assigned
            "client.id": f"fusion-waiter-{self.worker_name}",
            "enable.auto.commit": False,
            # A return topic holds one reply: should the start offset be unknown (the broker not yet
            # serving a brand-new topic), start from its beginning, never from its end.
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": FRESH_FETCH_WAIT_MS if which == "replies" else SETTLED_FETCH_WAIT_MS,
            "log_level": 4,  # no per-topic info lines for every return topic assigned and deleted
            "topic.metadata.refresh.interval.ms": 30000,
            "error_cb": on_error,
        })

    def on_kafka_error(self, err: KafkaError, which: str | None = None, serial: int | None = None) -> None:
        """Note an error a reply consumer reported (its ``error_cb``, or an error event from ``consume``).

        A transport-level error (:data:`OUTAGE_ERRORS`) starts, or extends, an outage:
        :meth:`_replace_after_outage` replaces both consumers once it is over.
        Errors of a consumer already replaced are ignored.

        Parameters:
            err: the error.
            which: the role of the consumer that reported it, when known.
            serial: which consumer of that role reported it (errors of replaced ones are ignored).
        """
        if which is not None and serial is not None and serial != self._made[which]:
            return
        if err.code() in OUTAGE_ERRORS:
            self._outage_error = self.monotonic()

    def _replace_after_outage(self) -> None:
        """Replace both reply consumers once :data:`OUTAGE_QUIET_SECONDS` passed since the last outage error."""
        since = self._outage_error
        if since is None or self.monotonic() - since < OUTAGE_QUIET_SECONDS:
            return
        self._outage_error = None
        carried = {which: self._replace(which)[1] for which in _ROLES}
        self.consumers_replaced += 1
        logger.info("waiter: replaced both reply consumers after a Kafka outage (no transport error for %.0fs); "
                    "%d fresh and %d settled waits read again from offset 0", OUTAGE_QUIET_SECONDS,
                    carried["replies"], carried["settled"])

    def _recycle(self) -> None:
        """Replace a reply consumer that was given ``fusion_kafka_client_recycle_topics`` return topics
        more than it holds now (see :mod:`fusion_celery.clients` for why)."""
        limit = settings(self.app).kafka_client_recycle_topics
        if limit <= 0:
            return
        for which in _ROLES:
            if len(self._touched[which]) - len(self._holding(which)) - len(self._shared_since) < limit:
                continue
            touched, carried = self._replace(which)
            logger.info("waiter: replaced its %s consumer after %d return topics (%d waits carried over)", which,
                        touched, carried)

    def _holding(self, which: str) -> dict[str, float] | set[str]:
        return self._fresh if which == "replies" else self._settled

    def _replace(self, which: str) -> tuple[int, int]:
        """Replace consumer ``which`` by a new one assigned every wait it holds, from offset 0.

        Runs between two polls, when every record the old consumer returned has been
        handled, so no reply is missed; the old one is closed after the new one holds
        its waits.

        Returns:
            The return topics the old consumer was given, and the waits carried over.
        """
        waits = [w for w in map(self.book.get, self._holding(which)) if w is not None]
        parts = [TopicPartition(w.return_topic, 0, w.offset) for w in waits]
        new, old = self._consumer(which), getattr(self, which)
        if parts:
            new.incremental_assign(_unique(parts))
        setattr(self, which, new)
        self._unassign_due[which] = []
        touched, self._touched[which] = len(self._touched[which]), {tp.topic for tp in parts}
        if which == "replies":  # the shared topics too, from before their oldest held wait
            for topic in list(self._shared_since):
                held = [w.created for w in map(self.book.get, self._shared.get(topic, ())) if w is not None]
                self._shared_due[topic] = min(held, default=self.now_ms()) - LOOKBACK_MS
            self._shared_since.clear()
        try:
            old.close()
        except Exception as exc:
            logger.warning("waiter: closing a replaced %s consumer: %s", which, exc)
        return touched, len(parts)

    # -- the loop ----------------------------------------------------------------------------
    def _open(self) -> None:
        """Make the consumers and join the registry's waiters; set :attr:`ready`."""
        self.registry = registry(self.app)
        self.channels = {name: channel(self.app, name) for name in CHANNELS}
        self.lease_pool = LeasePool(self.app, self.worker_name)
        self.lease_pool.start()
        self.replies, self.settled = self._consumer("replies"), self._consumer("settled")
        self._watcher = self.registry.watch(self.worker_name)
        self.ready.set()

    def _step(self) -> None:
        """One turn of the loop: registry changes, replies, deadlines, retries, consumer upkeep."""
        assert self._watcher is not None
        for change in self._watcher.poll(0 if self.book else 0.1):
            self._apply(change)
        self._flush_unassign()  # before a wait dropped and added again is assigned again
        self._assign_new()
        if self.book:
            self._read()
        self._settle()
        self._expire()
        self._retry_due()
        self._flush_unassign()
        self._recycle()
        self._position_shared()
        self._expire_orphans()
        self._replace_after_outage()
        self._remove_pending()
        self._tick_channels()
        clients(self.app).producer.poll(0)

    def _close(self) -> None:
        """Delete the finished topics, leave the waiters (the waits go to the others), close the clients."""
        steps: list[tuple[str, Callable[[], None]]] = [
            ("end the lease pool", self.lease_pool.close if self.lease_pool is not None else lambda: None),
            ("end return topics", lambda: self._tick_channels(force=True)),
            ("leave the waiters", self._watcher.close if self._watcher is not None else lambda: None),
            ("close the reply consumers", self._close_replies),
            ("close the event dispatcher", self.events.close)]
        for step, close in steps:
            try:
                close()
            except Exception as exc:
                logger.warning("waiter: cannot %s: %s", step, exc)
        logger.info("waiter: stopped (%d completed, %d failed, %d records rejected, %d left to the others)",
                    self.completed, self.failed, self.rejected, len(self.book))

    def run(self) -> None:
        try:
            self._open()
        except Exception as exc:  # e.g. a registry URL nobody serves: the worker reports it and stops
            self.open_error = exc
            self.ready.set()
            self._close()
            return
        try:
            while not self.stop_event.is_set():
                self._step()
        except Exception:
            logger.exception("waiter: crashed; its waits go to the other workers")
            raise
        finally:
            self._close()

    def _close_replies(self) -> None:
        for consumer in (self.replies, self.settled):
            if consumer is None:  # never made: the waiter could not start
                continue
            consumer.unassign()
            consumer.close()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread and wait for it: its waits go to the other workers' waiters.

        Parameters:
            timeout: seconds to wait for the thread to finish; past them it is left running
                (a daemon thread) and a warning is logged.
        """
        self.stop_event.set()
        self.join(timeout)
        if self.is_alive():
            logger.warning("waiter: still shutting down after %.0fs; leaving it (its waits go to the others)",
                           timeout)

    def status(self) -> dict[str, Any]:
        """What this waiter holds (``celery fusion status``; safe to call from another thread).

        Returns:
            ``pending`` waits, the ``oldest`` one and its age in seconds (``oldest_age_s``),
            the waits per request topic (``by_topic``), the counters ``completed``,
            ``failed``, ``rejected``, ``retrying`` (completions to try again),
            ``consumers_replaced`` (after Kafka outages), ``partitions``, the registry
            partitions or buckets this waiter owns (None: the registry does not divide waits,
            or the waiter has not opened it yet), and ``readers``: the waits its fresh and its
            settled reply consumers read.
        """
        oldest = self.book.oldest()
        watcher = self._watcher
        return {
            "pending": len(self.book),
            "oldest_age_s": round((self.now_ms() - oldest.created) / 1000, 3) if oldest else None,
            "oldest": {"id": oldest.id, "topic": oldest.topic, "dep": oldest.dep} if oldest else None,
            "by_topic": self.book.count_by_topic(),
            "completed": self.completed,
            "failed": self.failed,
            "rejected": self.rejected,
            "retrying": self.book.retries,
            "consumers_replaced": self.consumers_replaced,
            "partitions": watcher.owned() if watcher is not None else None,
            "readers": {"fresh": len(self._fresh), "settled": len(self._settled)},
        }
