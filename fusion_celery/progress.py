"""Progress of a reactor or pipeline run: how many of its deps are done.

Kept in a small Redis hash next to the results (``fusion-progress-<task id>``,
fields ``total`` and ``done``), written when a run compiles its deps-map and
each time the waiter completes one of them; read by ``celery fusion call``.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from .claims import lifetime, with_retry

__all__ = ["start", "advance", "read"]


def _key(task_id: str) -> str:
    return f"fusion-progress-{task_id}"


def _start(client: Any, key: str, total: int, ttl: int) -> None:
    with client.pipeline() as pipe:
        pipe.hset(key, mapping={"total": total, "done": 0})
        pipe.expire(key, ttl)  # as long as the run's result
        pipe.execute()


def start(app: Celery, task_id: str, total: int) -> None:
    """Record that the run ``task_id`` has ``total`` deps (retried while Redis restarts, as results are)."""
    with_retry(app, _start, _key(task_id), total, int(lifetime(app)))


def advance(app: Celery, task_id: str) -> None:
    with_retry(app, lambda c, k: c.hincrby(k, "done", 1), _key(task_id))


def read(app: Celery, task_id: str) -> tuple[int, int] | None:
    """``(done, total)`` or None when the run has no deps (or has not compiled them yet)."""
    raw = app.backend.client.hgetall(_key(task_id))
    if not raw:
        return None
    return int(raw.get(b"done", 0)), int(raw.get(b"total", 0))
