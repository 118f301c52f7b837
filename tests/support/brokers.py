"""The Celery broker of the stack (Redis, or RabbitMQ with ``FUSION_BROKER=rabbitmq``), as the tests see it.

The tests that touch the broker run on either: ``make test`` on Redis, ``make test-rabbitmq`` on RabbitMQ
(tests marked ``broker`` again, and those marked ``rabbitmq``).  This module tells them which one runs,
gives an isolated deployment a broker of its own on it (a Redis database, or a RabbitMQ vhost), and
counts the tasks a broker holds: queued, and delivered but not acknowledged.
"""

from __future__ import annotations

import os
import subprocess
from urllib.parse import quote, unquote, urlsplit

import pytest

from fusion_celery.config import stack_env
from support.stack import BROKER, ROOT

__all__ = ["BROKER_SERVICE", "delete_vhosts", "is_rabbitmq", "isolated_broker", "rabbitmqctl", "task_counts"]

#: The RabbitMQ vhosts :func:`isolated_broker` made in this process (:func:`delete_vhosts` removes them).
VHOSTS: list[str] = []


def is_rabbitmq(url: str = BROKER) -> bool:
    """Whether ``url`` (by default the stack's broker) is an AMQP broker."""
    return url.startswith(("amqp://", "pyamqp://", "amqps://"))


#: The stack service (stack/stack.sh) that is the Celery broker.
BROKER_SERVICE = "rabbitmq" if is_rabbitmq() else "redis"


def _stack_env() -> dict[str, str]:
    """The stack's ports (``.stack/env``) for stack/stack.sh, under this process's environment."""
    return {**stack_env(ROOT / ".stack" / "env"), **os.environ}


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    """Run Debian's ``rabbitmqctl ARGS`` against the stack's node (``stack.sh rabbitmqctl``); fail the test
    with its output if it fails."""
    proc = subprocess.run(["bash", str(ROOT / "stack" / "stack.sh"), "rabbitmqctl", "-q", *args], env=_stack_env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"rabbitmqctl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def isolated_broker(db: int, tag: str) -> str:
    """A broker URL of its own for an isolated deployment: Redis database ``db`` of the stack's Redis, or on
    RabbitMQ a new vhost named after ``tag`` (guest may use it)."""
    if not is_rabbitmq():
        return f"{BROKER.rsplit('/', 1)[0]}/{db}"
    vhost = f"fusion-{tag}"
    rabbitmqctl("add_vhost", vhost)
    VHOSTS.append(vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    return f"{BROKER.rsplit('/', 1)[0].rstrip('/')}/{quote(vhost, safe='')}"


def _vhost(url: str) -> str:
    """The vhost an AMQP URL names: its path without the leading slash (``amqp://h//`` is ``/``)."""
    return unquote(urlsplit(url).path[1:]) or "/"


def task_counts(url: str, queue: str = "celery") -> tuple[int, int]:
    """(queued, delivered and not acknowledged) tasks of ``queue`` on the broker at ``url``.

    Redis: the queue's list, and kombu's ``unacked`` hash (every queue's); RabbitMQ: the queue's ready
    and unacknowledged messages (``rabbitmqctl list_queues``).  Raises when the broker is unreachable."""
    if not is_rabbitmq(url):
        import redis
        r = redis.Redis.from_url(url)
        try:
            return int(r.llen(queue)), int(r.hlen("unacked"))
        finally:
            r.close()
    out = subprocess.run(["bash", str(ROOT / "stack" / "stack.sh"), "rabbitmqctl", "-q", "list_queues", "-p",
                          _vhost(url), "name", "messages_ready", "messages_unacknowledged"], env=_stack_env(),
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise ConnectionError(f"rabbitmqctl list_queues: {out.stderr.strip() or out.stdout.strip()}")
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == queue:
            return int(parts[1]), int(parts[2])
    return 0, 0


def delete_vhosts() -> None:
    """Delete the vhosts this process made (their queues and messages with them)."""
    while VHOSTS:
        rabbitmqctl("delete_vhost", VHOSTS.pop())
