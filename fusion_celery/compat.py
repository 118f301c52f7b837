"""The Celery and kombu internals fusion-celery relies on, in one place.

A worker on kombu's Redis transport whose broker connection breaks while it holds
prefetched tasks must put them back on their queue and must not stop (see
:class:`Consumer` and :class:`fusion_celery.worker.RestorePrefetched`; an AMQP broker
puts them back itself, :mod:`fusion_celery.brokers`).  Neither Celery nor kombu has a
public API for that, so this module reads and changes a few of their private
attributes, behind small functions the rest of the package calls:

* kombu's virtual ``QoS``: ``_delivered`` (the tags handed out and not yet
  acknowledged), ``restore_at_shutdown``, ``ack`` and ``reject``;
* kombu's Redis ``QoS.restore_by_tag``;
* kombu's ``Connection._default_channel`` and the virtual ``Channel._qos``;
* Celery's ``Consumer.on_connection_error_after_connected`` hook;
* Celery's ``_state`` module, whose current and default app a worker run
  inside a test process changes (:func:`current_app_restored`);
* Celery's ``RedisBackend._create_client`` and its result consumer's
  ``_wait_for_pubsub``, which the in-process test app replaces to serve results
  from fakeredis (:func:`redis_backend_class`);
* prometheus-client's ``values.ValueClass``, which it picks once, when first imported, from
  ``PROMETHEUS_MULTIPROC_DIR``; a worker that turns multiprocess mode on after something
  imported prometheus-client sets it (:func:`prometheus_multiprocess`);
* a result backend's ``_get_result_meta``, the meta ``store_result`` writes, which
  :mod:`fusion_celery.taskstate` writes itself only when the stored state allows
  (:func:`result_meta`).

``tests/test_compat.py`` fails when an installed Celery or kombu no longer has
one of them, and :func:`check_versions` warns at worker start when the
installed versions are outside the ranges :data:`VERIFIED` names.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

__all__ = [
    "VERIFIED",
    "POOL_STEP",
    "TASKS_STEP",
    "Consumer",
    "can_restore_by_tag",
    "check_versions",
    "current_app_restored",
    "default_channel_qos",
    "delivered_tags",
    "disarm",
    "redis_backend_class",
    "release",
    "prometheus_multiprocess",
    "restore_by_tag",
    "result_meta",
    "task_channel_qos",
    "unverified_versions",
]

logger = logging.getLogger("fusion_celery")

#: The Celery and kombu releases whose internals ``tests/test_compat.py`` was run against:
#: ``(lowest, above)``, the lowest release included and the first one above the range.
VERIFIED: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "celery": ((5, 4), (5, 8)),
    "kombu": ((5, 4), (5, 8)),
}

#: The bootsteps fusion's own steps start after: the worker's pool, and the consumer's task consumer.
POOL_STEP = "celery.worker.components:Pool"
TASKS_STEP = "celery.worker.consumer.tasks:Tasks"

_warned = False


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string, for comparisons: ``"5.7.0rc1"`` is ``(5, 7, 0)``."""
    found = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(part) for part in found.group().split(".")) if found else ()


def _span(name: str) -> str:
    lowest, above = VERIFIED[name]
    return f"{name} >={'.'.join(map(str, lowest))},<{'.'.join(map(str, above))}"


def unverified_versions() -> dict[str, str]:
    """The installed Celery and kombu versions outside :data:`VERIFIED`, by distribution name."""
    outside: dict[str, str] = {}
    for name, (lowest, above) in VERIFIED.items():
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            outside[name] = "not installed"
            continue
        if not lowest <= release(version) < above:
            outside[name] = version
    return outside


def check_versions() -> bool:
    """Warn once per process when Celery or kombu is outside :data:`VERIFIED`; true when both are inside.

    The worker calls it as it starts: with other versions, the internals this
    module uses may have changed, and a broken broker connection may then stop
    the worker or leave prefetched tasks in Redis for the visibility timeout.
    """
    global _warned
    outside = unverified_versions()
    if outside and not _warned:
        _warned = True
        installed = ", ".join(f"{name} {version}" for name, version in outside.items())
        logger.warning(
            "fusion-celery was verified with %s; this worker runs %s. It relies on internals of both "
            "(fusion_celery.compat) to restore prefetched tasks after a lost broker connection: "
            "run tests/test_compat.py against these versions",
            " and ".join(_span(name) for name in VERIFIED), installed)
    return not outside


def task_channel_qos(consumer: Any) -> Any:
    """The QoS of the channel a Celery worker consumer reads tasks from (``None`` before it has one)."""
    channel = getattr(getattr(consumer, "task_consumer", None), "channel", None)
    return getattr(channel, "qos", None)


def default_channel_qos(connection: Any) -> Any:
    """The QoS of ``connection``'s default channel if that channel and its QoS exist, else ``None``.

    Reads the attributes, not the ``default_channel`` and ``qos`` properties,
    which would open a channel on a connection that just broke.
    """
    channel = getattr(connection, "_default_channel", None)
    return getattr(channel, "_qos", None)


def delivered_tags(qos: Any) -> list[Any]:
    """The delivery tags of the messages ``qos`` handed out and that were not restored yet (none for ``None``)."""
    return list(getattr(qos, "_delivered", None) or ())


