"""The Kafka-dispatching subtask: send one dependency its request, then park until its reply.

``fusion.dispatch`` takes a return topic from its reply channel, registers the wait in the
durable registry (before anything is sent, so no reply can be missed), sends the
request and raises ``Ignore``: the worker slot is free again at once.  The waiter
completes the task when the reply arrives (see :mod:`fusion_celery.completion`).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from celery import Celery, Task
from celery.exceptions import Ignore

from . import answer, claims, dialects, faults, progress, tracing
from .canvas import merge_results
from .channels import Opened, channel
from .clients import clients
from .clock import now_ms
from .completion import resume_stored, save_request
from .config import settings
from .errors import DependencyFailed, FusionError, UnknownTopic
from .graph import Dep, inject
from .protocol import PARENT_HEADER, ROOT_HEADER, check_size
from .registry import Wait
from .returntopics import topic_config
from .run import Run
from .runtask import AnsweringTask
from .runtime import registry
from .signals import dependency_sent

__all__ = ["DispatchTask", "open_wait", "lineage_headers", "request_key", "no_such_topic"]

logger = logging.getLogger(__name__)


def lineage_headers(task: Task) -> list[tuple[str, bytes]]:
    """Headers that let a fusion reactor on the other side join this task's tree (root and parent ids).

    Optional for other services: they may ignore them.  With them, Flower shows
    a pipeline call and every reactor run and dependency it caused as one tree.
    """
    return [(ROOT_HEADER, (task.request.root_id or task.request.id).encode()),
            (PARENT_HEADER, task.request.id.encode())]


def request_key(task: Task, key: str | None) -> str:
    """The Kafka key of ``task``'s request: ``key`` if the caller gave one, else the request's id.

    The request's id is the task's id, fresh per request, so a topic's requests spread
    over its partitions (and so over the workers that read them); requests that share a
    caller's key land on one partition, in the order they were sent.
    """
    return task.request.id if key is None else key


def no_such_topic(topic: str, dep: str | None) -> DependencyFailed:
    """The failure of a request to ``topic``, which does not exist (``dep``: the dependency's name, if any)."""
    return DependencyFailed(f"{'dep ' + repr(dep) + ': ' if dep else ''}topic {topic!r} does not exist")


def open_wait(task: Task, *, topic: str, data: Any, timeout: float, dep: str | None = None,
              carry: dict[str, Any] | None = None, run: Run | None = None,
              deadline: int | None = None, key: str | None = None, reply: str | None = None,
              dialect: str | None = None) -> None:
    """Take a return topic, register the wait for ``task``, send the request, and park the task.

    Whether ``topic`` exists is asked of Kafka only when this process has not seen it
    lately (:meth:`~fusion_celery.clients.Clients.topic_exists` caches a positive answer);
    a topic deleted since is found out by the send, which Kafka then refuses.

    Parameters:
        task: the running task to park (a dispatching subtask or a pipeline).
        topic: the service's topic.
        data: the request's data.
        timeout: seconds to wait for the reply.
        dep: the dependency's name in its deps-map (None for a pipeline's call).
        carry: the results known so far, merged into the task's result.
        run: the reactor or pipeline run the dependency serves (a failure answers it).
        deadline: epoch ms after which nobody waits any more, whatever ``timeout`` says.
        key: the request's Kafka key (None: the task's id, see :func:`request_key`).
        reply: the reply channel (None: ``fusion_reply_channel``; see :mod:`fusion_celery.channels`).
        dialect: the dialect the service speaks (None: fusion's; see :mod:`fusion_celery.dialects`).

    Raises:
        Ignore: always, once the request is on its way (the waiter finishes the task).
        DependencyFailed: ``topic`` does not exist, or no longer does.
        FusionError: what else failed before the request was sent (a request too large, Kafka away).
    """
    app = task.app
    c = clients(app)
    if not c.topic_exists(topic):
        raise no_such_topic(topic, dep)
    created = now_ms()
    wait_deadline = created + int(timeout * 1000)
    if deadline is not None:
        wait_deadline = min(wait_deadline, int(deadline))
    speaks = dialects.dialect(dialect)
    body = speaks.encode_request(data, return_topic="", id=task.request.id, deadline=wait_deadline).value
    check_size(body, settings(app).max_message_bytes, f"the request to topic {topic!r}")

    opened = _open(task, reply, wait_deadline)
    return_topic = opened.return_topic
    # The span of the request: its trace context goes on the record and, for the reply's span, into the wait.
    with tracing.send(app, topic, task=task, **{"fusion.dep": dep, "fusion.return_topic": return_topic,
                                               "fusion.reply_channel": opened.channel}) as context:
        wait = Wait(id=task.request.id, return_topic=return_topic, topic=topic, deadline=wait_deadline,
                    request=save_request(task.request), task_name=task.request.shadow or task.name, dep=dep,
                    carry=carry, run=run, owner=task.request.hostname or "", created=created,
                    channel=opened.channel, offset=opened.offset, pool=opened.pool, dialect=speaks.name,
                    trace=context.get("traceparent"))
        # Before any reply can be completed.
        progress.parked(app, run.id if run else None, wait.id, json.dumps(opened.to_dict()),
                        (wait_deadline - created) / 1000 + 60)
        reg = registry(app)
        try:
            reg.register(wait)
            faults.point("dispatch.after-register")
            out = speaks.encode_request(data, return_topic=return_topic, id=task.request.id, deadline=wait_deadline)
            headers = out.headers + lineage_headers(task) + tracing.kafka_headers(context)
            c.produce(topic, out.value, key=request_key(task, key), headers=headers)
        except FusionError as exc:
            reg.remove(wait)
            ending = channel(app, opened.channel)
            ending.end(wait.id, opened, None)
            ending.tick(force=True)
            if isinstance(exc, UnknownTopic):
                raise no_such_topic(topic, dep) from None
            raise
        dependency_sent.send(sender=task, task_id=wait.id, topic=topic, return_topic=return_topic, dep=dep,
                             run_id=run.id if run else None, channel=opened.channel)
    raise Ignore()


def _open(task: Task, reply: str | None, deadline_ms: int) -> Opened:
    """The return topic of ``task``'s wait, from channel ``reply``: the one an earlier attempt registered
    the wait with, if any.

    An attempt that died after registering its wait leaves it in the registry, held by a
    waiter that reads the topic it names (from the offset it names); an attempt that runs
    again (its lease ran out, or Celery retried it after the worker was lost) registers
    the wait again under the same id, and must name the same topic in its request for that
    waiter to see the reply (:func:`fusion_celery.progress.parked` keeps it).
    """
    app, c = task.app, clients(task.app)
    known = progress.remembered_return_topic(app, task.request.id)
    if known:
        opened = Opened.from_dict(json.loads(known)) if known.startswith("{") else Opened(known)
        if opened.channel == "ephemeral" and not c.topic_exists(opened.return_topic, wait=0.5):
            c.create_topics([opened.return_topic], partitions=1, config=topic_config(app), visible=True)
        return opened
    return channel(app, reply).open(task.request.id, deadline_ms, task.request.hostname or "")


class DispatchTask(AnsweringTask):
    """Base of ``fusion.dispatch``: a failure before the wait is parked fails the run's dependency at once."""

    def run_of(self, task_id: str, kwargs: dict[str, Any]) -> Run | None:
        return Run.from_dict(kwargs.get("run"))

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        run = self.run_of(task_id, kwargs or {})
        if run is not None:
            answer.dependency_failed(self.app, run, exc, sender=self)


def dispatch(self: Task, prior: Any = None, *, dep: dict[str, Any], run: dict[str, Any] | None = None,
             deadline: int | None = None) -> Any:
    """Send one dependency its request (args with the results it depends on injected) and park."""
    d = Dep.from_dict(dep)
    # A duplicate delivery of this task (at-least-once) must not send the request twice.
    with claims.once(self, "dispatch", on_done=lambda: resume_stored(self)):
        carry = merge_results(prior)
        try:
            args = inject(d, carry)
            timeout = d.timeout or settings(self.app).default_timeout
            open_wait(self, topic=d.topic, data=args, timeout=timeout, dep=d.name, carry=carry,
                      run=Run.from_dict(run), deadline=deadline, key=d.key, reply=d.reply, dialect=d.dialect)
        except (Ignore, DependencyFailed):
            raise
        except Exception as exc:
            raise DependencyFailed(f"dep {d.name!r} (topic {d.topic!r}): {exc}") from exc
    return None  # unreachable: open_wait always raises


def register_dispatch(app: Celery) -> Task:
    return app.task(name="fusion.dispatch", bind=True, base=DispatchTask, shared=False,
                    **claims.RUN_OPTIONS)(dispatch)
