"""The ``ephemeral`` reply channel: a return topic created for one request and deleted after it.

fusion-clj's literal design.  Each request costs a CreateTopics and a DeleteTopics
on the Kafka controller (``fusion_return_topic_pool`` creates them ahead of time,
in batches; see :mod:`fusion_celery.returntopics`).  Deletions are sent in one
request per :data:`DELETE_EVERY_SECONDS` at most, and one that the controller
refused (a broker restarting, a controller moving) is sent again, up to
:data:`DELETE_TRIES` times; the reaper deletes what is left after that.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ..clients import clients, deletion_failed
from ..returntopics import take
from . import Opened, ReplyChannel

__all__ = ["EphemeralChannel", "DELETE_EVERY_SECONDS", "DELETE_TRIES"]

logger = logging.getLogger(__name__)

#: Seconds between two batches of return topic deletions.
DELETE_EVERY_SECONDS = 0.5
#: Times a return topic's deletion is sent before it is left to the reaper.
DELETE_TRIES = 10


class EphemeralChannel(ReplyChannel):
    """A topic per wait (:func:`fusion_celery.returntopics.take`), deleted when the wait ends."""

    name = "ephemeral"

    def __init__(self, app) -> None:
        super().__init__(app)
        self._to_delete: list[str] = []
        self._sent: dict[str, Any] = {}  # topic -> its deletion's future, until it is done
        self._tries: dict[str, int] = {}
        self._last = float("-inf")
        self._lock = threading.Lock()

    def open(self, wait_id: str, deadline_ms: int, owner: str = "") -> Opened:
        return Opened(take(self.app, deadline_ms, registered=True), self.name)

    def end(self, wait_id: str, opened: Opened, next_offset: int | None) -> None:
        with self._lock:
            self._to_delete.append(opened.return_topic)

    def tick(self, force: bool = False) -> None:
        """Delete the ended topics: in one request per :data:`DELETE_EVERY_SECONDS` at most (``force``: now)."""
        self._retry_failed()
        now = time.monotonic()
        with self._lock:
            if not self._to_delete or not (force or now - self._last > DELETE_EVERY_SECONDS):
                return
            names, self._to_delete, self._last = self._to_delete, [], now
        try:
            futures = clients(self.app).delete_topics(names, wait=force)
        except Exception as exc:
            logger.warning("cannot delete %d return topics now (%s); the reaper will", len(names), exc)
            return
        with self._lock:
            self._sent.update(futures)

    def _retry_failed(self) -> None:
        """Queue again the topics whose deletion the controller refused."""
        with self._lock:
            done = {name: fut for name, fut in self._sent.items() if fut.done()}
            for name in done:
                del self._sent[name]
        for name, fut in done.items():
            why = deletion_failed(fut)
            with self._lock:
                if why is None:
                    self._tries.pop(name, None)
                    continue
                tries = self._tries[name] = self._tries.get(name, 0) + 1
                if tries < DELETE_TRIES:
                    self._to_delete.append(name)
                    continue
                del self._tries[name]
            logger.warning("cannot delete return topic %s after %d tries (%s); the reaper will", name, tries, why)

    def close(self) -> None:
        self.tick(force=True)
