"""Compiling a deps-map into Celery's canvas.

The weakly connected components of the dependency graph run side by side as
the header of a chord whose body is the reactor's processing step.  Inside a
component, each topological level is a group of ``fusion.dispatch`` subtasks
and the levels are chained, so a level starts when the previous one is done::

    deps a -> b, a -> c, {b, c} -> d, plus an unrelated x:

    chord([ chain(a, group(b, c), d), x ], process)

A dep therefore waits for its own deps *and* for the rest of the previous level
of its component; disjoint branches never wait for each other.
"""

from __future__ import annotations

import uuid
from typing import Any

from celery import Celery, Signature, chain, group

from .graph import DepsGraph

__all__ = ["compile_deps", "dispatch_id"]


_DISPATCH_NS = uuid.UUID("0b6f8f9e-3c1e-4f37-9d55-6675736469d0")


def dispatch_id(run_id: str, dep: str) -> str:
    """The task id of the subtask that dispatches ``dep`` for the run ``run_id``.

    Derived, not drawn: should a run compile its deps-map twice (its message was
    delivered again after the first copy had sent its canvas), the second canvas's
    subtasks carry the same ids, find their run-once claims taken, and ask nobody again.
    """
    return str(uuid.uuid5(_DISPATCH_NS, f"{run_id}/{dep}"))


def _dispatch(app: Celery, graph: DepsGraph, name: str, reactor: dict[str, Any] | None,
              deadline: int | None) -> Signature:
    dep = graph.deps[name]
    sig = app.tasks["fusion.dispatch"].s(dep=dep.to_dict(), reactor=reactor, deadline=deadline).set(
        shadow=f"fusion.dispatch[{dep.topic}]")
    if reactor and reactor.get("id"):
        sig.set(task_id=dispatch_id(reactor["id"], name))
    return sig


def _level(sigs: list[Signature]) -> Signature:
    return sigs[0] if len(sigs) == 1 else group(sigs)


def compile_deps(app: Celery, graph: DepsGraph, body: Signature, *, reactor: dict[str, Any] | None = None,
                 deadline: int | None = None) -> Signature:
    """The canvas that runs every dep of ``graph`` and then ``body`` with their merged results."""
    branches = []
    for levels in graph.components():
        steps = [_level([_dispatch(app, graph, n, reactor, deadline) for n in level]) for level in levels]
        branches.append(steps[0] if len(steps) == 1 else chain(*steps))
    if len(branches) == 1:
        inner = branches[0]
        return chain(*(inner.tasks if isinstance(inner, chain) else [inner]), body)
    return chain(group(branches), body)
