"""Reactors: Celery tasks that serve a Kafka topic.

A reactor is bound to a persistent topic.  For each request the worker's intake
runs the reactor's task; the task asks ``deps`` for a deps-map, and either runs
the processing function at once (no deps) or replaces itself with the canvas of
its deps, whose final step runs the processing function with their results.
Either way the result is stored under the reactor task's id and put on the
request's return topic.

Function form::

    @reactor("subtract")
    def subtract(message):
        first, *rest = message.data
        return first - sum(rest)

Class form, for larger reactors::

    class Math(Reactor):
        topic = "math"
        def deps(self, message): ...
        def process(self, message, results): ...
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from celery import Celery, Task
from celery.exceptions import WorkerLostError
from celery.signals import task_failure

from . import progress
from .canvas import compile_deps
from .claims import RUN_OPTIONS, once
from .errors import RequestExpired
from .graph import DepsGraph
from .message import Message
from .protocol import valid_topic_name
from .reply import reply_once
from .runtime import reactors

__all__ = ["reactor", "Reactor", "ReactorTask"]

DepsFn = Callable[[Message], "Mapping[str, Any] | None"] | Mapping[str, Any] | None


def _takes_results(fn: Callable[..., Any]) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params)


def chord_lifetime(app: Celery) -> float | None:
    """Seconds a chord's counting keys live (``result_chord_expires``, else ``result_expires``)."""
    value = app.conf.get("result_chord_expires") or app.conf.result_expires
    if value is None:
        return None
    return float(value.total_seconds() if hasattr(value, "total_seconds") else value)


class ReactorTask(Task):
    """The Celery task behind a reactor (its two stages are ``intake`` and ``process``)."""

    topic: str = ""
    proc_fn: Callable[..., Any]
    deps_fn: DepsFn = None
    group_id: str | None = None
    partitions: int | None = None

    def run(self, prior: Any = None, *, message: dict[str, Any], stage: str = "intake", redrive: int = 0) -> Any:
        msg = Message.from_dict(message)
        if stage == "process":
            from .dispatch import merge_results
            with once(self, "process"):
                return self._process(msg, merge_results(prior))
        if redrive:
            # The intake found this run stalled: started, waiting on no reply, no step for a while (a
            # step's message was lost in the Celery broker).  Its canvas is compiled again: the subtasks
            # keep their ids, so those that ran resume what follows them and only the lost ones run.
            with once(self, f"redrive{redrive}"):
                deps_map = self.deps_fn(msg) if callable(self.deps_fn) else self.deps_fn
                if deps_map:
                    return self._replace_with_deps(msg, message, deps_map, first=False)
                return None
        with once(self, "run"):  # a redelivered record must not ask the deps or run proc_fn again
            if msg.expired:
                raise RequestExpired(f"request to {self.topic!r} arrived after its deadline {msg.deadline}")
            deps_map = self.deps_fn(msg) if callable(self.deps_fn) else self.deps_fn
            if not deps_map:
                return self._process(msg, {})
            return self._replace_with_deps(msg, message, deps_map, first=True)

    def _replace_with_deps(self, msg: Message, message: dict[str, Any], deps_map: Mapping[str, Any],
                           first: bool) -> Any:
        """Replace this task with the canvas of its deps, whose last step is the processing step."""
        graph = DepsGraph(deps_map, max_timeout=chord_lifetime(self.app))
        reactor_info = {"id": self.request.id, "topic": self.topic,
                        "message": {"return_topic": msg.return_topic, "id": msg.id, "topic": msg.topic}}
        body = self.signature(kwargs={"message": message, "stage": "process"}).set(
            shadow=f"{self.name}[{self.topic}:process]")
        if first:
            progress.start(self.app, self.request.id, len(graph))
        return self.replace(compile_deps(self.app, graph, body, reactor=reactor_info, deadline=msg.deadline))

    def _process(self, msg: Message, results: dict[str, Any]) -> Any:
        fn = self.proc_fn
        result = fn(msg, results) if _takes_results(fn) else fn(msg)
        reply_once(self.app, self.request.id, msg.to_dict(), result=result, sender=self)
        return result

    def on_failure(self, exc, task_id, args, kwargs, einfo):  # noqa: D401 - Celery hook
        message = (kwargs or {}).get("message") or {}
        reply_once(self.app, task_id, message, exc=exc, sender=self)


