"""Where the local stack is: its endpoints, this test run's id and the checkout.

Endpoints come from the environment, then from ``.stack/env`` (written by
``make up``), then the stack's default ports.  Importing this module exports
them into ``os.environ`` so that apps and worker processes made by the tests
find the same services.  Nothing here connects to a service.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the checkout's fusion_celery, examples and tests.apps

from fusion_celery.config import stack_env  # noqa: E402 - after the checkout is on sys.path

__all__ = ["ROOT", "RUN_ID", "KAFKA", "BROKER", "BACKEND", "ZOOKEEPER", "endpoint"]

#: This run's id: in topic names, registry paths and Redis keys, so runs never share state.
RUN_ID = os.environ.setdefault("FUSION_TEST_RUN", uuid.uuid4().hex[:8])


def endpoint(name: str, default: str) -> str:
    """The value of the stack setting ``name``: the environment's, else ``.stack/env``'s, else ``default``."""
    return os.environ.get(name) or stack_env().get(name) or default


KAFKA = endpoint("FUSION_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
BROKER = endpoint("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
BACKEND = endpoint("CELERY_RESULT_BACKEND", "redis://127.0.0.1:6379/1")
ZOOKEEPER = endpoint("FUSION_ZOOKEEPER_HOSTS", "127.0.0.1:2181")

os.environ.update({"FUSION_KAFKA_BOOTSTRAP_SERVERS": KAFKA, "CELERY_BROKER_URL": BROKER,
                   "CELERY_RESULT_BACKEND": BACKEND, "FUSION_ZOOKEEPER_HOSTS": ZOOKEEPER,
                   "FUSION_TEST_REDIS": BACKEND})
