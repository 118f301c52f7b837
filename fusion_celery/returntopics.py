"""Return topics: their names, and a per-process pool of topics created ahead of time, in batches.

Every wait needs a fresh, single-use return topic.  Creating one is a round trip
through the Kafka controller (tens of milliseconds, and a broker serves only a few
dozen separate CreateTopics requests a second), while one request creating many
topics costs about the same as one creating a single topic.  With
``fusion_return_topic_pool`` > 0, each process keeps that many topics ready and
refills them in the background with one request per batch, so that a dispatch
takes a topic without waiting for the controller.

A pooled topic is named, as any return topic, with the time it was created, and
no wait names it until it is taken: the reaper counts it as an orphan after
``fusion_reaper_grace``.  The pool therefore never hands out a topic older than
half that grace (it deletes it instead), and deletes what it holds when its
process closes its clients.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import deque
from typing import TYPE_CHECKING

from .config import setting
from .registry import now_ms

if TYPE_CHECKING:
    from celery import Celery

    from .kafka import Clients

__all__ = ["new_return_topic", "ReturnTopicPool"]

logger = logging.getLogger(__name__)


def new_return_topic(app: Celery, created_ms: int | None = None) -> str:
    """A fresh return topic name: prefix, creation time in ms (the reaper reads it), random part."""
    stamp = now_ms() if created_ms is None else created_ms
    return f"{setting(app, 'fusion_return_topic_prefix')}{stamp}.{uuid.uuid4().hex}"


def topic_config(app: Celery) -> dict[str, str]:
    """The configuration every return topic is created with."""
    return {"retention.ms": str(setting(app, "fusion_return_topic_retention_ms"))}


class ReturnTopicPool:
    """Up to ``size`` return topics of one process, created ahead of time by a background thread.

    :meth:`take` never blocks on Kafka: it returns a ready topic, or ``None`` when the
    pool is empty (the caller then creates one itself), and asks for a refill when
    the pool is half empty.
    """

    def __init__(self, app: Celery, clients: Clients, size: int) -> None:
        self.app, self.clients, self.size = app, clients, size
        self.max_age_ms = int(float(setting(app, "fusion_reaper_grace")) * 1000 / 2)
        self._ready: deque[tuple[str, int]] = deque()
        self._lock = threading.Lock()
        self._wanted = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.counts = {"taken": 0, "missed": 0, "created": 0, "expired": 0}

    def take(self) -> str | None:
        """A ready return topic (now the caller's), or ``None`` when none is ready."""
        if self._closed.is_set():
            return None
        oldest = now_ms() - self.max_age_ms
        stale: list[str] = []
        name = None
        with self._lock:
            while self._ready:
                candidate, created = self._ready.popleft()
                if created > oldest:
                    name = candidate
                    break
                stale.append(candidate)
            low = len(self._ready) <= self.size // 2
        if stale:
            self.counts["expired"] += len(stale)
            self.clients.delete_topics(stale, wait=False)
        self.counts["taken" if name else "missed"] += 1
        if low:
            self._refill()
        return name

    def ready(self) -> int:
        with self._lock:
            return len(self._ready)

    def _refill(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None and not self._closed.is_set():
                    self._thread = threading.Thread(target=self._run, name="fusion-return-topics", daemon=True)
                    self._thread.start()
        self._wanted.set()

    def _run(self) -> None:
        while not self._closed.is_set():
            self._wanted.wait()
            self._wanted.clear()
            if self._closed.is_set():
                return
            need = self.size - self.ready()
            if need <= 0:
                continue
            created = now_ms()
            names = [new_return_topic(self.app, created) for _ in range(need)]
            try:
                self.clients.create_topics(names, partitions=1, config=topic_config(self.app), visible=True)
            except Exception as exc:  # Kafka away: callers create their own topics meanwhile
                logger.warning("return-topic pool: cannot create %d topic(s): %s", len(names), exc)
                self.clients.delete_topics(names, wait=False)
                self._closed.wait(1.0)
                continue
            with self._lock:
                if self._closed.is_set():
                    leftover = names
                else:
                    self._ready.extend((n, created) for n in names)
                    leftover = []
            self.counts["created"] += len(names)
            if leftover:
                self.clients.delete_topics(leftover, wait=False)

    def close(self, timeout: float = 10.0) -> None:
        """Stop refilling and delete the topics nobody took."""
        self._closed.set()
        self._wanted.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            unused = [n for n, _ in self._ready]
            self._ready.clear()
        logger.info("return-topic pool: closed (%s; %d unused deleted)", self.counts, len(unused))
        if unused:
            try:
                self.clients.delete_topics(unused, wait=True, timeout=timeout)
            except Exception as exc:  # the reaper deletes them after its grace
                logger.warning("return-topic pool: cannot delete %d unused topic(s): %s", len(unused), exc)
