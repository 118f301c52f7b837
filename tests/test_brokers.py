"""The Redis-transport workarounds of the worker apply on kombu's Redis transport only (fast tier).

kombu's Redis transport needs a worker's help to put prefetched messages back after a lost connection
(:class:`fusion_celery.worker.RestorePrefetched`, :class:`fusion_celery.worker.Consumer`); RabbitMQ puts
them back itself, and the workarounds stay out of its way.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from celery import Celery

from fusion_celery.brokers import broker_driver, needs_redis_workarounds
from fusion_celery.worker import RestorePrefetched

URLS = [
    ("redis://127.0.0.1:1/0", "redis", True),
    ("rediss://127.0.0.1:1/0", "redis", True),
    ("sentinel://127.0.0.1:1", "redis", True),
    ("amqp://guest:guest@127.0.0.1:1//", "amqp", False),
    ("pyamqp://guest@127.0.0.1:1//", "amqp", False),
    ("memory://localhost/", "memory", False),
]


@pytest.mark.parametrize(("url", "driver", "redis"), URLS)
def test_the_broker_url_selects_the_transport_and_its_workarounds(url, driver, redis):
    app = Celery("brokers-test", broker=url, set_as_current=False)
    assert broker_driver(app) == driver
    assert needs_redis_workarounds(app) is redis


@pytest.mark.parametrize(("url", "driver", "redis"), URLS)
def test_the_restore_step_is_part_of_a_worker_on_redis_only(url, driver, redis):
    app = Celery("brokers-step", broker=url, set_as_current=False)
    step = RestorePrefetched.__new__(RestorePrefetched)  # include_if reads nothing of the step itself
    assert step.include_if(SimpleNamespace(app=app)) is redis


def test_the_selection_does_not_connect():
    """A broker that is away (nothing listens on port 1) does not change the answer, nor delay it."""
    import time
    app = Celery("brokers-away", broker="amqp://guest@127.0.0.1:1//", set_as_current=False)
    t0 = time.monotonic()
    assert not needs_redis_workarounds(app)
    assert time.monotonic() - t0 < 1.0
