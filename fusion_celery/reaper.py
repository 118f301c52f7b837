"""The reaper: deletes return topics nobody waits on any more.

A return topic is deleted by the waiter once its reply was handled.  What can
leave one behind: a crash between removing the wait and deleting the topic, a
dispatch that failed after creating its topic, a client that gave up.  The
reaper lists the topics with the return-topic prefix, reads their creation time
from their name, and deletes those older than ``fusion_reaper_grace`` that no
pending wait names (a topic whose name carries no creation time is never
deleted automatically: it was not made by fusion-celery).  It runs every
``fusion_reaper_interval`` seconds in every
worker, one at a time when the registry can coordinate (ZooKeeper: a lock, see
:meth:`~fusion_celery.registry.Registry.exclusive`; elsewhere deleting twice is
harmless), and on demand with ``celery fusion reap``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from celery import Celery

from .config import setting
from .kafka import clients
from .runtime import registry

__all__ = ["ReturnTopic", "return_topics", "reap", "Reaper"]

logger = logging.getLogger(__name__)


@dataclass
class ReturnTopic:
    name: str
    created_ms: int | None
    wait_id: str | None
    owner: str | None
    target: str | None

    @property
    def age_s(self) -> float | None:
        return None if self.created_ms is None else max(0.0, time.time() - self.created_ms / 1000)


def return_topics(app: Celery) -> list[ReturnTopic]:
    """Every live return topic, with its age and, when a wait names it, that wait's owner and target."""
    prefix = setting(app, "fusion_return_topic_prefix")
    names = [t for t in clients(app).admin.list_topics(timeout=10).topics if t.startswith(prefix)]
    by_topic = {w.return_topic: w for w in registry(app).pending()}
    out = []
    for name in sorted(names):
        stamp = name[len(prefix):].split(".", 1)[0]
        created = int(stamp) if stamp.isdigit() else None
        wait = by_topic.get(name)
        out.append(ReturnTopic(name, created, wait.id if wait else None, wait.owner if wait else None,
                               wait.topic if wait else None))
    return out


def reap(app: Celery, grace: float | None = None) -> list[str]:
    """Delete orphan return topics now; return their names."""
    grace = float(setting(app, "fusion_reaper_grace") if grace is None else grace)
    orphans = [t.name for t in return_topics(app)
               if t.wait_id is None and t.age_s is not None and t.age_s >= grace]
    if orphans:
        clients(app).delete_topics(orphans, wait=True)
        logger.info("reaper: deleted %d orphan return topic(s)", len(orphans))
    return orphans


class Reaper(threading.Thread):
    """Runs :func:`reap` periodically until stopped."""

    def __init__(self, app: Celery) -> None:
        super().__init__(name="fusion-reaper", daemon=True)
        self.app = app
        self.stop_event = threading.Event()

    def run(self) -> None:
        interval = float(setting(self.app, "fusion_reaper_interval"))
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
        self.stop_event.set()
        self.join(timeout)
