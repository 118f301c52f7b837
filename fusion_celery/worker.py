"""The worker bootstep: intake, waiter, reaper and metrics live as long as the worker.

It is a step of the ``worker`` blueprint (not the ``consumer`` one, which
restarts on every broker reconnect), runs in the worker's main process after the
pool started (so no Kafka handle exists before billiard forks its children), and
on warm shutdown closes the metrics server, stops the intake (commit), then the
waiter (its waits go to the other workers), then closes every client.  The
metrics (``fusion_metrics_port``) are made before the pool forks, so that its
children count what they do too (:mod:`fusion_celery.metrics`); so is the tracer
(``fusion_tracing``, :mod:`fusion_celery.tracing`).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps
from celery.signals import worker_process_shutdown

from . import compat
from .brokers import needs_redis_workarounds
from .clients import clients, close_clients
from .compat import Consumer
from .config import reload, settings
from .errors import ConfigurationError
from .intake import Intake
from .malloc import fix_mmap_threshold, limit_malloc_arenas
from .reaper import Reaper
from .runtime import close_registry, reactors
from .waiter import Waiter

__all__ = ["Consumer", "FusionStep", "RestorePrefetched", "check_backend", "import_reactor_modules"]

logger = logging.getLogger("fusion_celery")


def import_reactor_modules(app: Any) -> None:
    """Import the modules listed in ``fusion_imports`` (where the reactors are defined).

    Like Celery's own ``imports`` setting, modules in the current directory are
    found even when the ``celery`` console script does not put it on ``sys.path``.
    """
    for name in settings(app).imports or []:
        try:
            app.loader.import_from_cwd(name)
        except ImportError as exc:
            raise ConfigurationError(f"fusion_imports: cannot import {name!r}: {exc}") from None


def check_backend(app: Any) -> None:
    """Raise :class:`ConfigurationError` unless the result backend can count deferred chord parts."""
    from celery.backends.redis import RedisBackend
    from kombu.utils.url import maybe_sanitize_url
    backend = app.backend
    if not isinstance(backend, RedisBackend):
        raise ConfigurationError(
            f"result backend {maybe_sanitize_url(app.conf.result_backend)!r} ({type(backend).__name__}) cannot "
            f"run fusion-celery's chords; set result_backend / CELERY_RESULT_BACKEND to a redis:// URL")
    try:
        backend.client.ping()
    except Exception as exc:
        raise ConfigurationError(f"result backend {backend.as_uri()} is unreachable: {exc}") from None


class FusionStep(bootsteps.StartStopStep):
    """Runs fusion-celery's intake, waiter and reaper inside ``celery worker``."""

    requires = {compat.POOL_STEP}
    label = "fusion"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        compat.check_versions()
        conf = reload(worker.app)  # every config module is loaded by now
        # Before any of the worker's threads start and before its pool forks (children inherit it).
        limit_malloc_arenas(conf.malloc_arena_max)
        fix_mmap_threshold(conf.malloc_mmap_threshold)
        self.intake: Intake | None = None
        self.waiter: Waiter | None = None
        self.reaper: Reaper | None = None
        self.metrics: Any = None
        self.metrics_dir: str | None = None
        if conf.metrics_port:
            self._make_metrics(worker)
        if conf.tracing:
            self._start_tracing()

    def _start_tracing(self) -> None:
        """Make the tracer before the pool forks: the children inherit its provider, whose exporting
        thread the OpenTelemetry SDK starts again in each child."""
        from . import tracing
        try:
            tracing.setup()
        except ConfigurationError as exc:
            logger.critical("fusion-celery cannot start: %s", exc)
            raise SystemExit(1) from None

    def _make_metrics(self, worker: Any) -> None:
        """Make the metrics, in multiprocess mode when the pool forks (before it does)."""
        from .metrics import Metrics, multiprocess_dir, remove_dir
        path, made = multiprocess_dir(getattr(worker, "pool_cls", None))
        self.metrics_dir = path if made else None
        try:
            self.metrics = Metrics(worker.app, path)
        except ConfigurationError as exc:
            remove_dir(self.metrics_dir)
            logger.critical("fusion-celery cannot start: %s", exc)
            raise SystemExit(1) from None

    def start(self, worker: Any) -> None:
        app = worker.app
        try:
            import_reactor_modules(app)
            check_backend(app)
            clients(app).check_reachable(settings(app).startup_timeout)
            tasks = [app.tasks[name] for name in reactors(app).values()]
            self.waiter = Waiter(app, worker.hostname)
            self.waiter.start()
            if not self.waiter.ready.wait(30):
                raise ConfigurationError("the waiter did not start within 30s")
            if self.waiter.open_error is not None:
                err = self.waiter.open_error
                raise err if isinstance(err, ConfigurationError) else \
                    ConfigurationError(f"the waiter cannot start: {err}")
            self.intake = Intake(app)
            self.intake.start(tasks)
            self.reaper = Reaper(app)
            self.reaper.start()
            if self.metrics is not None:
                self.metrics.watch(self.waiter, self.intake)
                conf = settings(app)
                self.metrics.serve(conf.metrics_port, conf.metrics_address)
        except ConfigurationError as exc:
            logger.critical("fusion-celery cannot start: %s", exc)
            self.stop(worker)
            raise SystemExit(1) from None
        app._fusion_waiter = self.waiter
        app._fusion_metrics = self.metrics
        logger.info("fusion-celery: serving %s", ", ".join(sorted(reactors(app))) or "no reactor topics")

    def stop(self, worker: Any) -> None:
        if self.metrics is not None:
            from .metrics import remove_dir
            self.metrics.close()
            remove_dir(self.metrics_dir)
            self.metrics = self.metrics_dir = None
        if self.intake is not None:
            self.intake.stop()
        if self.reaper is not None:
            self.reaper.stop()
        if self.waiter is not None:
            self.waiter.stop()
        close_registry(worker.app)
        close_clients(worker.app)
        self.intake = self.waiter = self.reaper = None
        _flush_spans()

    def shutdown(self, worker: Any) -> None:
        self.stop(worker)


