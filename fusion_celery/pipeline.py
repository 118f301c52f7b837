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

A topic pipeline's request is keyed by its id (the pipeline task's), so that
requests to a topic spread over its partitions; ``key=`` keeps the requests of
one entity on one partition::

    math.delay([1, 2, 3], key="account-42")
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from celery import Celery, Signature, Task
from celery.result import AsyncResult

from . import tracing
from .canvas import merge_results
from .channels import check_name
from .claims import RUN_OPTIONS, once
from .clients import clients
from .config import settings
from .errors import UnknownTopic
from .graph import DepsGraph
from .protocol import check_size, encode_request, valid_topic_name
from .run import Run
from .runtask import FinishTask, RunTask

__all__ = ["Pipeline", "TopicPipeline", "DepsPipeline", "register_pipeline", "PIPELINE_TASK"]

PIPELINE_TASK = "fusion.pipeline"


def delivery_record(msg: Any) -> dict[str, Any]:
    """fusion-clj's ``{topic, partition, offset}``, plus the record's timestamp (ms).

    With all four, ``run_id(topic, partition, offset, timestamp)`` names the run a
    fusion reactor made of the record, so its result can be looked up later.
    """
    return {"topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset(),
            "timestamp": msg.timestamp()[1]}


def check_key(key: Any) -> str | None:
    """``key`` if it can be a request's Kafka key (a string, or None for the request's id).

    Raises:
        TypeError: anything else.
    """
    if key is not None and not isinstance(key, str):
        raise TypeError(f"a request's key must be a string (or None: the request's id), got {type(key).__name__}")
    return key


def call_topic(task: Task, topic: str, data: Any = None, timeout: float | None = None, wait: bool = True,
               key: str | None = None, reply: str | None = None) -> Any:
    """Send ``data`` to ``topic``, keyed by ``key`` or the request's id; park until the reply (``wait``)
    or return the delivery record."""
    from .dispatch import lineage_headers, no_such_topic, open_wait, request_key
    app = task.app
    if not valid_topic_name(topic):
        raise ValueError(f"{topic!r} is not a legal Kafka topic name")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or timeout <= 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    check_key(key)
    if not wait:
        c = clients(app)
        if not c.topic_exists(topic):
            raise no_such_topic(topic, None)
        body = encode_request(data, None, id=task.request.id)
        check_size(body, settings(app).max_message_bytes, f"the request to topic {topic!r}")
        try:
            with tracing.send(app, topic, task=task) as context:
                msg = c.produce(topic, body, key=request_key(task, key),
                                headers=lineage_headers(task) + tracing.kafka_headers(context))
        except UnknownTopic:
            raise no_such_topic(topic, None) from None
        return delivery_record(msg)
    open_wait(task, topic=topic, data=data, timeout=float(timeout or settings(app).default_timeout), key=key,
              reply=reply)


def _pipeline(self: Task, *args: Any, topic: str | None = None, data: Any = None, timeout: float | None = None,
              wait: bool = True, key: str | None = None, reply: str | None = None) -> Any:
    """Send ``data`` to the reactor or service on ``topic`` and wait for its answer (or not).

    Called by name as ``fusion.pipeline(topic, data)``; in a chain, the previous
    task's result becomes ``data`` when the signature has none.  ``key`` is the
    request's Kafka key (default: the request's id, this task's id); ``reply`` its reply
    channel (default: ``fusion_reply_channel``).
    """
    if topic is None:
        if not args:
            raise TypeError("fusion.pipeline needs a topic: send_task('fusion.pipeline', args=[topic, data])")
        topic, args = args[0], args[1:]
    if data is None and args:
        data = args[0]
    with once(self, "dispatch"):  # a duplicate delivery must not send the request twice
        return call_topic(self, topic, data, timeout, wait, key, reply)


def register_pipeline(app: Celery) -> Task:
    return app.task(name=PIPELINE_TASK, bind=True, shared=False, **RUN_OPTIONS)(_pipeline)


