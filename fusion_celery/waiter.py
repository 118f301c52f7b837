"""The waiter: one per worker, it completes parked tasks when their replies arrive.

It follows the registry for the waits this worker owns (see
:mod:`fusion_celery.registry`), and reads their return topics with a single
consumer by explicit, incremental partition assignment (no consumer per wait, no
regex subscription).  A new wait starts on a *fresh* consumer that long-polls for
only 10 ms, so that a partition assigned while a fetch is in flight is fetched
almost at once; a wait still pending after :data:`FRESH_SECONDS` moves to a
*settled* consumer that long-polls for 500 ms, so that thousands of long waits
cost the broker a few fetches per second instead of a hundred.  For each reply it
completes the wait's task (:func:`fusion_celery.completion.complete`), then removes the wait from the
registry, then deletes the return topic.  A wait whose deadline passes fails
with :class:`~fusion_celery.errors.DependencyTimeout`.  If completing fails (the
result backend is down) the wait stays and is retried; nothing is removed before
its completion was stored.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import Counter
from typing import Any

from celery import Celery
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from .completion import Events, complete
from .config import setting
from .errors import DependencyFailed, DependencyTimeout, PayloadTooLarge, ProtocolError, RemoteError
from .kafka import clients, consume_ready
from .protocol import check_size, decode_reply, reply_rejection
from .registry import Change, Wait, now_ms
from .runtime import registry

__all__ = ["Waiter"]

logger = logging.getLogger(__name__)

TAKEOVER_GRACE_MS = 5000
#: Seconds a wait stays on the fresh (low-latency) reply consumer before it moves to the settled one.
FRESH_SECONDS = 1.0
FRESH_FETCH_WAIT_MS = 10
SETTLED_FETCH_WAIT_MS = 500
#: Waits younger than this get their topic's metadata fetched before assignment (older ones, recovered from
#: the registry after a restart or a rebalance, are many and in no hurry: librdkafka's scan finds them).
YOUNG_MS = 10_000


class Waiter(threading.Thread):
    """Holds this worker's pending waits and completes them."""

    def __init__(self, app: Celery, name: str) -> None:
        super().__init__(name="fusion-waiter", daemon=True)
        self.app, self.worker_name = app, name
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.waits: dict[str, Wait] = {}
        self.by_topic: dict[str, str] = {}
        self._deadlines: list[tuple[int, str]] = []
        self._retry: dict[str, tuple[float, int, Any, BaseException | None]] = {}
        self._done: dict[str, dict[str, bool]] = {}  # completion steps done, for a retried completion
        self._new: list[str] = []  # added since the last _assign_new()
        self._unassign_due: dict[str, list[TopicPartition]] = {"replies": [], "settled": []}
        self._fresh: dict[str, float] = {}  # wait id -> when it was assigned (insertion order = age order)
        self._settled: set[str] = set()
        self._touched = {"replies": 0, "settled": 0}  # return topics each consumer was given since it was made
        self._to_delete: list[str] = []
        self._last_delete = 0.0
        self.completed = 0
        self.failed = 0
        self.rejected = 0  # records on a return topic that were not a reply to its wait
        self.require_id = bool(setting(app, "fusion_reply_id_required"))
        self.events = Events(app, hostname=name)

    # -- bookkeeping -------------------------------------------------------------------------
    def _add(self, wait: Wait) -> None:
        held = self.waits.get(wait.id)
        if held is not None:
            if held.return_topic == wait.return_topic:
                return
            # Registered again with another topic (an attempt of its task that ran again): its request
            # names the new one.
            self._forget(wait.id)
            self._to_delete.append(held.return_topic)
        self.waits[wait.id] = wait
        self.by_topic[wait.return_topic] = wait.id
        # A wait taken over from a dead worker may be past its deadline with its reply already
        # on the topic: read the topic for a moment before calling it a timeout.
        now = now_ms()
        due = wait.deadline if wait.deadline > now else now + TAKEOVER_GRACE_MS
        heapq.heappush(self._deadlines, (due, wait.id))
        self._new.append(wait.id)

    def _assign_new(self) -> None:
        """Assign the return topics of the waits added since the last call (and still pending), at once.

        Runs after a whole batch of registry changes, so that a wait replayed from
        the registry together with its removal (a restart reads the registry from
        its beginning) is never assigned at all.
        """
        new, self._new = self._new, []
        now, young, parts = time.monotonic(), now_ms() - YOUNG_MS, []
        for wait_id in new:
            wait = self.waits.get(wait_id)
            if wait is None or wait_id in self._fresh or wait_id in self._settled:
                continue
            if wait.created >= young:
                self._learn_topic(self.replies, wait.return_topic)
            # Offset 0, not OFFSET_BEGINNING: a logical offset costs an offset lookup first; a return
            # topic starts at 0 (and auto.offset.reset=earliest covers a topic whose start moved).
            parts.append(TopicPartition(wait.return_topic, 0, 0))
            self._fresh[wait_id] = now
        if parts:
            self.replies.incremental_assign(parts)
            self._touched["replies"] += len(parts)

    def _settle(self) -> None:
        """Move the waits older than FRESH_SECONDS from the fresh consumer to the settled one."""
        horizon = time.monotonic() - FRESH_SECONDS
        moved: list[TopicPartition] = []
        while self._fresh:
            wait_id, since = next(iter(self._fresh.items()))
            if since > horizon:
                break
            del self._fresh[wait_id]
            wait = self.waits.get(wait_id)
            if wait is None:
                continue
            self._unassign("replies", wait.return_topic)
            # From the beginning again: a reply that came meanwhile is read by the settled consumer.
            if wait.created >= now_ms() - YOUNG_MS:
                self._learn_topic(self.settled, wait.return_topic)
            moved.append(TopicPartition(wait.return_topic, 0, 0))
            self._settled.add(wait_id)
        if moved:
            self.settled.incremental_assign(moved)
            self._touched["settled"] += len(moved)

    def _unassign(self, which: str, topic: str) -> None:
        """Queue ``topic`` for unassignment from consumer ``which`` (see :meth:`_flush_unassign`)."""
        self._unassign_due[which].append(TopicPartition(topic, 0))

    def _flush_unassign(self) -> None:
        """Unassign the queued partitions, one call per consumer.

        librdkafka's incremental_unassign costs time in proportion to the whole
        assignment, so one call per finished wait made draining thousands of waits
        take minutes.
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

    @staticmethod
    def _learn_topic(consumer: Any, topic: str) -> None:
        """Fetch a return topic's metadata before assigning it, so its reply is fetched at once.

        librdkafka learns the leader of a partition assigned by name only on its
        once-a-second scan of unknown topics: without this, every reply waited
        0.5 s on average (up to 1 s) before the consumer fetched it.
        """
        try:
            consumer.list_topics(topic, timeout=5)
        except KafkaException as exc:  # the scan will find it later
            logger.debug("waiter: metadata of %s: %s", topic, exc)

    def _forget(self, wait_id: str) -> Wait | None:
        wait = self.waits.pop(wait_id, None)
        if wait is None:
            return None
        self.by_topic.pop(wait.return_topic, None)
        self._retry.pop(wait_id, None)
        self._done.pop(wait_id, None)
        if len(self._deadlines) > 2 * len(self.waits) + 1024:
            # Finished waits leave their deadline in the heap until it is due (an hour by default):
            # drop them now and then, so that the heap follows the waits held, not the waits served.
            self._deadlines = [(due, i) for due, i in self._deadlines if i in self.waits]
            heapq.heapify(self._deadlines)
        if wait_id in self._settled:
            self._settled.discard(wait_id)
            self._unassign("settled", wait.return_topic)
        elif self._fresh.pop(wait_id, None) is not None:
            self._unassign("replies", wait.return_topic)
        return wait

    def _apply(self, change: Change) -> None:
        if change.kind == "add" and change.wait is not None:
            self._add(change.wait)
        else:
            for wait_id in change.ids:
                self._forget(wait_id)

    # -- completion --------------------------------------------------------------------------
    def _finish(self, wait: Wait, result: Any = None, exc: BaseException | None = None) -> None:
        try:
            complete(self.app, wait, result=result, exc=exc, events=self.events,
                     done=self._done.setdefault(wait.id, {}))
        except Exception as err:
            attempt = self._retry.get(wait.id, (0, 0, None, None))[1] + 1
            delay = min(30.0, 0.5 * 2 ** min(attempt, 6))
            self._retry[wait.id] = (time.monotonic() + delay, attempt, result, exc)
            logger.warning("waiter: cannot complete %s (%s); retry %d in %.1fs", wait.label, err, attempt, delay)
            return
        if exc is None:
            self.completed += 1
        else:
            self.failed += 1
        self._forget(wait.id)
        self.registry.remove(wait)
        self._to_delete.append(wait.return_topic)

    def _on_reply(self, msg: Any) -> None:
        wait_id = self.by_topic.get(msg.topic())
        wait = self.waits.get(wait_id) if wait_id else None
        if wait is None or wait.id in self._retry:
            return
        why = reply_rejection(msg.headers(), wait.id, require_id=self.require_id)
        if why is not None:
            self.rejected += 1
            logger.warning("waiter: dropped the record %s[%d]@%d: %s; %s still waits", msg.topic(),
                           msg.partition(), msg.offset(), why, wait.label)
            return
        try:
            check_size(msg.value() or b"", int(setting(self.app, "fusion_max_message_bytes")), "the reply")
        except PayloadTooLarge as err:
            self._finish(wait, exc=DependencyFailed(f"{wait.label}: {err}"))
            return
        try:
            result = decode_reply(msg.value(), msg.headers())
        except RemoteError as err:
            self._finish(wait, exc=DependencyFailed(f"{wait.label} replied with an error: {err}"))
        except ProtocolError as err:
            self._finish(wait, exc=DependencyFailed(f"{wait.label} sent an unreadable reply: {err}"))
        else:
            self._finish(wait, result=result)

    def _expire(self) -> None:
        now = now_ms()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, wait_id = heapq.heappop(self._deadlines)
            wait = self.waits.get(wait_id)
            if wait is None or wait_id in self._retry:
                continue
            waited = (wait.deadline - wait.created) / 1000
            self._finish(wait, exc=DependencyTimeout(
                f"{wait.label} did not reply within {waited:g}s (return topic {wait.return_topic})"))

    def _retry_due(self) -> None:
        now = time.monotonic()
        for wait_id, (due, _attempt, result, exc) in list(self._retry.items()):
            wait = self.waits.get(wait_id)
            if wait is not None and due <= now:
                self._finish(wait, result, exc)

    def _delete_topics(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._to_delete and (force or now - self._last_delete > 0.5):
            names, self._to_delete = self._to_delete, []
            self._last_delete = now
            try:
                clients(self.app).delete_topics(names, wait=force)
            except Exception as exc:
                logger.warning("waiter: cannot delete %d return topics now (%s); the reaper will", len(names),
                               exc)

    # -- the reply consumers ---------------------------------------------------------------------
    def _consumer(self, which: str) -> Any:
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
        })

    def _recycle(self) -> None:
        """Replace a reply consumer that was given ``fusion_kafka_client_recycle_topics`` return topics
        more than it holds now (see :meth:`fusion_celery.kafka.Clients._touch` for why).

        Runs between two polls, when every record the old consumer returned has been handled: the
        new one is assigned the waits the old one held, from offset 0, so no reply is missed.
        """
        limit = int(setting(self.app, "fusion_kafka_client_recycle_topics"))
        if limit <= 0:
            return
        for which, holding in (("replies", self._fresh), ("settled", self._settled)):
            if self._touched[which] - len(holding) < limit:
                continue
            parts = [TopicPartition(self.waits[w].return_topic, 0, 0) for w in holding if w in self.waits]
            new, old = self._consumer(which), getattr(self, which)
            if parts:
                new.incremental_assign(parts)
            setattr(self, which, new)
            self._unassign_due[which] = []
            touched, self._touched[which] = self._touched[which], len(parts)
            try:
                old.close()
            except Exception as exc:
                logger.warning("waiter: closing a replaced %s consumer: %s", which, exc)
            logger.info("waiter: replaced its %s consumer after %d return topics (%d waits carried over)", which,
                        touched, len(parts))

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        self.registry = registry(self.app)
        self.replies, self.settled = self._consumer("replies"), self._consumer("settled")
        watcher = self.registry.watch(self.worker_name)
        self.ready.set()
        try:
            while not self.stop_event.is_set():
                for change in watcher.poll(0 if self.waits else 0.1):
                    self._apply(change)
                self._flush_unassign()  # before a wait dropped and added again is assigned again
                self._assign_new()
                if self.waits:
                    msgs = consume_ready(self.replies, 500, 0.01) if self._fresh else []
                    if self._settled:
                        msgs += self.settled.consume(500, timeout=0 if self._fresh else 0.01)
                    for msg in msgs:
                        err = msg.error()
                        if err is None:
                            self._on_reply(msg)
                        elif err.code() not in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART):
                            logger.debug("waiter: %s", err.str())
                self._settle()
                self._expire()
                self._retry_due()
                self._flush_unassign()
                self._recycle()
                self._delete_topics()
                clients(self.app).producer.poll(0)
        except Exception:
            logger.exception("waiter: crashed; its waits go to the other workers")
            raise
        finally:
            for step, close in (("delete return topics", lambda: self._delete_topics(force=True)),
                                ("leave the waiters", watcher.close),
                                ("close the reply consumers", self._close_replies),
                                ("close the event dispatcher", self.events.close)):
                try:
                    close()
                except Exception as exc:
                    logger.warning("waiter: cannot %s: %s", step, exc)
            logger.info("waiter: stopped (%d completed, %d failed, %d records rejected, %d left to the others)",
                        self.completed, self.failed, self.rejected, len(self.waits))

    def _close_replies(self) -> None:
        for consumer in (self.replies, self.settled):
            consumer.unassign()
            consumer.close()

    def stop(self, timeout: float = 30.0) -> None:
        self.stop_event.set()
        self.join(timeout)
        if self.is_alive():
            logger.warning("waiter: still shutting down after %.0fs; leaving it (its waits go to the others)",
                           timeout)

    def status(self) -> dict[str, Any]:
        """What this waiter holds: pending waits, the oldest, counts by topic."""
        waits = list(self.waits.values())
        oldest = min(waits, key=lambda w: w.created, default=None)
        return {
            "pending": len(waits),
            "oldest_age_s": round((now_ms() - oldest.created) / 1000, 3) if oldest else None,
            "oldest": {"id": oldest.id, "topic": oldest.topic, "dep": oldest.dep} if oldest else None,
            "by_topic": dict(Counter(w.topic for w in waits)),
            "completed": self.completed,
            "failed": self.failed,
            "rejected": self.rejected,
            "retrying": len(self._retry),
        }
