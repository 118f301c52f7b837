"""Wall-clock time in epoch milliseconds, the unit of every time fusion-celery puts on the wire.

Deadlines in requests, creation times in return-topic names and in registered
waits are all epoch milliseconds, so that processes on different machines (and
callers in other languages) compare them without conversions.
"""

from __future__ import annotations

import time

__all__ = ["now_ms"]


def now_ms() -> int:
    """The current wall-clock time, in milliseconds since the Unix epoch.

    Returns:
        The time as an integer number of milliseconds.
    """
    return int(time.time() * 1000)