class RestorePrefetched(bootsteps.StartStopStep):
    """Consumer step: tasks this worker had prefetched when its broker connection broke go back to their queue.

    Celery forgets prefetched (reserved, not started) tasks when the connection to
    the broker breaks.  kombu's Redis transport moves them back to their queue as the
    channel closes, but that fails while Redis is away, and they then wait in the
    broker's ``unacked`` hash for the visibility timeout (an hour by default).  This
    step keeps their delivery tags as the connection goes and restores them as soon
    as it is back.  Restoring a tag twice is harmless (the message is gone from
    ``unacked`` after the first).  The step is part of a worker on kombu's Redis transport
    only: an AMQP broker (RabbitMQ) puts a closed channel's unacknowledged messages back
    on their queue itself (:mod:`fusion_celery.brokers`).
    """

    requires = {compat.TASKS_STEP}
    label = "fusion-restore"

    def include_if(self, c: Any) -> bool:
        return needs_redis_workarounds(c.app)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.pending: list[Any] = []

    def stop(self, c: Any) -> None:
        # What the closing channel could not restore is still in its QoS's delivered map.
        self.pending = compat.delivered_tags(compat.task_channel_qos(c))

    def start(self, c: Any) -> None:
        tags, self.pending = self.pending, []
        qos = compat.task_channel_qos(c)
        if not tags or not compat.can_restore_by_tag(qos):
            return
        restored = 0
        for tag in tags:
            try:
                compat.restore_by_tag(qos, tag)
                restored += 1
            except Exception as exc:  # the visibility timeout will bring it back
                logger.warning("cannot restore prefetched task %s: %s", tag, exc)
        logger.info("restored %d task(s) prefetched before the broker connection was lost", restored)


@worker_process_shutdown.connect
def _close_child_clients(**_: Any) -> None:
    """A pool child is exiting: flush and close the Kafka clients it made for its tasks."""
    from .clients import close_all_clients
    close_all_clients()
    _flush_spans()


def _flush_spans() -> None:
    """Export the spans this process still batches (nothing to do when it did not trace)."""
    from . import tracing
    tracing.flush()
