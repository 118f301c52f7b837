"""Fault-injection points for the fault tests; inert unless a test switches one on.

A test starts a worker with ``FUSION_FAULT=<point>``.  At a crash point
(:func:`point`) the process ends itself abruptly (``os._exit``, as a ``kill -9``
would), so a crash can be placed exactly between two steps that must survive one;
at a loss point (:func:`lose`) the code skips a step, as if the message it sends
had been lost on the way.  With ``FUSION_FAULT_ONCE=<path>`` a point fires only if
``path`` does not exist yet (and creates it first), so the worker that takes over
does not crash at the same place.
"""

from __future__ import annotations

import logging
import os

__all__ = ["point", "lose"]

logger = logging.getLogger(__name__)


def _fires(name: str) -> bool:
    if os.environ.get("FUSION_FAULT") != name:
        return False
    marker = os.environ.get("FUSION_FAULT_ONCE")
    if marker:
        try:
            with open(marker, "x"):
                pass
        except FileExistsError:
            return False
    return True


def point(name: str) -> None:
    """End this process at once if the fault ``name`` is switched on (a no-op otherwise)."""
    if _fires(name):
        logger.critical("fault injection: %s; ending process %d", name, os.getpid())
        logging.shutdown()
        os._exit(137)


def lose(name: str) -> bool:
    """True if the step at ``name`` is to be skipped, as if its message were lost (False otherwise)."""
    if _fires(name):
        logger.critical("fault injection: %s; skipping the step", name)
        return True
    return False
