"""Compiling a deps-map into Celery's canvas.

The weakly connected components of the dependency graph run side by side as
the header of a chord whose body is the reactor's processing step.  Inside a
component, each topological level is a group of ``fusion.dispatch`` subtasks
and the levels are chained, so a level starts when the previous one is done::

    deps a -> b, a -> c, {b, c} -> d, plus an unrelated x:

    chord([ chain(a, group(b, c), d), x ], process)

A dep therefore waits for its own deps *and* for the rest of the previous level
of its component; disjoint branches never wait for each other.  Every step
receives what the steps before it returned; :func:`merge_results` flattens that
into one dict of dep results.
"""

from __future__ import annotations

import uuid
from typing import Any

from celery import Celery, Signature, chain, group

from . import tracing
from .graph import DepsGraph
from .run import Run

__all__ = ["compile_deps", "dispatch_id", "merge_results", "chord_lifetime"]


_DISPATCH_NS = uuid.UUID("0b6f8f9e-3c1e-4f37-9d55-6675736469d0")


def dispatch_id(run_id: str, dep: str) -> str:
    """The task id of the subtask that dispatches ``dep`` for the run ``run_id``.

    Derived, not drawn: should a run compile its deps-map twice (its message was
    delivered again after the first copy had sent its canvas), the second canvas's
    subtasks carry the same ids, find their run-once claims taken, and ask nobody again.
    """
    return str(uuid.uuid5(_DISPATCH_NS, f"{run_id}/{dep}"))


def merge_results(prior: Any) -> dict[str, Any]:
    """Flatten what a canvas step received (a dict, or nested lists of dicts) into one dict."""
    merged: dict[str, Any] = {}
    if isinstance(prior, dict):
        merged.update(prior)
    elif isinstance(prior, (list, tuple)):
        for item in prior:
            merged.update(merge_results(item))
    return merged


def chord_lifetime(app: Celery) -> float | None:
    """Seconds a chord's counting keys live (``result_chord_expires``, else ``result_expires``).

    No dependency may wait longer: its chord would be forgotten before it completes.
    """
    value = app.conf.get("result_chord_expires") or app.conf.result_expires
    if value is None:
        return None
    return float(value.total_seconds() if hasattr(value, "total_seconds") else value)


def _dispatch(app: Celery, graph: DepsGraph, name: str, run: Run, deadline: int | None,
              reply: str | None) -> Signature:
    dep = graph.deps[name]
    spec = dep.to_dict()
    if dep.reply is None and reply is not None:
        spec["reply"] = reply
    return tracing.carry(app, app.tasks["fusion.dispatch"].s(dep=spec, run=run.to_dict(), deadline=deadline).set(
        shadow=f"fusion.dispatch[{dep.topic}]", task_id=dispatch_id(run.id, name)))


def _level(sigs: list[Signature]) -> Signature:
    return sigs[0] if len(sigs) == 1 else group(sigs)


def compile_deps(app: Celery, graph: DepsGraph, body: Signature, *, run: Run,
                 deadline: int | None = None, reply: str | None = None) -> Signature:
    """The canvas that runs every dep of ``graph`` for ``run``, then ``body`` with their results.

    Parameters:
        app: the fusion app (``fusion.dispatch`` must be registered on it).
        graph: the checked deps-map.
        body: the run's final step; it receives the results of the last steps.
        run: the run the deps serve (a failing dep answers it).
        deadline: epoch ms after which no dep waits any more (the request's own deadline).
        reply: the reply channel of the deps that name none (None: ``fusion_reply_channel``).

    Returns:
        A chain ending in ``body``.
    """
    body = tracing.carry(app, body)  # sent later by a waiter, in no span of the run (see fusion_celery.tracing)
    branches = []
    for levels in graph.components():
        steps = [_level([_dispatch(app, graph, n, run, deadline, reply) for n in level]) for level in levels]
        branches.append(steps[0] if len(steps) == 1 else chain(*steps))
    if len(branches) == 1:
        inner = branches[0]
        return chain(*(inner.tasks if isinstance(inner, chain) else [inner]), body)
    return chain(group(branches), body)
