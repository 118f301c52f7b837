"""Deferred completion: finishing a parked Celery task from outside the worker that ran it.

A dispatching subtask saves its request context in its wait and raises
``Ignore``: the worker then stores nothing, sends no event and runs no callback.
When the reply arrives the waiter does what Celery's tracer would have done:

1. stores the outcome and counts the chord part with the saved context (what
   ``backend.mark_as_done`` / ``mark_as_failure`` do; Redis counts a part once even
   if it is completed twice, and fires the body once);
2. sends the ``link`` callbacks and the rest of the ``chain`` (the receivers are
   idempotent, see :mod:`fusion_celery.claims`);
3. sends the ``task-succeeded`` / ``task-failed`` event the worker did not, with
   the true runtime, so Flower shows the final state.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from celery import Celery, group, states
from celery.app.task import Context
from celery.canvas import maybe_signature

from . import answer, faults, progress, taskstate
from .errors import DependencyTimeout
from .registry import Wait
from .signals import wait_completed, wait_failed, wait_timed_out

__all__ = ["save_request", "complete", "resume", "resume_stored", "Events"]

logger = logging.getLogger(__name__)

_SAVED = ("id", "task", "group", "group_index", "chord", "callbacks", "errbacks", "chain", "root_id",
          "parent_id", "hostname", "ignore_result", "reply_to", "correlation_id", "shadow")


def save_request(request: Context) -> dict[str, Any]:
    """The parts of a task's request context that completing it later needs (all JSON)."""
    saved = {k: getattr(request, k, None) for k in _SAVED}
    saved["delivery_info"] = {"priority": (request.delivery_info or {}).get("priority")}
    return saved


class Events:
    """Sends the task events a parked task's worker did not send (for Flower)."""

    def __init__(self, app: Celery, hostname: str | None = None) -> None:
        self.app = app
        self.enabled = bool(app.conf.worker_send_task_events)
        self.hostname = hostname or f"fusion-waiter@{socket.gethostname()}"
        self._conn = None
        self._dispatcher = None

    def _get(self):
        if self._dispatcher is None:
            self._conn = self.app.connection_for_write()
            self._dispatcher = self.app.events.Dispatcher(self._conn, hostname=self.hostname, enabled=True)
        return self._dispatcher

    def send(self, type_: str, **fields: Any) -> None:
        if not self.enabled:
            return
        try:
            self._get().send(type_, **fields)
        except Exception as exc:  # events are best effort; never lose a completion over one
            logger.warning("waiter: cannot send event %s: %s", type_, exc)
            self.close()

    def close(self) -> None:
        if self._dispatcher is not None:
            try:
                self._dispatcher.close()
            finally:
                if self._conn is not None:
                    self._conn.release()
        self._dispatcher = self._conn = None


def _send_callbacks_and_chain(app: Celery, value: Any, ctx: Context) -> None:
    if faults.lose("complete.lose-next-step"):
        return
    parent_id, root_id = ctx.id, ctx.root_id or ctx.id
    priority = (ctx.delivery_info or {}).get("priority")
    callbacks = ctx.callbacks or []
    sigs = [maybe_signature(c, app=app) for c in callbacks]
    for sig in sigs:
        if isinstance(sig, group):
            sig.apply_async((value,), parent_id=parent_id, root_id=root_id, priority=priority)
    plain = [s for s in sigs if not isinstance(s, group)]
    if len(plain) == 1:
        plain[0].apply_async((value,), parent_id=parent_id, root_id=root_id, priority=priority)
    elif plain:
        group(plain, app=app).apply_async((value,), parent_id=parent_id, root_id=root_id, priority=priority)
    chain = list(ctx.chain or [])
    if chain:
        nxt = maybe_signature(chain[-1], app=app)
        nxt.apply_async((value,), chain=chain[:-1], parent_id=parent_id, root_id=root_id, priority=priority)


