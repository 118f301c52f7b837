"""Progress of a reactor or pipeline run: how many of its deps are done.

Kept in a small Redis hash next to the results (``fusion-progress-<task id>``,
fields ``total`` and ``done``), written when a run compiles its deps-map and
each time the waiter completes one of them; read by ``celery fusion call``.
"""

from __future__ import annotations

from celery import Celery

from .claims import lifetime

__all__ = ["start", "advance", "read"]


def _key(task_id: str) -> str:
    return f"fusion-progress-{task_id}"


def start(app: Celery, task_id: str, total: int) -> None:
    client = app.backend.client
    with client.pipeline() as pipe:
        pipe.hset(_key(task_id), mapping={"total": total, "done": 0})
        pipe.expire(_key(task_id), int(lifetime(app)))  # as long as the run's result
        pipe.execute()


def advance(app: Celery, task_id: str) -> None:
    app.backend.client.hincrby(_key(task_id), "done", 1)


def read(app: Celery, task_id: str) -> tuple[int, int] | None:
    """``(done, total)`` or None when the run has no deps (or has not compiled them yet)."""
    raw = app.backend.client.hgetall(_key(task_id))
    if not raw:
        return None
    return int(raw.get(b"done", 0)), int(raw.get(b"total", 0))
