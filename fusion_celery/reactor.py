"""Reactors: Celery tasks that serve a Kafka topic.

A reactor is bound to a persistent topic.  For each request the worker's intake
runs the reactor's task; the task asks ``deps`` for a deps-map, and either runs
the processing function at once (no deps) or replaces itself with the canvas of
its deps, whose final step (the task ``<name>.process``) runs the processing
function with their results.  Either way the result is stored under the
reactor task's id and put on the request's return topic.

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

import hashlib
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

from celery import Celery
from celery.exceptions import Ignore

from . import answer, claims, tracing
from .bodyresult import remembered
from .canvas import merge_results
from .channels import check_name
from .claims import RUN_OPTIONS, once
from .errors import RequestExpired
from .graph import DepsGraph
from .message import Message
from .protocol import valid_topic_name
from .run import Caller, Run
from .runtask import FinishTask, RunTask
from .runtime import reactors

__all__ = ["reactor", "Reactor", "ReactorTask", "ProcessTask"]

logger = logging.getLogger(__name__)

DepsFn = Callable[[Message], "Mapping[str, Any] | None"] | Mapping[str, Any] | None


def _takes_results(fn: Callable[..., Any]) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params)


def _run_of(task_id: str, topic: str, kwargs: dict[str, Any]) -> Run:
    return Run(id=task_id, topic=topic, caller=Caller.of(kwargs.get("message")))


def _process(task: Any, msg: Message, results: dict[str, Any]) -> Any:
    """Run the reactor's processing function (once per run, see :mod:`fusion_celery.bodyresult`) and
    answer its caller with the result; while another path holds the reply, come back later
    (:class:`~fusion_celery.claims.Later`)."""
    fn = task.proc_fn
    result = remembered(task.app, task.request.id, lambda: fn(msg, results) if _takes_results(fn) else fn(msg))
    answer.reply(task.app, _run_of(task.request.id, task.topic, {"message": msg.to_dict()}), result=result,
                 sender=task, wait_held=True)
    return result


def _first_run(task: Any, msg: Message) -> str:
    """The run that serves the request of ``msg``: the first run of a record with its return topic and id.

    A caller that sent the same request twice (a fusion dispatch whose worker died after
    Kafka took the request, before it marked the request sent) is answered once.  A
    request without a return topic or an id is its record's own.
    """
    if not (msg.id and msg.return_topic):
        return task.request.id
    digest = hashlib.sha256(f"{task.topic}\0{msg.return_topic}\0{msg.id}".encode()).hexdigest()[:32]
    return claims.first(task.app, f"request-{digest}", task.request.id)


class ReactorTask(RunTask):
    """A reactor's start step: ask ``deps_fn`` for the deps-map, then process or fan out."""

    topic: str = ""
    proc_fn: Callable[..., Any]
    deps_fn: DepsFn = None
    group_id: str | None = None
    partitions: int | None = None
    finish_suffix = ".process"

    def run_of(self, task_id: str, kwargs: dict[str, Any]) -> Run:
        return _run_of(task_id, self.topic, kwargs)

    def run(self, *, message: dict[str, Any], redrive: int = 0) -> Any:
        msg = Message.from_dict(message)
        if redrive:
            # A stalled run (started, waiting on no reply, no step for a while: a step's message was lost
            # in the Celery broker) compiles its canvas again.  The subtasks keep their ids, so those that
            # ran resume what follows them and only the lost ones run.
            with once(self, f"redrive{redrive}", watched=True):
                deps_map = self._deps_map(msg)
                if deps_map:
                    return self._fan_out(msg, message, deps_map, first=False)
                return None
        # A redelivered record must not ask the deps or run proc_fn again.
        with once(self, "run", watched=True), tracing.step(self, "run", **{"messaging.destination.name": self.topic}):
            if msg.expired:
                raise RequestExpired(f"request to {self.topic!r} arrived after its deadline {msg.deadline}")
            served_by = _first_run(self, msg)
            if served_by != self.request.id:
                logger.info("run %s: request %r to %s on return topic %s is served by run %s already; duplicate "
                            "dropped", self.request.id, msg.id, self.topic, msg.return_topic, served_by)
                raise Ignore()
            deps_map = self._deps_map(msg)
            if not deps_map:
                return _process(self, msg, {})
            return self._fan_out(msg, message, deps_map, first=True)

    def _deps_map(self, msg: Message) -> Mapping[str, Any] | None:
        return self.deps_fn(msg) if callable(self.deps_fn) else self.deps_fn

    def _fan_out(self, msg: Message, message: dict[str, Any], deps_map: Mapping[str, Any], first: bool) -> Any:
        finish = self.finish_signature({"message": message}, shadow=f"{self.name}[{self.topic}:process]")
        return self.fan_out(self.graph(deps_map), self.run_of(self.request.id, {"message": message}), finish,
                            deadline=msg.deadline, first=first)