def _register(app: Celery, topic: str, fn: Callable[..., Any], deps: DepsFn, name: str | None,
              group: str | None, partitions: int | None, options: dict[str, Any]) -> ReactorTask:
    if not valid_topic_name(topic):
        raise ValueError(f"reactor topic {topic!r} is not a legal Kafka topic name")
    if deps is not None and not callable(deps) and not isinstance(deps, Mapping):
        raise TypeError(f"reactor {topic!r}: deps must be a function of the message or a deps-map")
    if isinstance(deps, Mapping):
        DepsGraph(deps)  # a constant deps-map is checked when the reactor is defined
    task_name = name or f"fusion.reactor.{topic}"
    known = reactors(app)
    if known.get(topic, task_name) != task_name:
        raise ValueError(f"topic {topic!r} is already served by reactor {known[topic]!r}")
    task = app.task(name=task_name, base=ReactorTask, bind=True, shared=False, lazy=False, topic=topic,
                    proc_fn=staticmethod(fn), deps_fn=staticmethod(deps) if callable(deps) else deps,
                    group_id=group, partitions=partitions, **{**RUN_OPTIONS, **options})(ReactorTask.run)
    known[topic] = task_name
    return task


def reactor(topic: str, *, deps: DepsFn = None, app: Celery | None = None, name: str | None = None,
            group: str | None = None, partitions: int | None = None,
            **task_options: Any) -> Callable[[Callable[..., Any]], ReactorTask]:
    """Make a function the processing step of a reactor serving Kafka topic ``topic``.

    ``deps`` is fusion-clj's deps-fn: a function of the :class:`Message` returning a
    deps-map (or ``None``), or a constant deps-map.  The function receives the
    message and, if it takes two arguments, the dict of dep results.  ``group``
    overrides the consumer group, ``partitions`` the partition count used when the
    worker creates the topic.  Every other keyword (``queue``, ``rate_limit``,
    ``time_limit``, ``autoretry_for``, ...) is passed to ``@app.task``.  ``app``
    defaults to :data:`fusion_celery.app`.
    """
    def deco(fn: Callable[..., Any]) -> ReactorTask:
        from . import app as default_app
        return _register(app or default_app, topic, fn, deps, name, group, partitions, task_options)
    return deco


class Reactor:
    """Class form of :func:`reactor`: subclass with ``topic``, ``process`` and optionally ``deps``.

    Subclasses register themselves when defined (on ``app``, by default the
    fusion app); ``options`` is passed to ``@app.task``.  The registered Celery
    task is ``YourReactor.task``.
    """

    topic: str = ""
    app: Celery | None = None
    name: str | None = None
    group: str | None = None
    partitions: int | None = None
    options: dict[str, Any] = {}
    task: ReactorTask

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.topic:
            return  # an abstract base
        inst = cls()
        deps = inst.deps if type(inst).deps is not Reactor.deps else None
        cls.task = reactor(cls.topic, deps=deps, app=cls.app, name=cls.name, group=cls.group,
                           partitions=cls.partitions, **cls.options)(inst.process)

    def deps(self, message: Message) -> Mapping[str, Any] | None:
        """The deps-map for ``message`` (none by default)."""
        return None

    def process(self, message: Message, results: dict[str, Any]) -> Any:
        """The reactor's answer to ``message`` given its deps' ``results``."""
        raise NotImplementedError


@task_failure.connect
def _worker_lost(sender: Any = None, task_id: str | None = None, exception: BaseException | None = None,
                 kwargs: dict[str, Any] | None = None, **_: Any) -> None:
    """A pool child died mid-run: Celery fails the task from the parent without calling
    ``on_failure``, so answer the caller here instead of letting it time out."""
    if not isinstance(exception, WorkerLostError) or task_id is None:
        return
    if isinstance(sender, ReactorTask):
        reply_once(sender.app, task_id, (kwargs or {}).get("message") or {}, exc=exception, sender=sender)
    elif getattr(sender, "name", None) == "fusion.dispatch" and (kwargs or {}).get("reactor"):
        from .completion import fail_reactor
        fail_reactor(sender.app, kwargs["reactor"], exception)
