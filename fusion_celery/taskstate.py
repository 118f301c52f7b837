"""A run's progress where Celery users look for it: the ``PROGRESS`` state of its task, and an event for Flower.

:mod:`fusion_celery.progress` counts a run's deps in Redis hashes of its own; this module shows the
count as the run's Celery task state, the way Celery's docs recommend for progress (a custom state
``PROGRESS`` whose meta is ``{"done": d, "total": t, ...}``), so that ``AsyncResult(run_id).state``
is ``"PROGRESS"`` and ``.info`` is that dict while the run waits for its deps.  It is written when
the run compiles its deps-map (0 done) and each time the waiter stores one of their replies.

A run called by a parked fusion task (a :class:`~fusion_celery.pipeline.TopicPipeline` call, or a
dependency whose service is a reactor with deps of its own) shows the same progress under that
task's id too: ``Pipeline("math").delay(...)`` returns the pipeline task's result, and its caller
sees the reactor run's deps move.  The run knows its caller from the request's lineage header
(:data:`~fusion_celery.protocol.PARENT_HEADER`, the Celery ``parent_id``) and mirrors to it only
while that task is parked in this result backend (its return topic is remembered there).

A progress state is stored only over a state that is not final and not further along: it never
replaces a SUCCESS or FAILURE that a racing completion stored, and never moves backwards when two
replies are stored at once.  The check and the write are atomic: one Lua script (one round trip)
when the results are JSON, as in the fusion app; a ``WATCH``/``MULTI`` transaction for another
result serializer, whose meta only Python can read.  The finish step's result is stored by Celery
as usual and replaces it.

Each state is also sent as a ``task-progress`` event (when ``worker_send_task_events`` is on):
Flower's event state takes an event type it does not know as a custom state, so its task list
shows ``PROGRESS``, with the progress meta as the task's result (the event's ``result``, a repr as
in ``task-succeeded``), and the final event of the run's last step moves it on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from celery import Celery, states

from .claims import with_retry
from .compat import result_meta

__all__ = ["PROGRESS", "Progress", "store", "publish"]

logger = logging.getLogger(__name__)

#: The custom Celery state of a run whose deps are pending.
PROGRESS = "PROGRESS"


@dataclass(frozen=True)
class Progress:
    """How far a run is: ``done`` of its ``total`` deps have their reply stored.

    Parameters:
        run: the run's task id (the reactor or deps-map pipeline task).
        done: deps whose reply is stored.
        total: deps in the run's deps-map.
        topic: the reactor's topic (None for a pipeline run).
    """

    run: str
    done: int
    total: int
    topic: str | None = None

    def meta(self) -> dict[str, Any]:
        """The task meta stored with the ``PROGRESS`` state (``AsyncResult.info``)."""
        return {"done": min(self.done, self.total), "total": self.total, "run": self.run, "topic": self.topic}


def _further(current: Any, done: int) -> bool:
    """Whether the stored meta ``current`` says at least as much as ``done``."""
    if current.get("status") in states.READY_STATES:
        return True
    shown = current.get("result")
    return current.get("status") == PROGRESS and isinstance(shown, dict) and int(shown.get("done", 0)) > done


#: The check and the write in one step, for JSON results: KEYS[1] the meta's key; ARGV the payload, the
#: deps done and the expiry in seconds (0: none).  A meta that is not JSON is left alone.
_STORE = """
local raw = redis.call('GET', KEYS[1])
if raw then
  local ok, meta = pcall(cjson.decode, raw)
  if not ok or type(meta) ~= 'table' then return 0 end
  local status = meta['status']
  if {ready} then return 0 end
  local shown = meta['result']
  if status == '{progress}' and type(shown) == 'table' and (tonumber(shown['done']) or 0) > tonumber(ARGV[2]) then
    return 0
  end
end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
""".format(ready=" or ".join(f"status == '{s}'" for s in sorted(states.READY_STATES)), progress=PROGRESS)


def _store_json(client: Any, key: str, payload: Any, expires: int | None, done: int) -> bool:
    return bool(client.eval(_STORE, 1, key, payload, done, expires or 0))


def _store(client: Any, key: str, payload: Any, expires: int | None, done: int, decode: Any) -> bool:
    from redis.exceptions import WatchError
    with client.pipeline() as pipe:
        while True:
            try:
                pipe.watch(key)
                raw = pipe.get(key)
                if raw is not None and _further(decode(raw), done):
                    pipe.unwatch()
                    return False
                pipe.multi()
                if expires:
                    pipe.setex(key, expires, payload)
                else:
                    pipe.set(key, payload)
                pipe.publish(key, payload)  # as Celery's Redis backend does: AsyncResult.get(on_message=...) sees it
                pipe.execute()
                return True
            except WatchError:  # the state changed meanwhile: look again
                continue


def store(app: Celery, task_id: str, progress: Progress) -> bool:
    """Store ``progress`` as the ``PROGRESS`` state of task ``task_id``, unless its stored state is final or
    further along.

    Parameters:
        app: the app (its result backend must be Redis, as fusion-celery's is).
        task_id: the task whose state to set (the run's, or its parked caller's).
        progress: what to show.

    Returns:
        True when stored, False when the task's state was final or further along.
    """
    backend = app.backend
    meta = result_meta(backend, task_id, progress.meta(), PROGRESS)
    expires = int(backend.expires) if backend.expires else None
    key, payload = backend.get_key_for_task(task_id), backend.encode(meta)
    if backend.serializer == "json":
        return with_retry(app, _store_json, key, payload, expires, progress.done)
    return bool(with_retry(app, _store, key, payload, expires, progress.done, backend.decode_result))


def _send(app: Celery, events: Any, task_id: str, progress: Progress, hostname: str | None) -> None:
    meta = progress.meta()
    fields = {"uuid": task_id, "result": repr(meta), **meta}
    if events is not None:
        events.send("task-progress", **fields)
        return
    if not app.conf.worker_send_task_events:
        return
    try:
        with app.events.default_dispatcher(hostname=hostname) as dispatcher:
            dispatcher.send("task-progress", **fields)
    except Exception as err:  # events are best effort
        logger.warning("cannot send task-progress for %s: %s", task_id, err)


def publish(app: Celery, progress: Progress, caller: str | None = None, events: Any = None,
            hostname: str | None = None) -> None:
    """Show ``progress`` as the state of its run and of the run's parked ``caller`` (if any), and send the
    ``task-progress`` events.

    A failure is logged, never raised: progress is for people watching, and must not fail the
    completion or the run that reports it.

    Parameters:
        app: the app.
        progress: the run's progress.
        caller: the task id of the parked task the run answers (see the module docstring), or None.
        events: a :class:`~fusion_celery.completion.Events` to send the events with (else the app's
            default dispatcher, when task events are on).
        hostname: the worker the events come from, without ``events`` (the node name of the worker
            running the step: Flower shows a task on the worker of its latest event).
    """
    for task_id in (progress.run, caller):
        if task_id is None:
            continue
        try:
            if store(app, task_id, progress):
                _send(app, events, task_id, progress, hostname)
        except Exception as err:
            logger.warning("cannot store the progress of %s (%d/%d) under %s: %s", progress.run, progress.done,
                           progress.total, task_id, err)