class PipelineTask(RunTask):
    """A deps-map pipeline's start step: fan out to its services."""

    deps_fn: Any = None
    combine_fn: Callable[..., Any] | None = None
    default_timeout: float | None = None
    finish_suffix = ".combine"

    def run(self, *args: Any, data: Any = None, timeout: float | None = None) -> Any:
        if data is None and args:
            data = args[0]  # in a chain: the previous task's result
        with once(self, "run"), tracing.step(self, "run"):
            return self._start(data, timeout)

    def _start(self, data: Any, timeout: float | None) -> Any:
        timeout = timeout or self.default_timeout
        deps_map = self.deps_fn(data) if callable(self.deps_fn) else self.deps_fn
        graph = self.graph(deps_map or {})
        if timeout:
            for dep in list(graph.deps.values()):
                if dep.timeout is None:
                    graph.deps[dep.name] = replace(dep, timeout=float(timeout))
        if not graph.deps:
            return self.combine_fn(data, {}) if self.combine_fn else {}
        finish = self.finish_signature({"data": data}, shadow=f"{self.name}[combine]")
        return self.fan_out(graph, Run(id=self.request.id), finish)


class CombineTask(FinishTask):
    """A deps-map pipeline's finish step: ``combine(data, results)``."""

    combine_fn: Callable[..., Any] | None = None

    def run(self, prior: Any = None, *, data: Any = None) -> Any:
        results = merge_results(prior)
        with once(self, "combine"), tracing.step(self, "combine"):
            return self.combine_fn(data, results) if self.combine_fn else results


class Pipeline:
    """A gatekeeper for requests into the system, usable from any Celery client.

    ``Pipeline("math")`` calls the reactor on topic ``math`` through the
    ``fusion.pipeline`` task, so the workers need nothing registered for it
    (a :class:`TopicPipeline`).  ``Pipeline(deps=..., combine=..., name="enrich")``
    fans out to several services and combines their results; it registers the
    task ``fusion.pipeline.<name>`` (and its step ``fusion.pipeline.<name>.combine``),
    so its module must be imported by the workers (``fusion_imports``) (a
    :class:`DepsPipeline`).  ``delay(data)`` / ``apply_async`` return an
    :class:`~celery.result.AsyncResult` whose ``.get()`` is the answer; ``s(data)``
    gives a signature for chains, groups and chords (in a chain, a signature
    without data takes the previous task's result as its data).

    Raises:
        ValueError: both or neither of a topic and a deps-map, an illegal topic
            name, a deps-map pipeline without a name, or a bad constant deps-map.
        TypeError: ``deps`` is neither a deps-map nor a function.
    """

    name: str
    app: Celery
    timeout: float | None

    def __new__(cls, topic: str | None = None, *, deps: Any = None, **_: Any) -> Pipeline:
        if cls is Pipeline:
            if (topic is None) == (deps is None):
                raise ValueError("a Pipeline takes either a root topic or a deps-map (deps=...), not both")
            cls = TopicPipeline if topic is not None else DepsPipeline
        return super().__new__(cls)

    def _kwargs(self, data: Any, timeout: float | None, wait: bool, key: str | None) -> dict[str, Any]:
        raise NotImplementedError

    def _options(self) -> dict[str, Any]:
        return {}

    def s(self, data: Any = None, *, timeout: float | None = None, wait: bool = True,
          key: str | None = None) -> Signature:
        """A signature of this pipeline for ``data`` (for canvas composition).

        Parameters:
            data: the input (None in a chain: the previous task's result).
            timeout: seconds to wait for the answer (default: the pipeline's, then ``fusion_default_timeout``).
            wait: False to send without waiting (a topic pipeline only): the answer is the delivery record.
            key: the request's Kafka key (a topic pipeline only; default: the request's id, which
                spreads requests over the topic's partitions).  Requests with the same key land on
                one partition, in the order they were sent.

        Returns:
            The signature.

        Raises:
            ValueError: ``wait=False`` or a ``key`` for a deps-map pipeline.
            TypeError: a ``key`` that is not a string.
        """
        # A span current here (the caller's own) becomes the parent of the pipeline's spans.
        return tracing.carry(self.app, self.app.signature(self.name, kwargs=self._kwargs(data, timeout, wait,
                                                                                     check_key(key)),
                                                          **self._options()))

    def si(self, data: Any = None, *, timeout: float | None = None, wait: bool = True,
           key: str | None = None) -> Signature:
        """An immutable signature (ignores the previous task's result in a chain); see :meth:`s`."""
        return self.s(data, timeout=timeout, wait=wait, key=key).set(immutable=True)

    def delay(self, data: Any = None, *, timeout: float | None = None, wait: bool = True,
              key: str | None = None) -> AsyncResult:
        """Start the pipeline for ``data``; ``.get()`` on the result gives the answer (arguments: see :meth:`s`)."""
        return self.s(data, timeout=timeout, wait=wait, key=key).apply_async()

    def apply_async(self, args: tuple = (), kwargs: dict[str, Any] | None = None, **options: Any) -> AsyncResult:
        """Like :meth:`celery.Task.apply_async`: ``args`` may hold the data, ``kwargs`` timeout/wait/key."""
        kwargs = dict(kwargs or {})
        sig = self.s(args[0] if args else kwargs.pop("data", None), timeout=kwargs.pop("timeout", None),
                     wait=kwargs.pop("wait", True), key=kwargs.pop("key", None))
        return sig.apply_async(**options)

    def __call__(self, data: Any = None, *, timeout: float | None = None, key: str | None = None) -> Any:
        """Start the pipeline and wait for its answer (from outside any task)."""
        return self.delay(data, timeout=timeout, key=key).get(timeout=(timeout or self.timeout or 3600) + 30)


