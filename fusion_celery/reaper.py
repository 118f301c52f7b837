"""The reaper: deletes return topics nobody waits on any more.

A return topic is deleted by the waiter once its reply was handled.  What can
leave one behind: a crash between removing the wait and deleting the topic, a
dispatch that failed after creating its topic, a client that gave up.  The
reaper lists the topics with the return-topic prefix, reads their creation time
and deadline from their name (:func:`~fusion_celery.returntopics.name_times`),
and deletes those that no pending wait names once ``fusion_reaper_grace`` has
passed since their creation and since their deadline, whichever is later
(:func:`is_orphan`).  So the topic of a caller that registers no wait
(``celery fusion call``, another language) lives as long as that caller waits,
plus the grace.  A topic of a worker's lease pool (``<prefix>lease.<pool>.<random>``,
see :mod:`fusion_celery.channels.leased`) is deleted once no pending wait names
it and its pool has ended (by this app's result backend); never while its worker
runs, nor when the result backend knows nothing of its pool (another app's).  A topic whose
name carries no creation time (a ``shared`` reply topic, a foreign name) is never
deleted automatically: nothing tells how long its callers wait.

It runs every ``fusion_reaper_interval`` seconds in every worker, one at a time
when the registry can coordinate (ZooKeeper: a lock, see
:meth:`~fusion_celery.registry.Registry.exclusive`; elsewhere deleting twice is
harmless), and on demand with ``celery fusion reap``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from celery import Celery

from .channels.leased import pool_of_topic, pool_states
from .clients import clients
from .clock import now_ms
from .config import settings
from .returntopics import name_times, reapable_from
from .runtime import registry

__all__ = ["ReturnTopic", "return_topics", "is_orphan", "reap", "Reaper"]

logger = logging.getLogger(__name__)


@dataclass
class ReturnTopic:
    """A live return topic: the times its name carries and, when a pending wait names it, that wait."""

    name: str
    created_ms: int | None
    wait_id: str | None
    owner: str | None
    target: str | None
    deadline_ms: int | None = None
    pool: str | None = None
    pool_state: str | None = None  # alive, ended or unknown (see fusion_celery.channels.leased.pool_states)

    @property
    def age_s(self) -> float | None:
        """Seconds since its creation; None when its name carries no creation time."""
        return None if self.created_ms is None else max(0.0, time.time() - self.created_ms / 1000)


def return_topics(app: Celery) -> list[ReturnTopic]:
    """Every live return topic of ``app``'s prefix, with the times its name carries and the wait naming it.

    Parameters:
        app: the app (``fusion_return_topic_prefix``, its Kafka and its registry).

    Returns:
        The topics, sorted by name.
    """
    prefix = settings(app).return_topic_prefix
    names = [t for t in clients(app).admin.list_topics(timeout=10).topics if t.startswith(prefix)]
    by_topic = {w.return_topic: w for w in registry(app).pending()}
    pools = {name: pool_of_topic(name, prefix) for name in names}
    states = pool_states(app, sorted({p for p in pools.values() if p}))
    out = []
    for name in sorted(names):
        created, deadline = name_times(name, prefix)
        wait = by_topic.get(name)
        pool = pools[name]
        out.append(ReturnTopic(name, created, wait.id if wait else None, wait.owner if wait else None,
                               wait.topic if wait else None, deadline, pool, states.get(pool or "")))
    return out


def is_orphan(topic: ReturnTopic, now: int, grace: float) -> bool:
    """Whether the reaper deletes ``topic`` at ``now``.

    Yes when no pending wait names it and ``grace`` has passed since both the
    creation and the deadline its name carries; for a leased topic, when no pending
    wait names it and its pool has ended; never when its name carries neither a
    creation time nor a pool.

    Parameters:
        topic: the topic.
        now: the time, epoch ms.
        grace: seconds.

    Returns:
        True when it is an orphan due for deletion.
    """
    if topic.wait_id is not None:
        return False
    if topic.pool is not None:
        return topic.pool_state == "ended"
    due = reapable_from(topic.created_ms, topic.deadline_ms, int(grace * 1000))
    return due is not None and now >= due


def reap(app: Celery, grace: float | None = None) -> list[str]:
    """Delete the orphan return topics now (see :func:`is_orphan`).

    Parameters:
        app: the app.
        grace: seconds; None: ``fusion_reaper_grace``.

    Returns:
        The names of the topics deleted.
    """
    grace = settings(app).reaper_grace if grace is None else float(grace)
    now = now_ms()
    orphans = [t.name for t in return_topics(app) if is_orphan(t, now, grace)]
    if orphans:
        clients(app).delete_topics(orphans, wait=True)
        logger.info("reaper: deleted %d orphan return topic(s)", len(orphans))
    return orphans


class Reaper(threading.Thread):
    """Runs :func:`reap` every ``fusion_reaper_interval`` seconds until stopped, one process at a time where the
    registry can coordinate (:meth:`~fusion_celery.registry.Registry.exclusive`)."""

    def __init__(self, app: Celery) -> None:
        super().__init__(name="fusion-reaper", daemon=True)
        self.app = app
        self.stop_event = threading.Event()

    def run(self) -> None:
        interval = settings(self.app).reaper_interval
        while not self.stop_event.wait(interval):
            try:
                with registry(self.app).exclusive("reaper") as mine:
                    if mine:
                        reap(self.app)
                    else:
                        logger.debug("reaper: another worker is reaping; skipped this round")
            except Exception as exc:
                logger.warning("reaper: %s", exc)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current round; wait up to ``timeout`` seconds for it."""
        self.stop_event.set()
        self.join(timeout)
