"""Progress of a reactor or pipeline run: how many of its deps are done, which are waited on, and when
it last moved.

Kept next to the results in the Redis result backend:

- ``fusion-progress-<run id>``, a hash: ``total`` (deps), ``t`` (epoch ms of the run's last step), and
  ``topic`` (the reactor's) and ``caller`` (the parked task that called the run, if any), for the
  ``PROGRESS`` state (:mod:`fusion_celery.taskstate`);
- ``fusion-waiting-<run id>``, a set: the dispatching subtasks of the run parked on a reply right now;
- ``fusion-done-<run id>``, a set: those whose reply is stored (a set, so that a completion replayed
  after a crash counts once);
- ``fusion-rt-<subtask id>``: the return topic a dispatching subtask registered its wait with (the JSON
  of its :class:`~fusion_celery.channels.Opened`: topic, channel, start offset, pool; a bare topic name
  from older versions), so that an attempt of it that runs again (its worker died after registering the
  wait) sends its request with the topic the waiter holding the wait reads; gone once the reply is
  stored, or with the wait's deadline.

Written when a run compiles its deps-map, when a dep's request is sent and when its
reply is stored; what :func:`start` and :func:`advance` return is shown as the run's ``PROGRESS``
task state by their callers (:mod:`fusion_celery.taskstate`); read by the intake,
which uses it to tell a run that waits for a dependency from a run whose next step
was lost in the Celery broker (nothing waited on, and no step for a while): see
:meth:`fusion_celery.intake.ReactorIntake._resend_stalled`.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from .claims import lifetime, with_retry
from .clock import now_ms
from .taskstate import Progress

__all__ = ["start", "parked", "advance", "read", "stalled", "remembered_return_topic", "parked_task"]


def _key(task_id: str) -> str:
    return f"fusion-progress-{task_id}"


def _waiting(task_id: str) -> str:
    return f"fusion-waiting-{task_id}"


def _done(task_id: str) -> str:
    return f"fusion-done-{task_id}"


def _return_topic(wait_id: str) -> str:
    return f"fusion-rt-{wait_id}"


def _start(client: Any, run: str, total: int, ttl: int, topic: str | None, parent: str | None) -> str | None:
    with client.pipeline() as pipe:
        if parent is not None:
            pipe.exists(_return_topic(parent))
        mapping: dict[str, Any] = {"total": total, "t": now_ms()}
        if topic:
            mapping["topic"] = topic
        pipe.hset(_key(run), mapping=mapping)
        pipe.expire(_key(run), ttl)  # as long as the run's result
        found = pipe.execute()
    caller = parent if parent is not None and found[0] else None
    if caller is not None:
        client.hset(_key(run), "caller", caller)
    return caller


def start(app: Celery, task_id: str, total: int, *, topic: str | None = None,
          parent: str | None = None) -> str | None:
    """Record that the run ``task_id`` has ``total`` deps (retried while Redis restarts, as results are).

    Parameters:
        app: the app.
        task_id: the run's task id.
        total: its deps.
        topic: the reactor's topic (None for a pipeline run).
        parent: the task that sent the run's request (its Celery ``parent_id``), if known.

    Returns:
        ``parent`` when it is a task parked on a reply in this result backend (a pipeline or a
        dispatching subtask waiting for this run's answer), whose state shows the run's progress
        too; else None.
    """
    return with_retry(app, _start, task_id, total, int(lifetime(app)), topic, parent)


def parked_task(app: Celery, task_id: str) -> bool:
    """Whether task ``task_id`` registered a wait that has no stored reply yet, as far as this backend knows
    (the return topic it remembers for a new attempt, see :func:`parked`)."""
    return bool(with_retry(app, lambda c, k: c.exists(k), _return_topic(task_id)))


def _parked(client: Any, run: str | None, wait_id: str, topic: str, topic_ttl: int, ttl: int) -> None:
    with client.pipeline() as pipe:
        pipe.set(_return_topic(wait_id), topic, ex=topic_ttl)
        if run is not None:
            pipe.sadd(_waiting(run), wait_id)
            pipe.expire(_waiting(run), ttl)
            pipe.hset(_key(run), "t", now_ms())
        pipe.execute()


def parked(app: Celery, run_id: str | None, wait_id: str, return_topic: str, seconds: float) -> None:
    """Subtask ``wait_id`` (of run ``run_id``, if any) is about to send its request with ``return_topic``
    (the JSON of its :class:`~fusion_celery.channels.Opened`) and await the reply; it is kept ``seconds``
    (its wait's life) for an attempt that runs again."""
    with_retry(app, _parked, run_id, wait_id, return_topic, max(1, int(seconds)), int(lifetime(app)))


def _advance(client: Any, run: str, wait_id: str, ttl: int) -> tuple[Progress, str | None]:
    with client.pipeline() as pipe:
        pipe.sadd(_done(run), wait_id)
        pipe.expire(_done(run), ttl)
        pipe.srem(_waiting(run), wait_id)
        pipe.hset(_key(run), "t", now_ms())
        pipe.delete(_return_topic(wait_id))
        pipe.scard(_done(run))
        pipe.hgetall(_key(run))
        found = pipe.execute()
    done, raw = int(found[-2]), found[-1]
    topic, caller = raw.get(b"topic"), raw.get(b"caller")
    return (Progress(run, done, int(raw.get(b"total", 0)), topic.decode() if topic else None),
            caller.decode() if caller else None)


def advance(app: Celery, task_id: str, wait_id: str) -> tuple[Progress, str | None]:
    """The reply of subtask ``wait_id`` of run ``task_id`` is stored: one more dep done (once per subtask).

    Returns:
        The run's progress now, and the parked task that called the run (see :func:`start`), if any.
    """
    return with_retry(app, _advance, task_id, wait_id, int(lifetime(app)))


def remembered_return_topic(app: Celery, wait_id: str) -> str | None:
    """The return topic an earlier attempt of subtask ``wait_id`` registered its wait with, if any (as
    :func:`parked` kept it)."""
    found = with_retry(app, lambda c, k: c.get(k), _return_topic(wait_id))
    return found.decode() if isinstance(found, bytes) else found


def read(app: Celery, task_id: str) -> tuple[int, int] | None:
    """``(done, total)`` or None when the run has no deps (or has not compiled them yet)."""
    client = app.backend.client
    raw = client.hgetall(_key(task_id))
    if not raw:
        return None
    return int(client.scard(_done(task_id))), int(raw.get(b"total", 0))


def _stalled(client: Any, runs: list[str], before: int) -> set[str]:
    with client.pipeline(transaction=False) as pipe:
        for run in runs:
            pipe.hget(_key(run), "t")
            pipe.scard(_waiting(run))
        found = pipe.execute()
    out = set()
    for i, run in enumerate(runs):
        moved, waiting = found[2 * i], found[2 * i + 1]
        if moved is not None and not waiting and int(moved) < before:
            out.add(run)
    return out


def stalled(app: Celery, run_ids: list[str], quiet_s: float) -> set[str]:
    """Which of the runs with deps wait on no reply and have not moved for ``quiet_s`` seconds."""
    if not run_ids:
        return set()
    return with_retry(app, _stalled, run_ids, now_ms() - int(quiet_s * 1000))
