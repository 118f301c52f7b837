"""A run's processing result, kept until it was answered, so that its processing function runs once.

The processing step of a run can run again after its result existed: its worker
died between ``proc_fn`` and the end of its step (the step's copy runs once the
lease ran out), or its pool process died and Celery sent it again as a new
attempt.  The result is stored in the result backend under the run's id as soon
as ``proc_fn`` returns, and any later attempt or copy replies with the stored
result instead of calling ``proc_fn`` again.  Only a worker that dies between
``proc_fn`` returning and the result being stored (one Redis write) leaves the
function to run again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery

from .claims import lifetime, with_retry

__all__ = ["remembered", "key_of"]


def key_of(run_id: str) -> str:
    """The Redis key of the stored result of run ``run_id``."""
    return f"fusion-body-{run_id}"


def remembered(app: Celery, run_id: str, body: Callable[[], Any]) -> Any:
    """The result of ``body()`` for the run ``run_id``: the stored one if an earlier attempt stored it, else
    ``body()``'s, stored.

    A result the result serializer cannot encode is not stored (the reply and the
    result backend report it as they would anyway).

    Parameters:
        app: the app (its result backend keeps the result for ``result_expires``).
        run_id: the run.
        body: calls the processing function.

    Returns:
        The result.
    """
    key = key_of(run_id)
    raw = with_retry(app, lambda c, k: c.get(k), key)
    if raw is not None:
        return app.backend.decode(raw)
    value = body()
    try:
        encoded = app.backend.encode(value)
    except Exception:
        return value
    if not with_retry(app, lambda c, k: c.set(k, encoded, nx=True, ex=int(lifetime(app))), key):
        raw = with_retry(app, lambda c, k: c.get(k), key)  # a copy that ran alongside stored first
        if raw is not None:
            return app.backend.decode(raw)
    return value
