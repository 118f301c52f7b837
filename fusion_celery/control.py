"""Remote control commands (``celery inspect fusion_status``) behind ``celery fusion status``."""

from __future__ import annotations

from typing import Any

from celery.worker.control import inspect_command

__all__ = ["fusion_status"]


@inspect_command(name="fusion_status")
def fusion_status(state: Any, **kwargs: Any) -> dict[str, Any]:
    """What this worker's waiter holds: pending waits, the oldest one, counts by topic."""
    waiter = getattr(state.consumer.app, "_fusion_waiter", None)
    if waiter is None:
        return {"running": False, "pending": 0}
    return {"running": waiter.is_alive(), **waiter.status()}