def can_restore_by_tag(qos: Any) -> bool:
    """Whether ``qos`` can put a message back by its delivery tag (kombu's Redis transport can).

    The Redis transport keeps unacknowledged messages in the broker, where a new
    channel finds them; in-memory transports lose them with their channel.
    """
    return callable(getattr(qos, "restore_by_tag", None))


def restore_by_tag(qos: Any, tag: Any) -> None:
    """Put the message delivered as ``tag`` back on its queue (a tag already restored: nothing happens)."""
    qos.restore_by_tag(tag)


def _gone(*_: Any, **__: Any) -> None:
    """Acknowledging on a channel whose connection is gone: nothing to do (see :func:`disarm`)."""


def disarm(qos: Any) -> None:
    """Make the QoS of a channel whose connection broke leave its messages alone.

    The closing channel does not try to restore them (its transport is torn down
    and kombu raises ``AttributeError``), and a late acknowledgement or rejection
    through it does nothing instead of raising.  :class:`fusion_celery.worker.RestorePrefetched`
    puts the messages back once the connection is back; a task that finished in
    between is run once by the claim of the step it carries.
    """
    qos.restore_at_shutdown = False
    qos.ack = qos.reject = _gone


class Consumer(CeleryConsumer):
    """Celery's worker consumer, made to survive a broker connection lost while tasks are prefetched.

    On a lost connection Celery 5.7 collects the broken connection and then closes it; kombu's
    Redis channel, closing, tries to put the prefetched messages back through a transport already
    torn down and raises ``AttributeError`` ("'NoneType' object has no attribute 'hostname'"),
    which stops the worker ("Unrecoverable error").  Those messages are put back by
    :class:`fusion_celery.worker.RestorePrefetched` once the connection is back, so the closing
    channel need not try.  The fusion app selects this class through Celery's ``worker_consumer``
    setting (as ``fusion_celery.worker:Consumer``).  On another transport (RabbitMQ: the broker puts
    a closed channel's unacknowledged messages back itself) it is Celery's consumer unchanged.
    """

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        from .brokers import needs_redis_workarounds
        if needs_redis_workarounds(self.app):
            for qos in (task_channel_qos(self), default_channel_qos(self.connection)):
                if qos is not None:
                    disarm(qos)
        super().on_connection_error_after_connected(exc)


@contextmanager
def current_app_restored() -> Iterator[None]:
    """Give Celery back the default and current app it had when the block began, and whether
    ``AsyncResult.get()`` refuses to block.

    A worker started in the block (``celery.contrib.testing.worker.start_worker``)
    makes its app the current and default one for the whole process, and its pool
    step marks the process as one whose ``get()`` would block a task (Celery's
    ``start_worker`` clears the mark only once the worker started, so a worker that
    failed to start leaves it set); a test process that goes on with other apps
    needs the previous state back.
    """
    from celery import _state
    previous_default, previous_current = _state.default_app, _state.get_current_app()
    previous_block = _state.task_join_will_block()
    try:
        yield
    finally:
        _state.set_default_app(previous_default)
        _state._set_current_app(previous_current)
        _state._set_task_join_will_block(previous_block)


def redis_backend_class(name: str, make_client: Any, wait_readable: Any, **attrs: Any) -> type:
    """Celery's Redis result backend, with its clients and its wait for results replaced.

    Parameters:
        name: the class's name.
        make_client: ``make_client(backend, **params) -> client``, called where Celery
            would connect to Redis (``params`` as Celery passes them: ``db``, ``host``, ...).
        wait_readable: ``wait_readable(pubsub, timeout) -> bool``, called where the
            result consumer waits for a pub/sub message on the connection's socket.
        attrs: more class attributes.

    Returns:
        A subclass of :class:`celery.backends.redis.RedisBackend`.
    """
    from celery.backends.redis import RedisBackend, ResultConsumer

    class _ResultConsumer(ResultConsumer):
        def _wait_for_pubsub(self, pubsub: Any, timeout: float | None) -> bool:
            return bool(wait_readable(pubsub, timeout))

    def _create_client(self: Any, **params: Any) -> Any:
        return make_client(self, **params)

    return type(name, (RedisBackend,), {"ResultConsumer": _ResultConsumer, "_create_client": _create_client,
                                        **attrs})


def result_meta(backend: Any, task_id: str, result: Any, state: str) -> dict[str, Any]:
    """The meta Celery's ``backend.store_result(task_id, result, state)`` would store, without storing it.

    Parameters:
        backend: the result backend.
        task_id: the task's id.
        result: the task's result (for a custom state: its meta, ``AsyncResult.info``).
        state: the state.

    Returns:
        The meta dict (``status``, ``result``, ``task_id``, ...), to be encoded with ``backend.encode``.
    """
    meta = backend._get_result_meta(result=result, state=state, traceback=None, request=None)
    meta["task_id"] = task_id
    return meta


def prometheus_multiprocess() -> None:
    """Make the prometheus-client metrics created from now on write their values to the files of
    ``PROMETHEUS_MULTIPROC_DIR`` (multiprocess mode), however early prometheus-client was imported."""
    from prometheus_client import values
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()
