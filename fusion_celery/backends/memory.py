"""An in-memory registry for unit tests (``memory://``): one process, every watcher owning every wait."""

from __future__ import annotations

import queue
import threading
from typing import Any, ClassVar

from ..registry import Change, Registry, Wait, Watcher

__all__ = ["MemoryRegistry", "MemoryWatcher"]


class MemoryRegistry(Registry):
    """Pending waits in a dict; every watcher sees every change (no division of work)."""

    _shared: ClassVar[dict[str, MemoryRegistry]] = {}

    def __init__(self) -> None:
        self._waits: dict[str, Wait] = {}
        self._watchers: list[MemoryWatcher] = []
        self._lock = threading.Lock()

    @classmethod
    def shared(cls, app: Any, url: str) -> MemoryRegistry:
        """The registry for ``url`` in this process, the same for every caller (so dispatches and the waiter meet).

        Parameters:
            app: unused (the :data:`~fusion_celery.registry.RegistryFactory` signature).
            url: ``memory://`` with anything after it; each distinct URL is a registry of its own.

        Returns:
            The registry.
        """
        return cls._shared.setdefault(url, cls())

    def register(self, wait: Wait) -> None:
        with self._lock:
            self._waits[wait.id] = wait
            for w in self._watchers:
                w.q.put(Change("add", wait=wait))

    def remove(self, wait: Wait) -> None:
        with self._lock:
            if self._waits.pop(wait.id, None) is not None:
                for w in self._watchers:
                    w.q.put(Change("remove", ids=(wait.id,)))

    def watch(self, name: str) -> MemoryWatcher:
        with self._lock:
            watcher = MemoryWatcher(self)
            for wait in self._waits.values():
                watcher.q.put(Change("add", wait=wait))
            self._watchers.append(watcher)
            return watcher

    def pending(self) -> list[Wait]:
        with self._lock:
            return list(self._waits.values())


class MemoryWatcher(Watcher):
    """Reports every change of its registry, in order, from a queue."""

    def __init__(self, registry: MemoryRegistry) -> None:
        self.registry = registry
        self.q: queue.Queue[Change] = queue.Queue()

    def poll(self, timeout: float) -> list[Change]:
        changes = []
        try:
            changes.append(self.q.get(timeout=timeout) if timeout > 0 else self.q.get_nowait())
            while True:
                changes.append(self.q.get_nowait())
        except queue.Empty:
            pass
        return changes

    def close(self) -> None:
        with self.registry._lock:
            if self in self.registry._watchers:
                self.registry._watchers.remove(self)
