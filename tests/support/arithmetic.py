"""The ``add`` and ``subtract`` reactors of the docs' main page and of examples/math, for an in-process app."""

from __future__ import annotations

from typing import Any

from celery import Celery

from fusion_celery import Message, reactor

__all__ = ["arithmetic"]


def arithmetic(app: Celery) -> None:
    """Define ``add`` (the sum of the data) and ``subtract`` (the first item less the others) on ``app``."""

    @reactor("add", app=app)
    def add(message: Message) -> Any:
        return sum(message.data)

    @reactor("subtract", app=app)
    def subtract(message: Message) -> Any:
        first, *rest = message.data
        return first - sum(rest)
