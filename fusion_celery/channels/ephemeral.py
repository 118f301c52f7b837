"""The ``ephemeral`` reply channel: a return topic created for one request and deleted after it.

fusion-clj's literal design.  Each request costs a CreateTopics and a DeleteTopics
on the Kafka controller (``fusion_return_topic_pool`` creates them ahead of time,
in batches; see :mod:`fusion_celery.returntopics`).  Deletions are sent in one
request per :data:`DELETE_EVERY_SECONDS` at most.
"""

from __future__ import annotations

import logging
import threading
import time

from ..clients import clients
from ..returntopics import take
from . import Opened, ReplyChannel

__all__ = ["EphemeralChannel", "DELETE_EVERY_SECONDS"]

logger = logging.getLogger(__name__)

#: Seconds between two batches of return topic deletions.
DELETE_EVERY_SECONDS = 0.5


class EphemeralChannel(ReplyChannel):
    """A topic per wait (:func:`fusion_celery.returntopics.take`), deleted when the wait ends."""

    name = "ephemeral"

    def __init__(self, app) -> None:
        super().__init__(app)
        self._to_delete: list[str] = []
        self._last = float("-inf")
        self._lock = threading.Lock()

    def open(self, wait_id: str, deadline_ms: int, owner: str = "") -> Opened:
        return Opened(take(self.app, deadline_ms, registered=True), self.name)

    def end(self, wait_id: str, opened: Opened, next_offset: int | None) -> None:
        with self._lock:
            self._to_delete.append(opened.return_topic)

    def tick(self, force: bool = False) -> None:
        """Delete the ended topics: in one request per :data:`DELETE_EVERY_SECONDS` at most (``force``: now)."""
        now = time.monotonic()
        with self._lock:
            if not self._to_delete or not (force or now - self._last > DELETE_EVERY_SECONDS):
                return
            names, self._to_delete, self._last = self._to_delete, [], now
        try:
            clients(self.app).delete_topics(names, wait=force)
        except Exception as exc:
            logger.warning("cannot delete %d return topics now (%s); the reaper will", len(names), exc)

    def close(self) -> None:
        self.tick(force=True)
