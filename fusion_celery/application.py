"""The fusion Celery app, and :func:`install` for users who bring their own app."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from celery import Celery
from celery.signals import import_modules

from .config import defaults, stack_env

__all__ = ["app", "install", "create_app"]

#: 0, 0.5, 1, ... 3, 3, ... seconds between tries: about 60 s in all.
_OUTAGE_RETRY: dict[str, Any] = {"max_retries": 24, "interval_start": 0, "interval_step": 0.5, "interval_max": 3}

_CELERY_DEFAULTS: dict[str, Any] = {
    # Flower needs events; fusion turns them on by default.
    "worker_send_task_events": True,
    # Off (Celery's default): Celery's task-sent event carries the task's real name,
    # not its shadow name, and when it reaches Flower after task-received it would
    # rename e.g. "fusion.dispatch[add]" back to "fusion.dispatch".
    "task_send_sent_event": False,
    "result_extended": True,
    "task_serializer": "json",
    "result_serializer": "json",
    "accept_content": ["json"],
    # Waits may last hours: keep results and chord counters for a week.
    "result_expires": timedelta(days=7),
    "result_chord_expires": timedelta(days=7),
    "broker_connection_retry_on_startup": True,
    # Ride out a Redis (broker or result backend) outage of about a minute, like Kafka calls do
    # (fusion_kafka_retry_timeout): a task published or a result stored while Redis restarts
    # waits for it instead of failing after Celery's default second or twenty.
    "task_publish_retry_policy": _OUTAGE_RETRY,
    # Celery's consumer, but a lost broker connection with tasks prefetched does not stop the worker
    # (see fusion_celery.worker.Consumer).
    "worker_consumer": "fusion_celery.worker:Consumer",
    "result_backend_transport_options": {"retry_policy": _OUTAGE_RETRY},
}


def install(app: Celery) -> Celery:
    """Add fusion-celery to ``app``: its settings, its built-in tasks and its worker bootsteps.

    Settings the user already set win over fusion's defaults.  Installing twice
    changes nothing.

    Parameters:
        app: the app.

    Returns:
        ``app`` itself.
    """
    if getattr(app, "_fusion_installed", False):
        return app
    app.add_defaults(lambda: {**_CELERY_DEFAULTS, **defaults()})
    from .dispatch import register_dispatch
    from .pipeline import register_pipeline
    from .worker import FusionStep, RestorePrefetched
    register_dispatch(app)
    register_pipeline(app)
    app.steps["worker"].add(FusionStep)
    app.steps["consumer"].add(RestorePrefetched)

    @import_modules.connect(weak=False)
    def _import_reactors(sender: Any = None, **_: Any) -> None:
        # Reactor modules must be imported before the pool forks its children.
        if sender is None or sender is app:
            from .worker import import_reactor_modules
            import_reactor_modules(app)

    from . import control  # noqa: F401  (remote control commands for `celery fusion status`)
    app._fusion_installed = True  # type: ignore[attr-defined]
    return app


def create_app(main: str = "fusion_celery", **kwargs: Any) -> Celery:
    """A new Celery app with fusion-celery installed.

    Parameters:
        main: the app's name (Celery's ``main``).
        kwargs: passed to :class:`celery.Celery`; ``broker`` and ``backend`` default
            to the local stack's Redis (``.stack/env``, else ``127.0.0.1:6379``).

    Returns:
        The app.
    """
    local = stack_env()
    kwargs.setdefault("broker", local.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"))
    kwargs.setdefault("backend", local.get("CELERY_RESULT_BACKEND", "redis://127.0.0.1:6379/1"))
    return install(Celery(main, **kwargs))


app = create_app()
