"""glibc malloc tuning for a worker: fewer arenas and a fixed mmap threshold, so resident memory stays flat.

A worker's main process runs many native threads: each librdkafka client has a
main thread and one per broker, and fusion-celery replaces its clients now and
then (``fusion_kafka_client_recycle_topics``).  Two glibc defaults then let the
process's resident memory grow with free memory glibc keeps rather than with
what the process holds:

- glibc gives threads malloc arenas of their own, up to eight per core, and
  returns little of an arena's free memory to the system, so resident memory
  follows the arenas' high-water marks.  :func:`limit_malloc_arenas` caps their
  number, as ``MALLOC_ARENA_MAX`` does (``fusion_malloc_arena_max``).
- When glibc frees a large block it served with a mapping of its own, it raises
  its mmap threshold to that block's size (up to 32 MB), so later large buffers
  (librdkafka's) come from the arenas and leave holes there.
  :func:`fix_mmap_threshold` pins the threshold, as ``MALLOC_MMAP_THRESHOLD_``
  does (``fusion_malloc_mmap_threshold``): large blocks keep their own mappings
  and go back to the system when freed.

Both are process-wide and apply to threads started afterwards, so the worker
sets them when it starts, before its threads start and its pool forks.  The
environment variables, when set, win.  Elsewhere than on glibc both do nothing.
The measurements behind the defaults are in ``docs/operations/reliability.md``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from typing import Any

__all__ = ["fix_mmap_threshold", "limit_malloc_arenas"]

logger = logging.getLogger(__name__)

# from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def _mallopt() -> Any:
    """glibc's ``mallopt``, or None where the C library has none (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt


def limit_malloc_arenas(count: int) -> bool:
    """Cap glibc's malloc arenas at ``count`` for threads that start from now on (and forked children).

    Parameters:
        count: the most arenas; 0 leaves glibc's default.

    Returns:
        True when the cap is set; False (nothing changed) where the C library is not
        glibc, ``count`` is 0, or ``MALLOC_ARENA_MAX`` is set (the environment wins).
    """
    if count <= 0 or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    mallopt = _mallopt()
    if mallopt is None:
        return False
    if mallopt(_M_ARENA_MAX, count) != 1:
        logger.debug("mallopt(M_ARENA_MAX, %d) was refused", count)
        return False
    return True


def fix_mmap_threshold(nbytes: int) -> bool:
    """Serve allocations of ``nbytes`` or more with mappings of their own, for good.

    Sets glibc's mmap threshold, and its trim threshold to the same size; setting
    either turns off glibc's raising of the mmap threshold.

    Parameters:
        nbytes: the threshold in bytes; 0 leaves glibc's default.

    Returns:
        True when the thresholds are set; False (nothing changed) where the C library
        is not glibc, ``nbytes`` is 0, or the environment sets either threshold
        (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES``):
        the environment wins.
    """
    if nbytes <= 0 or any(os.environ.get(v) for v in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.mmap_threshold" in tunables or "glibc.malloc.trim_threshold" in tunables:
        return False
    mallopt = _mallopt()
    if mallopt is None:
        return False
    if mallopt(_M_MMAP_THRESHOLD, nbytes) != 1 or mallopt(_M_TRIM_THRESHOLD, nbytes) != 1:
        logger.debug("mallopt(M_MMAP_THRESHOLD / M_TRIM_THRESHOLD, %d) was refused", nbytes)
        return False
    return True