class ProcessTask(FinishTask):
    """A reactor's finish step: ``proc_fn(message, results)`` with its deps' results, then the reply."""

    topic: str = ""
    proc_fn: Callable[..., Any]

    def run_of(self, task_id: str, kwargs: dict[str, Any]) -> Run:
        return _run_of(task_id, self.topic, kwargs)

    def run(self, prior: Any = None, *, message: dict[str, Any]) -> Any:
        with once(self, "process", watched=True), tracing.step(self, "process"):
            return _process(self, Message.from_dict(message), merge_results(prior))


def _register(app: Celery, topic: str, fn: Callable[..., Any], deps: DepsFn, name: str | None,
              group: str | None, partitions: int | None, options: dict[str, Any],
              reply: str | None = None) -> ReactorTask:
    if not valid_topic_name(topic):
        raise ValueError(f"reactor topic {topic!r} is not a legal Kafka topic name")
    if deps is not None and not callable(deps) and not isinstance(deps, Mapping):
        raise TypeError(f"reactor {topic!r}: deps must be a function of the message or a deps-map")
    if isinstance(deps, Mapping):
        DepsGraph(deps)  # a constant deps-map is checked when the reactor is defined
    if reply is not None:
        check_name(reply, f"reactor {topic!r}: reply")
    task_name = name or f"fusion.reactor.{topic}"
    known = reactors(app)
    if known.get(topic, task_name) != task_name:
        raise ValueError(f"topic {topic!r} is already served by reactor {known[topic]!r}")
    task = app.task(name=task_name, base=ReactorTask, bind=True, shared=False, lazy=False, topic=topic,
                    proc_fn=staticmethod(fn), deps_fn=staticmethod(deps) if callable(deps) else deps,
                    group_id=group, partitions=partitions, reply_channel=reply,
                    **{**RUN_OPTIONS, **options})(ReactorTask.run)
    app.task(name=task.finish_name, base=ProcessTask, bind=True, shared=False, lazy=False, topic=topic,
             proc_fn=staticmethod(fn), **{**RUN_OPTIONS, **options})(ProcessTask.run)
    known[topic] = task_name
    return task


def reactor(topic: str, *, deps: DepsFn = None, app: Celery | None = None, name: str | None = None,
            group: str | None = None, partitions: int | None = None, reply: str | None = None,
            **task_options: Any) -> Callable[[Callable[..., Any]], ReactorTask]:
    """Make a function the processing step of a reactor serving Kafka topic ``topic``.

    The function receives the :class:`Message` and, if it takes two arguments,
    the dict of its deps' results; what it returns is the reply.

    Parameters:
        topic: the reactor's Kafka topic (created at worker start unless
            ``fusion_create_topics`` is off).
        deps: fusion-clj's deps-fn: a function of the message returning a deps-map
            (or ``None``), or a constant deps-map (checked here).
        app: the app to register on (default :data:`fusion_celery.app`).
        name: the Celery task's name (default ``fusion.reactor.<topic>``).
        group: the consumer group (default ``fusion_consumer_group_prefix`` + topic).
        partitions: the partitions of the topic when the worker creates it.
        reply: the reply channel of the deps whose deps-map entry names none (``leased``,
            ``shared``, ``ephemeral``; None: ``fusion_reply_channel``).
        task_options: passed to ``@app.task`` for both steps (``queue``,
            ``rate_limit``, ``time_limit``, ``autoretry_for``, ...).

    Returns:
        A decorator that registers the reactor and returns its :class:`ReactorTask`.

    Raises:
        ValueError: ``topic`` is not a legal Kafka topic name or another reactor serves it.
        TypeError: ``deps`` is neither a function nor a deps-map.
        DepsMapError: a constant deps-map is invalid (unknown dep, cycle, missing topic, ...).
    """
    def deco(fn: Callable[..., Any]) -> ReactorTask:
        from . import app as default_app
        return _register(app or default_app, topic, fn, deps, name, group, partitions, task_options, reply)
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
    reply: str | None = None
    options: dict[str, Any] = {}
    task: ReactorTask

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.topic:
            return  # an abstract base
        inst = cls()
        deps = inst.deps if type(inst).deps is not Reactor.deps else None
        cls.task = reactor(cls.topic, deps=deps, app=cls.app, name=cls.name, group=cls.group,
                           partitions=cls.partitions, reply=cls.reply, **cls.options)(inst.process)

    def deps(self, message: Message) -> Mapping[str, Any] | None:
        """The deps-map for ``message`` (none by default)."""
        return None

    def process(self, message: Message, results: dict[str, Any]) -> Any:
        """The reactor's answer to ``message`` given its deps' ``results``."""
        raise NotImplementedError
