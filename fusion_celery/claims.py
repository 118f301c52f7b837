"""Once-only markers in the result backend, so that duplicates do no harm.

Deferred completion is at-least-once: a wait may be completed twice (a waiter
died after completing but before removing the wait) and a Celery message may be
delivered twice.  The receivers are therefore idempotent: the dispatching subtask
claims its task id before it sends anything, and a reactor claims its task id
before it replies.  Claims are ``SET NX`` keys in the Redis result backend.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery, Task
from celery.exceptions import Ignore

from .errors import ConfigurationError

logger = logging.getLogger(__name__)

__all__ = ["claim", "extend", "release", "is_claimed", "once", "lifetime", "with_retry"]


def _client(app: Celery):
    client = getattr(app.backend, "client", None)
    if client is None or not hasattr(client, "set"):
        raise ConfigurationError(
            f"fusion-celery needs the Redis result backend (result_backend=redis://...), "
            f"got {type(app.backend).__name__}")
    return client


def lifetime(app: Celery) -> float:
    """Seconds a claim that guarded finished work is kept: as long as the results it guards
    (``result_expires``; a day when results never expire)."""
    value = app.conf.result_expires
    seconds = value.total_seconds() if hasattr(value, "total_seconds") else value
    return float(seconds or 86400)


def _key(name: str) -> str:
    return f"fusion-claim-{name}"


def with_retry(app: Celery, fun: Callable[..., Any], *args: Any) -> Any:
    """Run ``fun(*args)`` on the backend's Redis client, retrying while Redis is unreachable with the
    backend's own ``retry_policy`` (about a minute in the fusion app), as Celery does for results."""
    client = _client(app)
    ensure = getattr(app.backend, "ensure", None)
    if ensure is None:
        return fun(client, *args)
    return ensure(fun, (client, *args))


def _set_nx(client: Any, key: str, token: str, ttl: int) -> bool:
    # A retried SET whose first try went through (its reply lost with the connection) finds its own token.
    return bool(client.set(key, token, nx=True, ex=ttl)) or client.get(key) == token.encode()


def claim(app: Celery, name: str, ttl: float) -> bool:
    """Take the marker ``name`` for ``ttl`` seconds; False if somebody holds it already."""
    return with_retry(app, _set_nx, _key(name), uuid.uuid4().hex, max(1, int(ttl)))


def extend(app: Celery, name: str, ttl: float) -> None:
    """Keep a taken marker for ``ttl`` seconds from now."""
    with_retry(app, lambda c, k, t: c.expire(k, t), _key(name), max(1, int(ttl)))


def release(app: Celery, name: str) -> None:
    """Drop the marker (the claimed work failed before it did anything visible)."""
    with_retry(app, lambda c, k: c.delete(k), _key(name))


def is_claimed(app: Celery, name: str) -> bool:
    return bool(with_retry(app, lambda c, k: c.exists(k), _key(name)))


@contextmanager
def once(task: Task, step: str, lease: float | None = None) -> Iterator[None]:
    """Run the body once per delivery attempt of ``task`` (a duplicate message is ignored).

    The marker is keyed by task id and retry count, so Celery retries still run.
    It is a lease while the body runs (``lease`` seconds, default the task's hard
    time limit or 10 minutes: a worker that died mid-way does not block a
    redelivery for ever), kept as long as the results (``result_expires``) on
    success and dropped on failure.
    """
    app = task.app
    name = f"{step}-{task.request.id}-{task.request.retries or 0}"
    lease = lease or float(task.time_limit or app.conf.task_time_limit or 600)
    if not claim(app, name, lease):
        logger.info("%s %s: duplicate delivery ignored", step, task.request.id)
        raise Ignore()
    try:
        yield
    except BaseException:
        release(app, name)
        raise
    extend(app, name, lifetime(app))
