"""Return topics: their names, taking one for a wait, and a per-process pool of topics created ahead of time.

Every wait needs a fresh, single-use return topic, named
``<prefix><created ms>.<deadline ms>.<random>``: the time it was made, the time
its caller stops waiting (both epoch milliseconds), and 128 random bits in hex.
The reaper reads both times from the name (see :func:`name_times`), so a topic
whose caller registers no wait (``celery fusion call``, a caller in another
language) is kept until its deadline has passed, plus ``fusion_reaper_grace``.

Creating a topic is a round trip through the Kafka controller (tens of
milliseconds, and a broker serves only a few dozen separate CreateTopics
requests a second), while one request creating many topics costs about the same
as one creating a single topic.  With ``fusion_return_topic_pool`` > 0, each
process keeps that many topics ready and refills them in the background with one
request per batch, so that a dispatch takes a topic without waiting for the
controller.

A pooled topic is made before anyone knows the deadline of the wait it will
serve, so its name carries its creation time as its deadline too: unless a wait
names it, the reaper deletes it once it is ``fusion_reaper_grace`` old.  The pool
therefore hands its topics only to callers that name them in a registered wait
(the registry then protects them; see :func:`take`), never hands out a topic
older than half that grace (it deletes it instead), and deletes what it holds
when its process closes its clients.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
from collections import deque
from typing import TYPE_CHECKING

from .clients import Clients, clients
from .clock import now_ms
from .config import settings

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["new_return_topic", "name_times", "reapable_from", "topic_config", "take", "pool", "ReturnTopicPool"]

logger = logging.getLogger(__name__)

#: Random bytes in a return topic's name (hex-encoded: twice as many characters).  128 bits keep two
#: names made in the same millisecond apart, and a name infeasible to guess.
RANDOM_BYTES = 16

_MS = re.compile(r"[0-9]+")  # ASCII digits only: str.isdigit() also accepts digits int() cannot read


def new_return_topic(app: Celery, created_ms: int | None = None, deadline_ms: int | None = None) -> str:
    """A fresh return topic name: ``<prefix><created ms>.<deadline ms>.<32 hex digits>``.

    ``deadline_ms`` (epoch ms) is when the caller stops waiting; the reaper leaves
    the topic alone until then plus ``fusion_reaper_grace`` even when no registered
    wait names it.  Without one (a pooled topic) the name carries the creation
    time as its deadline, and so does a deadline that lies before the creation.

    Parameters:
        app: the app (``fusion_return_topic_prefix``).
        created_ms: the creation time, epoch ms; None: now.
        deadline_ms: when the caller stops waiting, epoch ms.

    Returns:
        The name (the topic is not created).
    """
    created = now_ms() if created_ms is None else int(created_ms)
    deadline = created if deadline_ms is None else max(int(deadline_ms), created)
    return f"{settings(app).return_topic_prefix}{created}.{deadline}.{secrets.token_hex(RANDOM_BYTES)}"


def name_times(name: str, prefix: str) -> tuple[int | None, int | None]:
    """The creation time and the deadline (epoch ms) a return topic's name carries; ``None`` for each it lacks.

    The name after ``prefix`` is split at its dots:

    - ``<created>.<deadline>.<random>`` (what fusion-celery makes): both; a third
      field after two numbers is required, so a foreign ``<created>.<digits>``
      name is not misread as carrying a deadline;
    - ``<created>.<unique>`` (older fusion-celery versions, other callers): the
      creation time only;
    - anything whose first field is not a number (or a name without ``prefix``):
      neither.

    Misreading a foreign name can only keep its topic longer: the reaper waits for
    the later of the two times (see :func:`reapable_from`).

    Parameters:
        name: a topic name.
        prefix: the return-topic prefix (``fusion_return_topic_prefix``).

    Returns:
        ``(created, deadline)``, epoch ms, each None when the name does not carry it.
    """
    if not name.startswith(prefix):
        return None, None
    fields = name[len(prefix):].split(".")
    if not _MS.fullmatch(fields[0]):
        return None, None
    deadline = int(fields[1]) if len(fields) >= 3 and _MS.fullmatch(fields[1]) else None
    return int(fields[0]), deadline


def reapable_from(created_ms: int | None, deadline_ms: int | None, grace_ms: int) -> int | None:
    """When (epoch ms) the reaper may delete a return topic that no pending wait names; ``None``: never.

    That is ``grace_ms`` after the creation or after the deadline, whichever is
    later.  A topic whose name carries no creation time is not named as the
    protocol asks, so nothing tells how long its caller waits: it is never
    deleted automatically.

    Parameters:
        created_ms: the creation time its name carries (see :func:`name_times`).
        deadline_ms: the deadline its name carries.
        grace_ms: ``fusion_reaper_grace`` in milliseconds.

    Returns:
        The time, epoch ms, or None.
    """
    if created_ms is None:
        return None
    return max(created_ms, created_ms if deadline_ms is None else deadline_ms) + grace_ms


def topic_config(app: Celery) -> dict[str, str]:
    """The settings every return topic is created with (``retention.ms``: a safety net should it outlive the reaper)."""
    return {"retention.ms": str(settings(app).return_topic_retention_ms)}


def pool(app: Celery) -> ReturnTopicPool | None:
    """This process's pool of ready return topics for ``app``.

    Parameters:
        app: the app; ``fusion_return_topic_pool`` is the pool's size.

    Returns:
        The pool, made (empty) on first use and closed with this process's clients
        (:func:`fusion_celery.clients.close_clients`); None when the size is 0.
    """
    size = settings(app).return_topic_pool
    if size <= 0:
        return None
    c = clients(app)
    return c.attachment("return-topic-pool", lambda: ReturnTopicPool(app, c, size))


def take(app: Celery, deadline_ms: int | None = None, *, registered: bool = False) -> str:
    """A new return topic, existing in Kafka, for one wait that ends at ``deadline_ms``.

    A topic made here carries ``deadline_ms`` in its name, so the reaper leaves it
    alone until that deadline plus ``fusion_reaper_grace`` even though no registered
    wait names it.  A pooled topic was named before its wait existed and carries no
    deadline: only a caller that names its topic in a registered wait at once
    (``registered``) gets one, when the pool has one ready.

    Parameters:
        app: the app.
        deadline_ms: when (epoch ms) the caller stops waiting; None: now (see
            :func:`new_return_topic`).
        registered: whether the caller registers a wait naming the topic before it
            sends its request.

    Returns:
        The topic's name.

    Raises:
        FusionError: the topic cannot be created.
    """
    found = pool(app) if registered else None
    name = found.take() if found is not None else None
    if name is None:
        name = new_return_topic(app, deadline_ms=deadline_ms)
        clients(app).create_topics([name], partitions=1, config=topic_config(app), visible=True)
    return name


class ReturnTopicPool:
    """Up to ``size`` return topics of one process, created ahead of time by a background thread.

    :meth:`take` never blocks on Kafka: it returns a ready topic, or ``None`` when the
    pool is empty (the caller then creates one itself), and asks for a refill when
    the pool is half empty.  A taken topic is protected from the reaper only for
    the rest of its grace: its taker must name it in a registered wait.  Use
    :func:`pool` for this process's pool.

    Parameters:
        app: the app (its return-topic settings name and configure the topics).
        clients: the clients that create and delete the topics.
        size: how many topics to keep ready.
    """

    def __init__(self, app: Celery, clients: Clients, size: int) -> None:
        self.app, self.clients, self.size = app, clients, size
        self.max_age_ms = int(settings(app).reaper_grace * 1000 / 2)
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
        """How many topics are ready now."""
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
            # No deadline yet: the name carries the creation time twice (see the module's docstring).
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
