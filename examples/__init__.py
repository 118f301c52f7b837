"""Runnable examples for fusion-celery (each one has a test in tests/test_examples.py).

- :mod:`examples.math` -- the fusion-clj README's example: ``add``, ``subtract`` and ``math``.
- :mod:`examples.enrich` -- document enrichment: fetch, analyses in parallel, a summary, a combining step.
- :mod:`examples.plain_service` -- a dependency service written with confluent-kafka alone.
- :mod:`examples.demo` -- what ``make demo`` runs.

Topic names go through :func:`topic`, which prepends ``FUSION_EXAMPLES_PREFIX``
(empty unless set).  People leave it empty; the test suite sets it so that its
runs never share topics with anything else on the same Kafka cluster.
"""

from __future__ import annotations

import os

__all__ = ["topic"]


def topic(name: str) -> str:
    """The Kafka topic an example serves: ``FUSION_EXAMPLES_PREFIX`` + ``name``."""
    return os.environ.get("FUSION_EXAMPLES_PREFIX", "") + name
