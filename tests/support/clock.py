"""A settable clock for code that takes its clocks as arguments (the waiter, the book of waits)."""

from __future__ import annotations

__all__ = ["Clock"]


class Clock:
    """Both clocks, wall (``now_ms``) and monotonic, on one time base: ``t`` seconds, moved by :meth:`advance`."""

    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def now_ms(self) -> int:
        return int(self.t * 1000)

    def monotonic(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds
