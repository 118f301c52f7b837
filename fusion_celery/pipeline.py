"""Pipelines: put root requests into the system from any Celery client and get the answer.

``fusion.pipeline`` is a registered task with plain JSON arguments, so any Celery
client can start one by name, even one that knows nothing of Kafka::

    app.send_task("fusion.pipeline", args=["math", {"x": 1}], kwargs={"timeout": 30}).get()

In Python, :class:`Pipeline` names a root topic, or holds a deps-map over several
top-level services (or a function of the input returning one) plus a ``combine``
function of their results::

    math = Pipeline("math")
    math.delay([1, 2, 3]).get(timeout=30)

    enrich = Pipeline(deps=lambda doc: {...}, combine=lambda data, results: ..., name="enrich")

The pipeline task parks while the services work, like a dispatching subtask: no
worker slot is held.  Without waiting (``wait=False``) it returns the Kafka
delivery record ``{"topic", "partition", "offset"}``, as fusion-clj did.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from celery import Celery, Task
from celery.result import AsyncResult

from .canvas import compile_deps
from .config import setting
from .graph import DepsGraph
from .kafka import clients
from .protocol import check_size, encode_request, valid_topic_name

__all__ = ["Pipeline", "register_pipeline", "PIPELINE_TASK"]

PIPELINE_TASK = "fusion.pipeline"


def call_topic(task: Task, topic: str, data: Any = None, timeout: float | None = None, wait: bool = True) -> Any:
    """Send ``data`` to ``topic``; park until the reply (``wait``) or return the delivery record."""
    from .dispatch import open_wait
    from .errors import DependencyFailed
    app = task.app
    if not valid_topic_name(topic):
        raise ValueError(f"{topic!r} is not a legal Kafka topic name")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or timeout <= 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not wait:
        c = clients(app)
        if not c.topic_exists(topic):
            raise DependencyFailed(f"topic {topic!r} does not exist")
        body = encode_request(data, None, id=task.request.id)
        check_size(body, int(setting(app, "fusion_max_message_bytes")), f"the request to topic {topic!r}")
        msg = c.produce(topic, body, key=topic)
        return {"topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset()}
    open_wait(task, topic=topic, data=data, timeout=float(timeout or setting(app, "fusion_default_timeout")))


def _pipeline(self: Task, topic: str, data: Any = None, timeout: float | None = None, wait: bool = True) -> Any:
    """Send ``data`` to the reactor or service on ``topic`` and wait for its answer (or not)."""
    return call_topic(self, topic, data, timeout, wait)


def register_pipeline(app: Celery) -> Task:
    return app.task(name=PIPELINE_TASK, bind=True, shared=False)(_pipeline)


class PipelineTask(Task):
    """A named pipeline: a root topic, or a deps-map plus a combining step."""

    root_topic: str | None = None
    deps_fn: Any = None
    combine_fn: Callable[..., Any] | None = None
    default_timeout: float | None = None

    def run(self, prior: Any = None, *, data: Any = None, timeout: float | None = None, wait: bool = True,
            stage: str = "start") -> Any:
        if stage == "combine":
            from .dispatch import merge_results
            results = merge_results(prior)
            return self.combine_fn(data, results) if self.combine_fn else results
        timeout = timeout or self.default_timeout
        if self.root_topic:
            return call_topic(self, self.root_topic, data, timeout, wait)
        deps_map = self.deps_fn(data) if callable(self.deps_fn) else self.deps_fn
        from .reactor import chord_lifetime
        graph = DepsGraph(deps_map or {}, max_timeout=chord_lifetime(self.app))
        if timeout:
            for dep in graph.deps.values():
                if dep.timeout is None:
                    graph.deps[dep.name] = type(dep)(dep.name, dep.topic, dep.args, dep.deps, dep.arg_in_fn,
                                                     float(timeout))
        if not graph.deps:
            return self.run(None, data=data, stage="combine")
        body = self.signature(kwargs={"data": data, "stage": "combine"}).set(shadow=f"{self.name}[combine]")
        reactor = {"id": self.request.id, "topic": None, "message": {}}
        return self.replace(compile_deps(self.app, graph, body, reactor=reactor))


class Pipeline:
    """A gatekeeper for requests into the system, usable from any Celery client.

    ``Pipeline("math")`` calls the reactor on topic ``math``.
    ``Pipeline(deps=..., combine=..., name="enrich")`` fans out to several
    services and combines their results.  ``delay(data)`` / ``apply_async`` return
    an :class:`~celery.result.AsyncResult` whose ``.get()`` is the answer;
    ``s(data)`` gives a signature for chains, groups and chords.
    """

    def __init__(self, topic: str | None = None, *, deps: Any = None,
                 combine: Callable[[Any, dict[str, Any]], Any] | None = None, name: str | None = None,
                 timeout: float | None = None, app: Celery | None = None, **task_options: Any) -> None:
        if (topic is None) == (deps is None):
            raise ValueError("a Pipeline takes either a root topic or a deps-map (deps=...), not both")
        if topic is not None and not valid_topic_name(topic):
            raise ValueError(f"pipeline topic {topic!r} is not a legal Kafka topic name")
        if deps is not None and not callable(deps) and not isinstance(deps, Mapping):
            raise TypeError("deps must be a deps-map or a function of the input returning one")
        if isinstance(deps, Mapping):
            DepsGraph(deps)
        if topic is None and not name:
            raise ValueError("a deps-map pipeline needs a name (its Celery task is fusion.pipeline.<name>)")
        from . import app as default_app
        self.app = app or default_app
        self.topic = topic
        self.name = f"fusion.pipeline.{name or topic}"
        self.task: PipelineTask = self.app.task(
            name=self.name, base=PipelineTask, bind=True, shared=False, lazy=False, root_topic=topic,
            deps_fn=staticmethod(deps) if callable(deps) else deps,
            combine_fn=staticmethod(combine) if combine else None, default_timeout=timeout,
            **task_options)(PipelineTask.run)

    def s(self, data: Any = None, *, timeout: float | None = None, wait: bool = True):
        """A signature of this pipeline for ``data`` (for canvas composition)."""
        return self.task.s(data=data, timeout=timeout, wait=wait)

    def si(self, data: Any = None, *, timeout: float | None = None, wait: bool = True):
        """An immutable signature (ignores the parent's result in a chain)."""
        return self.task.si(data=data, timeout=timeout, wait=wait)

    def delay(self, data: Any = None, *, timeout: float | None = None, wait: bool = True) -> AsyncResult:
        """Start the pipeline for ``data``; ``.get()`` on the result gives the answer."""
        return self.task.apply_async(kwargs={"data": data, "timeout": timeout, "wait": wait})

    def apply_async(self, args: tuple = (), kwargs: dict[str, Any] | None = None, **options: Any) -> AsyncResult:
        """Like :meth:`celery.Task.apply_async`: ``args`` may hold the data, ``kwargs`` timeout/wait."""
        kwargs = dict(kwargs or {})
        if args:
            kwargs.setdefault("data", args[0])
        return self.task.apply_async(kwargs=kwargs, **options)

    def __call__(self, data: Any = None, *, timeout: float | None = None) -> Any:
        """Start the pipeline and wait for its answer (from outside any task)."""
        return self.delay(data, timeout=timeout).get(timeout=(timeout or 3600) + 30)
