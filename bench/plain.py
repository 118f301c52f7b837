"""Plain Celery, no Kafka: the same DAGs as chains/chords of no-op tasks over Redis.

Run by its own worker (``celery -A bench.plain worker -Q bench-plain``).  It uses
the broker and result backend of the environment (the same Redis as the fusion
worker) on its own queue.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, chain, group

from .common import DATA

__all__ = ["QUEUE", "app", "canvas"]

QUEUE = "bench-plain"

app = Celery("bench.plain")
app.conf.update(task_default_queue=QUEUE, task_serializer="json", result_serializer="json",
                accept_content=["json"], broker_connection_retry_on_startup=True, result_expires=3600)


@app.task(name="bench.plain.dep")
def dep(prior: Any = None, *, name: str, args: Any = None) -> Any:
    """A no-op dependency: answers a small value at once."""
    return {name: args if prior is None else len(repr(prior))}


@app.task(name="bench.plain.process")
def process(prior: Any = None, *, data: Any = None) -> Any:
    """The no-op processing step."""
    return data if prior is None else prior


def canvas(shape: str, data: Any = DATA):
    """The Celery canvas of ``shape``, structured as fusion-celery compiles that deps-map."""
    body = process.s(data=data)
    if shape == "nodeps":
        return body
    if shape == "onedep":
        return chain(dep.s(name="one", args=data), body)
    if shape == "math":
        return chain(dep.s(name="one", args=data), dep.s(name="two", args=[2]), body)
    if shape == "diamond":
        return chain(dep.s(name="a", args=data), group(dep.s(name="b"), dep.s(name="c")), dep.s(name="d"), body)
    raise ValueError(f"unknown shape {shape!r}")