def _app(app: Celery | None) -> Celery:
    from . import app as default_app
    return app or default_app


class TopicPipeline(Pipeline):
    """A pipeline that sends its input to one topic (a reactor or any service) and waits for the answer.

    Runs as the shared task ``fusion.pipeline``; ``wait=False`` returns the
    Kafka delivery record instead of the answer.
    """

    def __init__(self, topic: str, *, timeout: float | None = None, app: Celery | None = None,
                 reply: str | None = None, **task_options: Any) -> None:
        if not valid_topic_name(topic):
            raise ValueError(f"pipeline topic {topic!r} is not a legal Kafka topic name")
        self.reply = None if reply is None else check_name(reply, f"pipeline {topic!r}: reply")
        self.app, self.topic, self.timeout, self.name = _app(app), topic, timeout, PIPELINE_TASK
        self.task = self.app.tasks[PIPELINE_TASK] if PIPELINE_TASK in self.app.tasks else None
        self._task_options = {"shadow": f"{PIPELINE_TASK}[{topic}]", **task_options}

    def _options(self) -> dict[str, Any]:
        return self._task_options

    def _kwargs(self, data: Any, timeout: float | None, wait: bool, key: str | None) -> dict[str, Any]:
        kwargs = {"data": data, "timeout": timeout or self.timeout, "topic": self.topic, "wait": wait}
        if key is not None:  # absent otherwise: a worker that predates keys takes the call as before
            kwargs["key"] = key
        if self.reply is not None:
            kwargs["reply"] = self.reply
        return kwargs


class DepsPipeline(Pipeline):
    """A pipeline over a deps-map of services, with a ``combine(data, results)`` step.

    Registers ``fusion.pipeline.<name>`` and ``fusion.pipeline.<name>.combine``.
    """

    def __init__(self, topic: None = None, *, deps: Any, combine: Callable[[Any, dict[str, Any]], Any] | None = None,
                 name: str | None = None, timeout: float | None = None, app: Celery | None = None,
                 reply: str | None = None, **task_options: Any) -> None:
        if not callable(deps) and not isinstance(deps, Mapping):
            raise TypeError("deps must be a deps-map or a function of the input returning one")
        if isinstance(deps, Mapping):
            DepsGraph(deps)
        if not name:
            raise ValueError("a deps-map pipeline needs a name (its Celery task is fusion.pipeline.<name>)")
        self.app, self.topic, self.timeout, self.name = _app(app), None, timeout, f"{PIPELINE_TASK}.{name}"
        combine_fn = staticmethod(combine) if combine else None
        options = {**RUN_OPTIONS, **task_options}
        self.task = self.app.task(
            name=self.name, base=PipelineTask, bind=True, shared=False, lazy=False,
            deps_fn=staticmethod(deps) if callable(deps) else deps, combine_fn=combine_fn,
            default_timeout=timeout, **options,
            reply_channel=None if reply is None else check_name(reply, f"pipeline {name!r}: reply"))(PipelineTask.run)
        self.app.task(name=self.task.finish_name, base=CombineTask, bind=True, shared=False, lazy=False,
                      combine_fn=combine_fn, **options)(CombineTask.run)

    def _kwargs(self, data: Any, timeout: float | None, wait: bool, key: str | None) -> dict[str, Any]:
        if not wait:
            raise ValueError("a deps-map pipeline always waits for its services")
        if key is not None:
            raise ValueError("a deps-map pipeline sends no request of its own: give its deps a 'key' in the "
                             "deps-map instead")
        return {"data": data, "timeout": timeout or self.timeout}
