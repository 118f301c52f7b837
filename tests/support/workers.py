"""Real ``celery -A fusion_celery worker`` processes, and the environments that keep them apart.

A worker serves the test reactors of ``tests/apps`` (or what ``imports`` names)
and logs to ``.stack/logs``.  :func:`isolated_env` gives a worker its own broker
and backend databases, registry and reactor topics, so it shares no work with
the session's workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass

import pytest

from support.brokers import isolated_broker
from support.stack import BACKEND, ROOT, RUN_ID, ZOOKEEPER
from support.waiting import wait_for

__all__ = ["REGISTRIES", "Deployment", "Worker", "isolated_env", "registry_url"]

#: The registry backends the worker-level suites run against (see the `deployment` fixture).
REGISTRIES = ("kafka", "zookeeper")


class Worker:
    """A real `celery -A fusion_celery worker` process."""

    def __init__(self, name: str, imports: str, pool: str = "prefork", concurrency: int = 2,
                 env: dict[str, str] | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.name = f"{name}-{uuid.uuid4().hex[:6]}@localhost"
        self.log_path = ROOT / ".stack" / "logs" / f"worker-{self.name.split('@')[0]}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "FUSION_IMPORTS": imports, "PYTHONPATH": str(ROOT), **(env or {})}
        self.cmd = [sys.executable, "-m", "celery", "-A", "fusion_celery", "worker", "-n", self.name,
                    "-P", pool, "-c", str(concurrency), "-l", "info", "--without-mingle", "--without-gossip",
                    *extra_args]
        self.proc: subprocess.Popen | None = None

    def start(self, ready_timeout: float = 60.0) -> Worker:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_for(lambda: self.proc.poll() is not None or b"fusion-celery: serving" in self.log_path.read_bytes(),
                 ready_timeout, f"worker {self.name} to start (log {self.log_path})", interval=0.2)
        if self.proc.poll() is not None:
            pytest.fail(f"worker {self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            pytest.fail(f"worker {self.name} did not stop within {timeout}s of SIGTERM")
        finally:
            self._log.close()

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()


@dataclass
class Deployment:
    """A worker serving tests/apps/services.py with one registry backend, and how to reach its reactors."""

    registry: str
    worker: Worker
    env: dict[str, str]  # what another worker needs to join it (empty: the default environment)
    run: str

    def topic(self, base: str) -> str:
        """The topic the test reactor ``base`` of this deployment serves."""
        return f"{self.run}.{base}"


def registry_url(registry: str, tag: str) -> str:
    """A registry of its own for ``registry`` (kafka | zookeeper), named after ``tag``."""
    if registry == "kafka":
        return f"kafka://fusion.waits.{tag}"
    if registry == "zookeeper":
        return f"zookeeper://{ZOOKEEPER}/fusion-{RUN_ID}{tag}"
    raise ValueError(f"unknown registry {registry!r}")


def isolated_env(registry: str = "kafka", db: int = 2) -> dict[str, str]:
    """Settings for workers that must not share work with the session worker.

    Their own Celery broker (Redis database ``db``, or a RabbitMQ vhost of their own) and backend
    database (``db + 1``), their own registry (a topic or ZooKeeper path, so their own waiters) and
    their own reactor topics (another run id).
    """
    tag = uuid.uuid4().hex[:6]
    return {"CELERY_BROKER_URL": isolated_broker(db, f"{RUN_ID}{tag}"),
            "CELERY_RESULT_BACKEND": f"{BACKEND.rsplit('/', 1)[0]}/{db + 1}",
            "FUSION_TEST_REDIS": BACKEND, "FUSION_REGISTRY_URL": registry_url(registry, tag),
            "FUSION_TEST_RUN": f"{RUN_ID}{tag}"}
