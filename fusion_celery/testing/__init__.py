"""Test helpers: run fusion-celery without Kafka, Redis or a worker process.

- :mod:`fusion_celery.testing.kafka`: confluent-kafka's ``Producer``, ``Consumer`` and
  ``AdminClient`` on an in-memory broker (``bootstrap.servers = "memory://<name>"``);
- :mod:`fusion_celery.testing.app`: :func:`in_process_app`, a fusion app whose Celery broker,
  result backend, registry and Kafka all live in this process, and :func:`worker`, a real
  Celery worker running in a thread of it.

The names are imported lazily, so that importing the Kafka stub does not import Celery.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Broker", "in_process_app", "worker"]


def __getattr__(name: str) -> Any:
    if name == "Broker":
        from .broker import Broker
        return Broker
    if name in ("in_process_app", "worker"):
        from . import app
        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