def complete(app: Celery, wait: Wait, *, result: Any = None, exc: BaseException | None = None,
             events: Events | None = None, done: dict[str, bool] | None = None) -> None:
    """Complete the parked task of ``wait`` with the reply ``result`` or the failure ``exc``.

    A dependency's value is the dict of every result known so far (its ``carry``
    plus its own), which is what the next level and the processing step receive.
    A failure also answers the waiting reactor at once with an error naming the
    dependency, instead of letting it wait for its other dependencies.

    ``done`` remembers the steps that succeeded, for a caller that calls again
    after an error (Redis or Kafka away): the outcome is stored once, and the
    steps after it (chord count, callbacks and chain, the reactor's error reply)
    still run.  A wait whose outcome is already stored (a waiter died after
    storing it, and another one replays the wait) is finished the same way: a
    stored success stands, whatever this reply says, and the steps after it run
    again; their receivers are idempotent (the chord count per task id, the next
    steps by their claims).
    """
    done = {} if done is None else done
    ctx = Context(wait.request)
    ctx.args, ctx.kwargs = [], {}
    backend = app.backend
    replayed = False
    if not done.get("stored"):
        meta = backend.get_task_meta(wait.id)
        if meta["status"] in states.READY_STATES:
            logger.info("waiter: %s (task %s) was already completed (%s); replaying what follows it",
                        wait.label, wait.id, meta["status"])
            if meta["status"] != states.SUCCESS:
                if exc is not None and wait.run:
                    answer.dependency_failed(app, wait.run, exc, events=events, strict=True)  # sent once (claimed)
                return
            replayed, result, exc = True, meta["result"], None
    runtime = max(0.0, time.time() - wait.created / 1000)
    if exc is None:
        value = result if replayed else ({**(wait.carry or {}), wait.dep: result} if wait.dep else result)
        # Celery's mark_as_done in two steps, each done once: storing the outcome can be
        # retried by the backend, counting the chord part cannot (a retry of the whole
        # call must still count it, and must not store again).
        if not replayed and not done.get("stored"):
            if not ctx.ignore_result:
                backend.store_result(wait.id, value, states.SUCCESS, request=ctx)
            done["stored"] = True
            faults.point("complete.after-store")
        if wait.run and not done.get("advanced"):
            moved, caller = progress.advance(app, wait.run.id, wait.id)
            done["advanced"] = True
            if moved.total:
                taskstate.publish(app, moved, caller, events=events)
        if ctx.chord and not done.get("counted"):
            backend.on_chord_part_return(ctx, states.SUCCESS, value)
            done["counted"] = True
        _send_callbacks_and_chain(app, value, ctx)
        if not replayed:
            if events:
                events.send("task-succeeded", uuid=wait.id, result=repr(value)[:1024], runtime=runtime)
            wait_completed.send(sender=app, task_id=wait.id, topic=wait.topic, dep=wait.dep, run_id=_run_id(wait),
                                result=result, runtime=runtime)
        return
    if not done.get("stored"):
        backend.mark_as_failure(wait.id, exc, request=ctx)
        done["stored"] = True
        if events:
            events.send("task-failed", uuid=wait.id, exception=_repr(exc), traceback="", runtime=runtime)
        if isinstance(exc, DependencyTimeout):
            wait_timed_out.send(sender=app, task_id=wait.id, topic=wait.topic, dep=wait.dep, run_id=_run_id(wait),
                                exception=exc)
        else:
            wait_failed.send(sender=app, task_id=wait.id, topic=wait.topic, dep=wait.dep, run_id=_run_id(wait),
                             exception=exc, runtime=runtime)
    if wait.run:
        answer.dependency_failed(app, wait.run, exc, events=events, strict=True)


def resume(app: Celery, request: Context, value: Any) -> None:
    """Do again what follows a parked task whose outcome is stored: count its chord part, send its
    callbacks and the rest of its chain, with ``request``'s canvas.

    For a copy of a dispatching subtask whose wait was completed already: the copy may
    belong to a canvas that a stalled run compiled again, where nothing else would move
    on.  The receivers are idempotent, so resuming the original canvas again is harmless.
    """
    if request.chord:
        app.backend.on_chord_part_return(request, states.SUCCESS, value)
    _send_callbacks_and_chain(app, value, request)


def resume_stored(task: Any) -> None:
    """:func:`resume` ``task`` when its outcome is a stored success (its wait was completed)."""
    meta = task.app.backend.get_task_meta(task.request.id)
    if meta["status"] == states.SUCCESS:
        logger.info("%s %s: completed before; resuming what follows it", task.name, task.request.id)
        resume(task.app, task.request, meta["result"])


def _repr(exc: BaseException) -> str:
    return f"{type(exc).__name__}({str(exc)!r})"


def _run_id(wait: Wait) -> str | None:
    return wait.run.id if wait.run else None
