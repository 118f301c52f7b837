"""Per-process singletons: the registry client of this process, and the reactors of each app."""

from __future__ import annotations

import os
import threading

from celery import Celery

from .registry import Registry, registry_for

__all__ = ["registry", "close_registry", "reactors"]

_lock = threading.Lock()
_registries: dict[tuple[int, int], Registry] = {}


def _after_fork_in_child() -> None:
    # Another thread of the parent may have held the lock at the moment of the fork; the
    # parent's registry clients stay referenced in the dict (never used, never collected).
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def registry(app: Celery) -> Registry:
    """This process's registry client for ``app`` (a new one after a fork)."""
    key = (id(app), os.getpid())
    with _lock:
        found = _registries.get(key)
        if found is None:
            found = _registries[key] = registry_for(app)
        return found


def close_registry(app: Celery) -> None:
    with _lock:
        found = _registries.pop((id(app), os.getpid()), None)
    if found is not None:
        found.close()


def reactors(app: Celery) -> dict[str, str]:
    """``{topic: task name}`` of the reactors registered on ``app``."""
    found = getattr(app, "_fusion_reactors", None)
    if found is None:
        found = {}
        app._fusion_reactors = found  # type: ignore[attr-defined]
    return found
