"""A fusion app that runs wholly inside the test process, and a real Celery worker for it in a thread.

:func:`in_process_app` wires every service fusion-celery needs to something in
this process: the Celery broker is kombu's ``memory://`` transport, the result
backend is Celery's Redis backend on a `fakeredis <https://pypi.org/project/fakeredis/>`_
server (Lua scripts included, which the run-once claims use), the registry is
``memory://``, and Kafka is an in-memory broker (:mod:`fusion_celery.testing.kafka`).
Each app gets its own of each, so two apps never see each other's records,
results or waits.

:func:`worker` starts a real ``celery worker`` (Celery's embedded test worker,
threads pool) with the app's bootsteps, fusion's included: its intakes read the
reactor topics and its waiter completes the parked tasks, exactly as in a
deployed worker.  Run one worker per app: the ``memory://`` registry gives every
waiter every wait.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from celery import Celery
from celery.contrib.testing.worker import TestWorkController, start_worker
from celery.signals import setup_logging

from ..application import create_app
from ..compat import current_app_restored, redis_backend_class
from ..config import reload
from .broker import SCHEME, Broker

try:
    import fakeredis
except ImportError as exc:  # pragma: no cover - a dev dependency
    raise ImportError(f"fusion_celery.testing.app needs fakeredis with Lua (pip install 'fakeredis[lua]', or "
                      f"fusion-celery's dev extra): {exc}") from None

__all__ = ["in_process_app", "worker", "kafka_broker", "fake_redis_backend"]

#: kombu's in-memory transport (a host named, so that kombu does not warn that it picked one).
MEMORY_BROKER = "memory://localhost/"


def _wait_readable(pubsub: Any, timeout: float | None) -> bool:
    """Wait for a pub/sub message the way a fakeredis connection can be waited on.

    Celery waits on the connection's socket with ``poll()``; a fakeredis connection has
    no socket, so this waits on the connection's own ``can_read`` instead (which blocks
    on an event until a message is queued: no busy loop).
    """
    wait = 1.0 if timeout is None else min(timeout, 1.0)
    if not pubsub.subscribed:
        return bool(pubsub.subscribed_event.wait(wait))
    connection = pubsub.connection
    return connection is None or bool(connection.can_read(timeout=wait))


def _fake_client(backend: Any, **params: Any) -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=backend.server, db=int(params.get("db") or 0))


def fake_redis_backend(server: fakeredis.FakeServer | None = None) -> type:
    """Celery's Redis result backend whose clients are :class:`fakeredis.FakeRedis` on ``server``.

    Celery makes one backend per thread; they all share the server, as they would share
    a Redis.  :func:`in_process_app` makes one class, with a server of its own, per app.
    """
    return redis_backend_class("FakeRedisBackend", _fake_client, _wait_readable,
                               server=server or fakeredis.FakeServer())


def in_process_app(name: str = "fusion-test", **conf: Any) -> Celery:
    """A fusion app whose Celery broker, result backend, registry and Kafka all live in this process.

    Define its reactors with ``@reactor(topic, app=the_app)`` and its pipelines with
    ``Pipeline(..., app=the_app)``, then serve them with :func:`worker`.

    Parameters:
        name: the app's name (Celery's ``main``); also the start of the names of its
            in-memory Kafka broker and registry, made unique per call.
        conf: settings applied last (Celery's or ``fusion_*``), e.g.
            ``fusion_default_timeout=5``.

    Returns:
        The app; its in-memory Kafka broker is :func:`kafka_broker` ``(app)``.
    """
    tag = f"{name}-{uuid.uuid4().hex[:8]}"
    app = create_app(name, broker=MEMORY_BROKER, backend="redis://", set_as_current=False)
    # Celery takes CELERY_BROKER_URL / CELERY_RESULT_BACKEND from the environment over its config (a test
    # suite for the real stack sets them): the read and write URLs, and the backend class, take precedence.
    app.backend_cls = fake_redis_backend()
    app.conf.update(
        broker_read_url=MEMORY_BROKER,
        broker_write_url=MEMORY_BROKER,
        fusion_kafka_bootstrap_servers=f"{SCHEME}{tag}",
        fusion_registry_url=f"memory://{tag}",
        fusion_imports=[],
        fusion_startup_timeout=5.0,
        # Leave the test process's malloc as it is.
        fusion_malloc_arena_max=0,
        fusion_malloc_mmap_threshold=0,
        # kombu's memory transport is process-wide: a queue of this app's own keeps its tasks
        # from workers of other apps, and a short polling interval keeps a hop of a canvas fast.
        task_default_queue=f"fusion.{tag}",
        broker_transport_options={"polling_interval": 0.01},
        # Nobody listens for events in a test, and the memory transport would keep them all.
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
    )
    app.conf.update(conf)
    reload(app)
    return app


def kafka_broker(app: Celery) -> Broker:
    """The in-memory Kafka broker of an app made by :func:`in_process_app` (to inspect it, or take it down).

    Parameters:
        app: the app.

    Returns:
        The :class:`~fusion_celery.testing.broker.Broker` its ``fusion_kafka_bootstrap_servers`` names.

    Raises:
        KafkaException: the app's Kafka is not an in-memory broker.
    """
    return Broker.for_servers(app.conf.fusion_kafka_bootstrap_servers)


class _WorkController(TestWorkController):
    """Celery's embedded test worker, which reports a failed start instead of waiting for ever."""

    ready_timeout: float = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._settled = threading.Event()  # consumer ready, or the worker stopped
        self.stopped = threading.Event()
        super().__init__(*args, **kwargs)

    def on_consumer_ready(self, consumer: Any) -> None:
        super().on_consumer_ready(consumer)
        self._settled.set()

    def stop(self, *args: Any, **kwargs: Any) -> None:
        self._settled.set()
        try:
            super().stop(*args, **kwargs)
        finally:
            self.stopped.set()

    def terminate(self, *args: Any, **kwargs: Any) -> None:
        self._settled.set()
        try:
            super().terminate(*args, **kwargs)
        finally:
            self.stopped.set()

    def ensure_started(self) -> None:
        if not self._settled.wait(self.ready_timeout):
            raise RuntimeError(f"the in-process worker did not start within {self.ready_timeout:g}s")
        if not self._on_started.is_set():
            raise RuntimeError("the in-process worker stopped while starting (fusion-celery logs why)")


def _leave_logging_alone(**_: Any) -> bool:
    """A ``setup_logging`` receiver: its presence keeps Celery from reconfiguring the test process's logging."""
    return True


@contextmanager
def worker(app: Celery, *, concurrency: int = 4, hostname: str | None = None, loglevel: str = "WARNING",
           ready_timeout: float = 30.0, shutdown_timeout: float = 30.0) -> Iterator[Any]:
    """Run a real Celery worker for ``app`` in a thread of this process while the block runs.

    The worker uses the threads pool and all of ``app``'s bootsteps: fusion's starts the
    intakes of the reactors defined on ``app``, the waiter and the reaper before the block
    is entered, and stops them (a warm shutdown) when it is left.  The process's logging
    is left as it is, and the default and current Celery apps are restored afterwards.

    Parameters:
        app: the app, usually from :func:`in_process_app`.
        concurrency: threads running tasks.
        hostname: the worker's node name (default: a unique ``fusion-test-...@inprocess``).
        loglevel: level of the worker's own loggers.
        ready_timeout: seconds to wait for the worker to be up.
        shutdown_timeout: seconds to wait for it to stop.

    Yields:
        The worker (a :class:`celery.worker.WorkController`, whose ``stopped`` event is set once it
        has stopped); ``app._fusion_waiter`` is its waiter.

    Raises:
        RuntimeError: the worker did not start (fusion's bootstep logs why) or did not stop in time.
    """
    hostname = hostname or f"fusion-test-{uuid.uuid4().hex[:6]}@inprocess"

    def controller(**kwargs: Any) -> _WorkController:
        w = _WorkController(**kwargs)
        w.ready_timeout = ready_timeout
        return w

    with ExitStack() as stack:
        stack.enter_context(current_app_restored())
        setup_logging.connect(_leave_logging_alone)
        try:
            w = stack.enter_context(start_worker(
                app, concurrency=concurrency, pool="threads", loglevel=loglevel, perform_ping_check=False,
                shutdown_timeout=shutdown_timeout, WorkController=controller, hostname=hostname))
        finally:
            setup_logging.disconnect(_leave_logging_alone)
        try:
            yield w
        finally:
            _stop(app, w, shutdown_timeout)


def _stop(app: Celery, w: _WorkController, timeout: float) -> None:
    """Warm-shut the worker down and wait until it has: its consumer loop learns it from a remote-control
    message (at once), or else from the worker state's flag (within the loop's two-second drain)."""
    from celery.worker import state
    if app.conf.worker_enable_remote_control:
        app.control.shutdown(destination=[w.hostname])
    else:
        state.should_stop = 0
    try:
        if not w.stopped.wait(timeout):
            raise RuntimeError(f"the in-process worker {w.hostname} did not stop within {timeout:g}s")
    finally:
        state.should_stop = None
