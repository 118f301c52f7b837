"""Signals for in-process observers, in the manner of :mod:`celery.signals`.

Each is sent in the process where the event happens; receivers take keyword
arguments (and ``**kwargs``, for arguments added later)::

    from fusion_celery.signals import dependency_sent, reactor_result

    @reactor_result.connect
    def seen(sender, task_id, message, result, exception, **kwargs):
        ...

``reactor_result``
    A reactor run answered (once per run): ``task_id``, ``message`` (the request
    as a dict), and ``result`` or ``exception``.  The successor of fusion-clj's
    result channel.
``reply_sent``
    Kafka took a reply to a run's caller: ``task_id`` (the run's), ``topic``
    (the reactor's; None for a pipeline run), ``return_topic``, ``status``
    (``ok`` or ``error``, as its ``fusion-status`` header says).
``dependency_sent``
    A dispatching subtask put its request on a dependency's topic: ``task_id``,
    ``topic``, ``return_topic``, ``dep`` (its name in the deps-map, None for a
    pipeline's call), ``run_id`` (the reactor or pipeline run it serves, if any),
    ``channel`` (the reply channel the return topic came from: ``leased``,
    ``shared`` or ``ephemeral``).
``wait_completed``
    A waiter completed a parked task with its reply: ``task_id``, ``topic``,
    ``dep``, ``run_id``, ``result``, ``runtime`` (seconds since the request was sent).
``wait_failed``
    A waiter completed a parked task with a failure other than a timeout (an
    error reply, an unreadable reply): the same arguments, ``exception`` for ``result``.
``wait_timed_out``
    A wait reached its deadline without a reply: ``task_id``, ``topic``, ``dep``,
    ``run_id``, ``exception`` (the :class:`~fusion_celery.errors.DependencyTimeout`).
``dead_lettered``
    An intake put a record it could not run on its reactor's dead-letter topic:
    ``topic`` (the reactor's), ``dlq`` (the dead-letter topic), ``partition``,
    ``offset``, ``reason``.
``topics_created``
    A process's Kafka clients created topics (any, return topics included):
    ``names``, those the controller created (not those that existed already).
``topics_deleted``
    A process's Kafka clients asked the controller to delete topics: ``names``.
"""

from celery.utils.dispatch import Signal

__all__ = ["reactor_result", "reply_sent", "dependency_sent", "wait_completed", "wait_failed", "wait_timed_out",
           "dead_lettered", "topics_created", "topics_deleted"]

reactor_result = Signal(name="fusion_reactor_result",
                        providing_args={"task_id", "message", "result", "exception"})
reply_sent = Signal(name="fusion_reply_sent", providing_args={"task_id", "topic", "return_topic", "status"})
dependency_sent = Signal(name="fusion_dependency_sent",
                         providing_args={"task_id", "topic", "return_topic", "dep", "run_id", "channel"})
wait_completed = Signal(name="fusion_wait_completed",
                        providing_args={"task_id", "topic", "dep", "run_id", "result", "runtime"})
wait_failed = Signal(name="fusion_wait_failed",
                     providing_args={"task_id", "topic", "dep", "run_id", "exception", "runtime"})
wait_timed_out = Signal(name="fusion_wait_timed_out",
                        providing_args={"task_id", "topic", "dep", "run_id", "exception"})
dead_lettered = Signal(name="fusion_dead_lettered",
                       providing_args={"topic", "dlq", "partition", "offset", "reason"})
topics_created = Signal(name="fusion_topics_created", providing_args={"names"})
topics_deleted = Signal(name="fusion_topics_deleted", providing_args={"names"})
