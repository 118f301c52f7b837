"""Answering a run's caller: the one place that puts a reply on a return topic.

A run is answered exactly once, by whichever path gets there first:

* its processing step, with the result or the error of ``proc_fn`` (:func:`reply`);
* a dependency that failed or timed out, at once, without waiting for the
  other dependencies (:func:`dependency_failed`);
* Celery, when the task raised before its processing step (the task's
  ``on_failure``) or its pool process died (:func:`_worker_lost`, on
  ``task_failure``).

The lease ``reply-<run id>`` decides who answers; the others do nothing (see :func:`reply`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery import Celery, Task, states
from celery.exceptions import WorkerLostError
from celery.signals import task_failure

from . import claims, delivered, faults, keepalive, tracing
from .clients import clients
from .config import settings
from .dialects import dialect
from .errors import DependencyFailed, FusionError, ProtocolError
from .protocol import RUN_HEADER, STATUS_HEADER, check_return_topic, check_size, encode_error, encode_reply
from .returntopics import name_times
from .run import Caller, Run
from .signals import reactor_result, reply_sent

__all__ = ["send_reply", "reply", "dependency_failed"]

logger = logging.getLogger(__name__)

#: Seconds a missing return topic is looked for again before the reply is dropped: long for a
#: topic whose name says it was created within the last minute, short for any other.
NEW_TOPIC_PATIENCE = 10.0
OTHER_TOPIC_PATIENCE = 1.0


def _patience(app: Celery, topic: str) -> float:
    """Seconds to look again for a missing return topic before the reply is dropped.

    The controller confirms a creation before the brokers' metadata lists the
    topic; a fast service would otherwise drop its reply to a return topic its
    caller just made (librdkafka's ``topic.metadata.propagation.max.ms`` makes
    the same allowance for produce).  Return topics carry their creation time in
    their name (see :func:`~fusion_celery.returntopics.name_times`), so only
    young ones get the long wait and a reply to a topic its caller deleted does
    not hold a worker slot long.
    """
    created, _ = name_times(topic, settings(app).return_topic_prefix)
    young = created is not None and abs(time.time() * 1000 - created) < 60_000
    return NEW_TOPIC_PATIENCE if young else OTHER_TOPIC_PATIENCE


def send_reply(app: Celery, return_topic: str, corr_id: str | None, *, result: Any = None,
               exc: BaseException | None = None, caller: Caller | None = None,
               sent: Callable[[str], None] | None = None, run_id: str | None = None,
               task: Task | None = None) -> Any:
    """Put a success (``result``) or error (``exc``) reply on ``return_topic``.

    A result too large or not JSON becomes an error reply that says so.  The reply
    is written in the dialect ``caller`` speaks (:mod:`fusion_celery.dialects`; fusion's
    without a caller): a Spring caller gets its correlation id echoed and the
    partition it asked for, a Faust caller a ``ReqRepResponse`` record.

    Parameters:
        app: the fusion app.
        return_topic: the caller's return topic (checked against the prefix and the allowlist).
        corr_id: the request's id, echoed as the reply's key and ``fusion-id`` header.
        result: the answer, when ``exc`` is None.
        exc: the error to report instead.
        caller: the caller, whose dialect shapes the reply (None: fusion's).
        sent: called with the reply's status (``ok`` or ``error``) once Kafka took it.
        run_id: the id of the run that answers, sent as the header ``fusion-run-id``.
        task: the task replying, if any: outside any span (its ``on_failure``), its reply's span is a
            child of the span its message names (:mod:`fusion_celery.tracing`).

    Returns:
        The delivery record, or None when the return topic no longer exists (the
        caller gave up; the result stays in the result backend).

    Raises:
        ProtocolError: ``return_topic`` is not a topic a reply may go to.
        FusionError: Kafka stayed unreachable for ``fusion_kafka_retry_timeout``.
    """
    conf = settings(app)
    check_return_topic(return_topic, conf.return_topic_prefix, conf.reply_allowlist)
    limit = conf.max_message_bytes
    status = "ok"
    if exc is None:
        try:
            body = encode_reply(result)
            check_size(body, limit, "the reply")
        except ProtocolError as bad:
            exc = bad
    if exc is not None:
        status = "error"
        body = encode_error(type(exc).__name__, str(exc))
        body = body[:limit] if limit else body
    c = clients(app)
    if not c.topic_exists(return_topic, ttl=0, wait=_patience(app, return_topic)):
        logger.warning("return topic %s no longer exists (the caller gave up?); reply dropped", return_topic)
        return None
    out = dialect(caller.dialect if caller else None).encode_reply(caller or Caller(return_topic, corr_id), status,
                                                                   body)
    headers = out.headers if run_id is None else [*out.headers, (RUN_HEADER, run_id.encode())]
    about = caller.topic if caller is not None and caller.topic else None
    with tracing.send(app, return_topic, task=task, name=f"reply {about}" if about else "reply",
                      **{"fusion.status": status, "fusion.request_topic": about}) as context:
        record = c.produce(return_topic, out.value, key=out.key, headers=headers + tracing.kafka_headers(context),
                           partition=out.partition)
    if sent is not None:
        sent(status)
    return record


def reply(app: Celery, run: Run, *, result: Any = None, exc: BaseException | None = None, sender: Any = None,
          strict: bool = False, wait_held: bool = False) -> bool:
    """Answer ``run``'s caller with ``result`` or ``exc`` unless the run was answered already.

    The lease ``reply-<run id>`` guards the reply: taken before it is sent, renewed
    while Kafka is slow to take it, marked done once Kafka acknowledged it, and given
    back when it could not be sent, so that a later attempt may send it.  A reply
    whose sender died before Kafka took it is therefore sent by the next path that
    gets there, once the lease ran out.  Tells the
    :data:`~fusion_celery.signals.reactor_result` receivers, and the
    :data:`~fusion_celery.signals.reply_sent` ones once Kafka took the reply.

    Parameters:
        app: the fusion app.
        run: the run to answer.
        result: its answer, when ``exc`` is None.
        exc: its failure.
        sender: the task, for the signal.
        strict: raise when the reply cannot be sent even for an error (the caller retries).
        wait_held: while another path holds the lease, raise :class:`~fusion_celery.claims.Later`
            (the caller's step runs again when it may have run out) instead of leaving the
            answer to that path.

    Returns:
        False when another path answered first (or, without ``wait_held``, is answering
        now), True otherwise.

    Raises:
        FusionError: the reply could not be sent, for a result or with ``strict``
            (logged otherwise).
        Later: with ``wait_held``, another path holds the reply's lease.
    """
    name = f"reply-{run.id}"
    ttl = claims.lease(app, sender if isinstance(sender, Task) else None)
    state, token, left = claims.acquire(app, name, ttl)
    if state == "done":
        return False
    if state == "held":
        if wait_held:
            raise claims.Later(left + 1, f"another path is replying to run {run.id}")
        return False
    caller = run.caller
    statuses: list[str] = []
    if caller.return_topic:
        try:
            with keepalive.held(app, claims.key_of(name), token, int(ttl)):
                found = _sent_before(app, run, claims.attempt(app, name))
                if found is not None:
                    statuses.append(found)
                else:
                    send_reply(app, caller.return_topic, caller.id, result=result, exc=exc, caller=caller,
                               sent=statuses.append, run_id=run.id, task=sender if isinstance(sender, Task) else None)
                    faults.point("reply.after-send")
        except FusionError as err:
            logger.error("run %s: cannot reply to %s: %s", run.id, caller.return_topic, err)
            claims.give_back(app, name, token)
            if exc is None or strict:
                raise
        except BaseException:
            claims.finish(app, name)
            raise
        else:
            claims.finish(app, name)
            for status in statuses:
                reply_sent.send(sender=app, task_id=run.id, topic=run.topic, return_topic=caller.return_topic,
                                status=status)
    else:
        claims.finish(app, name)
    reactor_result.send(sender=sender, task_id=run.id, message=caller.to_dict(), result=result, exception=exc)
    return True


def _sent_before(app: Celery, run: Run, earlier_ms: int | None) -> str | None:
    """The status of the reply an earlier attempt put on the return topic, if one did.

    ``earlier_ms`` is when that attempt started (None: there was none, nothing to look for). It ran out of
    the lease without marking it done: it may have died just after Kafka took the reply.

    Raises:
        FusionError: the return topic could not be read (the lease is given back; a later attempt looks again).
    """
    if earlier_ms is None:
        return None
    try:
        headers = delivered.on_topic(app, run.caller.return_topic, earlier_ms, RUN_HEADER, run.id)
    except Exception as exc:
        raise FusionError(f"cannot look for an earlier reply on {run.caller.return_topic}: {exc}") from exc
    if headers is None:
        return None
    logger.warning("run %s: an earlier attempt's reply is on %s already; not sent again", run.id,
                   run.caller.return_topic)
    return headers.get(STATUS_HEADER, b"ok").decode("utf-8", "replace")


def dependency_failed(app: Celery, run: Run, exc: BaseException, events: Any = None, strict: bool = False,
                      sender: Any = None) -> None:
    """Answer ``run``, whose dependency failed, with an error naming it, and fail the run's task.

    The run's task never reaches its processing step, so no worker stores its
    outcome or sends its ``task-failed`` event: both are done here (Flower would
    otherwise show it STARTED for ever).

    Parameters:
        app: the fusion app.
        run: the run the dependency served.
        exc: what went wrong (wrapped in :class:`DependencyFailed` unless it is one).
        events: a :class:`~fusion_celery.completion.Events` to send the event with
            (else the app's default dispatcher).
        strict: raise when the error reply cannot be sent (the caller retries).
        sender: the failed task, if any (see :func:`reply`).
    """
    failure = exc if isinstance(exc, DependencyFailed) else DependencyFailed(str(exc))
    if not reply(app, run, exc=failure, strict=strict, sender=sender):
        return
    app.backend.store_result(run.id, failure, states.FAILURE)
    fields = {"uuid": run.id, "exception": f"{type(failure).__name__}({str(failure)!r})", "traceback": ""}
    if events is not None:
        events.send("task-failed", **fields)
    elif app.conf.worker_send_task_events:
        try:
            with app.events.default_dispatcher() as dispatcher:
                dispatcher.send("task-failed", **fields)
        except Exception as err:  # events are best effort
            logger.warning("cannot send task-failed for %s: %s", run.id, err)


@task_failure.connect
def _worker_lost(sender: Any = None, task_id: str | None = None, exception: BaseException | None = None,
                 kwargs: dict[str, Any] | None = None, **_: Any) -> None:
    """A pool process died mid-task: Celery fails the task from the parent without calling
    ``on_failure``, so its run is answered here instead of letting its caller time out."""
    if not isinstance(exception, WorkerLostError) or task_id is None:
        return
    lost = getattr(sender, "on_worker_lost", None)
    if callable(lost):
        lost(task_id, kwargs or {}, exception)
