"""The base of reactor and pipeline tasks: a run that may wait on dependencies before it finishes.

A run has two steps, each a registered Celery task:

* the **start** step (the reactor's or pipeline's own task) asks for the
  deps-map and either finishes at once (no deps) or replaces itself with the
  canvas of its deps (:func:`fusion_celery.canvas.compile_deps`);
* the **finish** step (``<name>.process`` for a reactor, ``<name>.combine``
  for a pipeline) is that canvas's last task: it runs
  with the deps' results, under the run's task id (Celery's ``replace`` gives
  the replacement's last task the replaced task's id), so the run's result is
  stored where the caller looks for it.

Either step failing, or its pool process dying, answers the run's caller
(:mod:`fusion_celery.answer`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from celery import Signature, Task

from . import answer, progress, taskstate
from .canvas import chord_lifetime, compile_deps
from .graph import DepsGraph
from .run import Run

__all__ = ["AnsweringTask", "RunTask", "FinishTask"]


class AnsweringTask(Task):
    """A step whose failure answers its run's caller."""

    def run_of(self, task_id: str, kwargs: dict[str, Any]) -> Run | None:
        """The run that the call ``kwargs`` of this task serves (None: nobody to answer)."""
        return None

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        run = self.run_of(task_id, kwargs or {})
        if run is not None:
            answer.reply(self.app, run, exc=exc, sender=self)

    def on_worker_lost(self, task_id: str, kwargs: dict[str, Any], exc: BaseException) -> None:
        """Called by :mod:`fusion_celery.answer` when the pool process running this task died."""
        self.on_failure(exc, task_id, (), kwargs, None)


class RunTask(AnsweringTask):
    """The start step of a run (see the module docstring)."""

    #: The finish step's name is the start step's plus this.
    finish_suffix: str = ".finish"
    #: The reply channel of the deps whose entry names none (None: ``fusion_reply_channel``).
    reply_channel: str | None = None

    @property
    def finish_name(self) -> str:
        """The name of this run's finish step."""
        return f"{self.name}{self.finish_suffix}"

    def finish_signature(self, kwargs: dict[str, Any], shadow: str) -> Signature:
        """The finish step as the last task of the canvas, called with ``kwargs``."""
        return self.app.signature(self.finish_name, kwargs=kwargs).set(shadow=shadow)

    def fan_out(self, graph: DepsGraph, run: Run, finish: Signature, *, deadline: int | None = None,
                first: bool = True) -> Any:
        """Replace this task with the canvas of ``graph``'s deps, ending in ``finish``.

        ``first`` is False when a stalled run compiles its canvas again: its
        progress counters were set by the first compilation and stay.  The first
        compilation also sets the run's ``PROGRESS`` state, 0 of its deps done, and
        that of the parked task that called it (:mod:`fusion_celery.taskstate`).
        """
        if first:
            caller = progress.start(self.app, run.id, len(graph), topic=run.topic, parent=self.request.parent_id)
            taskstate.publish(self.app, taskstate.Progress(run.id, 0, len(graph), run.topic), caller,
                              hostname=self.request.hostname)
        return self.replace(compile_deps(self.app, graph, finish, run=run, deadline=deadline,
                                         reply=self.reply_channel))

    def graph(self, deps_map: Mapping[str, Any]) -> DepsGraph:
        """``deps_map`` checked, with no timeout beyond what the result backend keeps a chord for."""
        return DepsGraph(deps_map, max_timeout=chord_lifetime(self.app))


class FinishTask(AnsweringTask):
    """The finish step of a run (see the module docstring)."""
