"""Keeping the leases a process holds alive while it holds them.

A step holds its claim (:func:`fusion_celery.claims.once`) and a reply holds
``reply-<run id>`` (:mod:`fusion_celery.answer`) as a lease: a Redis key with a
time to live, so that a copy of the step takes over when the holder died.  A
holder that lives must not lose its lease however long it runs (a reply that
rides out a broker restart, a slow ``proc_fn``): one thread per process renews
every lease the process holds, a third of its time to live before it runs out.
A holder that dies stops renewing, and its lease ends at most one time to live
after it died.

The thread starts with the first lease a process takes (in a pool child, after
the fork) and stops when the process shuts down (``worker_process_shutdown``)
or exits.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from celery import Celery
from celery.signals import worker_process_shutdown

__all__ = ["held", "renewer", "Renewer"]

logger = logging.getLogger(__name__)

#: Renews the lease ``KEYS[1]`` for ``ARGV[2]`` seconds if it still holds this holder's token ``ARGV[1]``.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


@dataclass
class _Lease:
    app: Celery
    key: str
    token: str
    ttl: int
    due: float


class Renewer:
    """Renews the leases registered with :meth:`hold` until they are let go (one thread)."""

    def __init__(self) -> None:
        self._leases: dict[int, _Lease] = {}
        self._next = 0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.renewed = 0  # renewals done
        self.lost = 0  # leases found taken over (their holder was too slow to renew)

    def hold(self, app: Celery, key: str, token: str, ttl: int) -> int:
        """Renew ``key`` while it holds ``token``, every third of ``ttl``; returns a handle for :meth:`drop`."""
        with self._lock:
            self._next += 1
            handle = self._next
            self._leases[handle] = _Lease(app, key, token, ttl, time.monotonic() + max(0.5, ttl / 3))
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="fusion-lease-renewer", daemon=True)
                self._thread.start()
            self._wake.notify()
            return handle

    def drop(self, handle: int) -> None:
        """Stop renewing the lease ``handle``."""
        with self._lock:
            self._leases.pop(handle, None)

    def held(self) -> int:
        """How many leases are renewed now."""
        with self._lock:
            return len(self._leases)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (the leases it renewed end on their own)."""
        with self._lock:
            self._stopping = True
            thread, self._thread = self._thread, None
            self._wake.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                now = time.monotonic()
                due = [lease for lease in self._leases.values() if lease.due <= now]
                if not due:
                    nxt = min((lease.due for lease in self._leases.values()), default=now + 60)
                    self._wake.wait(max(0.05, nxt - now))
                    continue
                for lease in due:
                    lease.due = now + max(0.5, lease.ttl / 3)
            for lease in due:
                self._renew(lease)

    def _renew(self, lease: _Lease) -> None:
        client = getattr(lease.app.backend, "client", None)
        try:
            if client.eval(_RENEW, 1, lease.key, lease.token, lease.ttl):
                self.renewed += 1
            else:
                self.lost += 1
                logger.warning("lease %s was taken over while held (renewed too late?)", lease.key)
        except Exception as exc:  # Redis away: try again soon; the lease lasts a whole ttl
            logger.warning("cannot renew lease %s: %s", lease.key, exc)
            with self._lock:
                lease.due = time.monotonic() + 1.0


_renewer: Renewer | None = None
_pid = 0
_guard = threading.Lock()


def renewer() -> Renewer:
    """This process's renewer (a forked pool child gets its own)."""
    global _renewer, _pid
    with _guard:
        if _renewer is None or _pid != os.getpid():
            _renewer, _pid = Renewer(), os.getpid()
        return _renewer


@contextmanager
def held(app: Celery, key: str, token: str, ttl: int) -> Iterator[None]:
    """Keep the lease ``key`` (holding ``token``, ``ttl`` seconds) alive for the duration of the block."""
    r = renewer()
    handle = r.hold(app, key, token, ttl)
    try:
        yield
    finally:
        r.drop(handle)


def _stop(**_: Any) -> None:
    if _renewer is not None and _pid == os.getpid():
        _renewer.stop()


worker_process_shutdown.connect(_stop, weak=False)
atexit.register(_stop)
