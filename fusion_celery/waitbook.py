"""The book of the waits one waiter holds: which waits, their deadlines, and their completions to retry.

A :class:`WaitBook` is the waiter's memory, kept apart from its Kafka consumers so
that every rule about a wait's lifetime can be checked without a broker:

- a wait is held by id and found by id or by its return topic; a wait registered
  again with another return topic (its task ran again and its request names the
  new topic) replaces the one held, whose topic is then the caller's to delete;
- each wait has a deadline in a heap.  A wait that arrives past its deadline (taken
  over from a dead worker, its reply maybe on its topic already) is given
  :data:`TAKEOVER_GRACE_MS` to be read before it counts as timed out.  A finished
  wait's entry stays in the heap until it is due or until the heap grows to twice
  the waits held plus :data:`PRUNE_SLACK`, when the finished entries are dropped;
- a completion that failed (the result backend or Kafka away) is retried with a
  backoff; while it is, the wait takes no other reply and does not expire, so
  that it is completed with the outcome first tried;
- the steps of a completion already done (``done``, see
  :func:`fusion_celery.completion.complete`) are kept per wait, so that a retry
  does not do them twice.

Pure Python: it calls no Kafka client and no Celery API.  Both clocks are
injectable, so that tests move time instead of sleeping.  One thread changes a
book; the read-only
:meth:`WaitBook.oldest`, :meth:`WaitBook.count_by_topic`, ``len`` and iteration
work on a snapshot and may be called from another thread.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from .clock import now_ms
from .registry import Wait

__all__ = ["WaitBook", "Added", "Retry", "TAKEOVER_GRACE_MS", "PRUNE_SLACK", "retry_delay"]

#: Milliseconds a wait that arrives past its deadline is read before it times out.
TAKEOVER_GRACE_MS = 5000
#: Finished entries the deadline heap may hold beyond twice the waits held before it is pruned.
PRUNE_SLACK = 1024
#: Longest pause, in seconds, between two tries of a completion.
RETRY_MAX_S = 30.0


def retry_delay(attempt: int) -> float:
    """Seconds to wait before the next try of a completion that failed ``attempt`` times.

    Parameters:
        attempt: failed tries so far (1 after the first failure).

    Returns:
        1, 2, 4, 8, 16 seconds, then :data:`RETRY_MAX_S`.
    """
    return min(RETRY_MAX_S, 0.5 * 2 ** min(max(attempt, 1), 6))


class Added(NamedTuple):
    """What :meth:`WaitBook.add` did."""

    #: True when the wait is new to the book, or replaces one held with another return topic.
    added: bool
    #: The wait this one replaces: the same id with another return topic, which is not read any more.
    replaced: Wait | None = None


@dataclass(frozen=True)
class Retry:
    """A completion that failed and is tried again at ``due`` (monotonic seconds) with the same outcome."""

    due: float
    attempt: int
    result: Any = None
    exc: BaseException | None = None


class WaitBook:
    """The waits one waiter holds, by id and by return topic, with their deadlines and retries.

    Parameters:
        now_ms: the wall clock, in epoch milliseconds (deadlines are epoch milliseconds).
        monotonic: a monotonic clock, in seconds (when retries are due).
        takeover_grace_ms: how long a wait that arrives past its deadline is read
            before it times out.
    """

    def __init__(self, *, now_ms: Callable[[], int] = now_ms, monotonic: Callable[[], float] = time.monotonic,
                 takeover_grace_ms: int = TAKEOVER_GRACE_MS) -> None:
        self.now_ms = now_ms
        self.monotonic = monotonic
        self.takeover_grace_ms = takeover_grace_ms
        self._waits: dict[str, Wait] = {}
        self._by_topic: dict[str, str] = {}
        # (due, wait id); an entry counts only while _due[wait id] is its due time, so that the entry of a
        # wait forgotten, or registered again with another deadline, never expires the wait held now.
        self._deadlines: list[tuple[int, str]] = []
        self._due: dict[str, int] = {}
        self._retry: dict[str, Retry] = {}
        self._done: dict[str, dict[str, bool]] = {}

    # -- the waits ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._waits)

    def __bool__(self) -> bool:
        return bool(self._waits)

    def __contains__(self, wait_id: object) -> bool:
        return wait_id in self._waits

    def __iter__(self) -> Iterator[Wait]:
        return iter(list(self._waits.values()))

    def get(self, wait_id: str) -> Wait | None:
        """The wait held under ``wait_id``, or None."""
        return self._waits.get(wait_id)

    def for_topic(self, topic: str) -> Wait | None:
        """The wait held whose return topic is ``topic``, or None."""
        wait_id = self._by_topic.get(topic)
        return self._waits.get(wait_id) if wait_id is not None else None

    def add(self, wait: Wait) -> Added:
        """Hold ``wait`` and start its deadline.

        A wait already held with the same return topic is left as it is (the
        registry may report a wait more than once, e.g. after a rebalance).  One
        held with another return topic is replaced: its retry, its steps done and
        its deadline go with it.

        Parameters:
            wait: the wait the registry reports this waiter owns.

        Returns:
            ``Added(False)`` when nothing changed; ``Added(True)`` for a new wait;
            ``Added(True, old)`` when ``old`` was replaced (its topic is to be deleted).
        """
        held = self._waits.get(wait.id)
        if held is not None and held.return_topic == wait.return_topic:
            return Added(False)
        replaced = self.forget(wait.id) if held is not None else None
        self._waits[wait.id] = wait
        self._by_topic[wait.return_topic] = wait.id
        now = self.now_ms()
        due = wait.deadline if wait.deadline > now else now + self.takeover_grace_ms
        self._due[wait.id] = due
        heapq.heappush(self._deadlines, (due, wait.id))
        return Added(True, replaced)

    def forget(self, wait_id: str) -> Wait | None:
        """Stop holding a wait: it was completed, removed from the registry, or given to another waiter.

        Parameters:
            wait_id: the wait's id.

        Returns:
            The wait that was held, or None when none was.
        """
        wait = self._waits.pop(wait_id, None)
        if wait is None:
            return None
        if self._by_topic.get(wait.return_topic) == wait_id:
            del self._by_topic[wait.return_topic]
        self._due.pop(wait_id, None)
        self._retry.pop(wait_id, None)
        self._done.pop(wait_id, None)
        if len(self._deadlines) > 2 * len(self._waits) + PRUNE_SLACK:
            self._prune()
        return wait

    def _prune(self) -> None:
        """Drop the heap entries of waits not held (or held with another deadline): the heap follows the waits held."""
        self._deadlines = [(due, i) for due, i in self._deadlines if self._due.get(i) == due]
        heapq.heapify(self._deadlines)

    @property
    def deadline_entries(self) -> int:
        """Entries in the deadline heap, finished ones included (for tests and diagnostics)."""
        return len(self._deadlines)

    # -- deadlines ------------------------------------------------------------------------------
    def expired(self) -> list[Wait]:
        """The waits whose deadline (or takeover grace) has passed, each returned once.

        A wait whose completion is being retried is not returned: it is completed
        with the outcome it has.  A returned wait stays held until it is forgotten
        (its timeout completed) or its completion fails (then it is retried).

        Returns:
            The waits to time out now, earliest deadline first.
        """
        now = self.now_ms()
        out: list[Wait] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            due, wait_id = heapq.heappop(self._deadlines)
            if self._due.get(wait_id) != due:
                continue
            del self._due[wait_id]
            if wait_id not in self._retry:
                out.append(self._waits[wait_id])
        return out

    # -- completions ----------------------------------------------------------------------------
    def done(self, wait_id: str) -> dict[str, bool]:
        """The steps of the wait's completion done so far, to pass to ``complete`` (and kept by it)."""
        return self._done.setdefault(wait_id, {})

    def failed(self, wait_id: str, result: Any = None, exc: BaseException | None = None) -> Retry:
        """Note that completing a held wait failed: it is retried, with this outcome, after a backoff.

        Parameters:
            wait_id: the wait's id.
            result: the reply's result it was being completed with.
            exc: or the failure it was being completed with.

        Returns:
            The retry: its attempt number and when it is due.

        Raises:
            KeyError: the wait is not held.
        """
        if wait_id not in self._waits:
            raise KeyError(wait_id)
        held = self._retry.get(wait_id)
        attempt = (held.attempt if held else 0) + 1
        retry = self._retry[wait_id] = Retry(self.monotonic() + retry_delay(attempt), attempt, result, exc)
        return retry

    def retrying(self, wait_id: str) -> bool:
        """Whether the wait's completion failed and is to be tried again."""
        return wait_id in self._retry

    @property
    def retries(self) -> int:
        """How many held waits have a completion to try again."""
        return len(self._retry)

    def retries_due(self) -> list[tuple[Wait, Retry]]:
        """The waits whose completion is to be tried again now, with the outcome to complete them with.

        A retry stays in the book until the wait is forgotten (its completion
        succeeded) or fails again (:meth:`failed` sets the next try).
        """
        now = self.monotonic()
        return [(self._waits[i], r) for i, r in list(self._retry.items()) if r.due <= now]

    # -- status ---------------------------------------------------------------------------------
    def oldest(self) -> Wait | None:
        """The held wait created first, or None."""
        return min(list(self._waits.values()), key=lambda w: w.created, default=None)

    def count_by_topic(self) -> dict[str, int]:
        """How many waits are held per request topic."""
        return dict(Counter(w.topic for w in list(self._waits.values())))
