"""Keep a worker's memory from creeping up: glibc's per-thread malloc arenas.

A worker's main process runs many native threads (each librdkafka client has a
main thread and one per broker, and fusion-celery replaces its clients now and
then: see ``fusion_kafka_client_recycle_topics``).  glibc gives threads arenas of
their own, up to eight per core, and returns little of an arena's free memory to
the system: the process's resident memory then grows with the arenas' high-water
marks, not with what it holds (the 30-minute soak measured 157 MB taken from the
system for 29 MB in use).  Capping the number of arenas, as ``MALLOC_ARENA_MAX``
does, is the usual remedy; :func:`limit_malloc_arenas` does it from inside the
process, before the worker starts its threads and forks its pool.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

__all__ = ["limit_malloc_arenas"]

logger = logging.getLogger(__name__)

_M_ARENA_MAX = -8  # from glibc's malloc.h


def limit_malloc_arenas(count: int) -> bool:
    """Cap glibc's malloc arenas at ``count`` for threads that start from now on (and forked children).

    Returns False (and changes nothing) where the C library is not glibc or ``count`` is 0.
    The ``MALLOC_ARENA_MAX`` environment variable, when set, is left to win.
    """
    if count <= 0 or not sys.platform.startswith("linux"):
        return False
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(_M_ARENA_MAX, count) != 1:
        logger.debug("mallopt(M_ARENA_MAX, %d) was refused", count)
        return False
    return True
