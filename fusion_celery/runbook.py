"""The book of runs an intake handed to Celery and that have not finished, kept where a successor finds it.

An intake sends a run again when its Celery message was lost (see
:meth:`fusion_celery.intake.ReactorIntake._resend_stalled`).  The runs it watches must
outlive the intake: a worker killed right after its Celery consumer popped a run's
message loses that message *and* its intake.  So each run is written down, before
its message is sent, in a Redis hash of its record's partition
(``fusion-inflight-<group>-<partition>``: run id -> the task's arguments and options),
and struck off once it finished.  The intake that is given a partition reads the
partition's hash and watches those runs as its own.
"""

from __future__ import annotations

import json
from typing import Any

from celery import Celery

from .claims import lifetime, with_retry

__all__ = ["RunBook", "MemoryRunBook"]


class RunBook:
    """The unfinished runs of one reactor's consumer group, by partition, in the Redis result backend."""

    def __init__(self, app: Celery, group: str) -> None:
        self.app, self.group = app, group

    def _key(self, partition: int) -> str:
        return f"fusion-inflight-{self.group}-{partition}"

    def add(self, partition: int, run_id: str, kwargs: dict[str, Any], options: dict[str, Any]) -> None:
        """Write the run down (before its message is sent: a run written down and never sent is sent later)."""
        def write(client: Any, key: str, value: str, ttl: int) -> None:
            with client.pipeline() as pipe:
                pipe.hset(key, run_id, value)
                pipe.expire(key, ttl)  # a partition nobody serves any more does not keep its book for ever
                pipe.execute()

        with_retry(self.app, write, self._key(partition),
                   json.dumps({"kwargs": kwargs, "options": options}, separators=(",", ":")),
                   int(lifetime(self.app)))

    def remove(self, runs: list[tuple[int, str]]) -> None:
        """Strike off finished runs, given as ``(partition, run id)``."""
        if not runs:
            return

        def strike(client: Any) -> None:
            with client.pipeline() as pipe:
                for partition, run_id in runs:
                    pipe.hdel(self._key(partition), run_id)
                pipe.execute()

        with_retry(self.app, strike)

    def read(self, partition: int) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
        """The unfinished runs of ``partition``: run id -> (kwargs, options)."""
        raw = with_retry(self.app, lambda c, k: c.hgetall(k), self._key(partition))
        out = {}
        for run_id, value in raw.items():
            entry = json.loads(value)
            out[run_id.decode() if isinstance(run_id, bytes) else run_id] = (entry["kwargs"], entry["options"])
        return out


class MemoryRunBook(RunBook):
    """A run book in a dict, for unit tests of the intake."""

    def __init__(self) -> None:
        self.parts: dict[int, dict[str, tuple[dict[str, Any], dict[str, Any]]]] = {}

    def add(self, partition: int, run_id: str, kwargs: dict[str, Any], options: dict[str, Any]) -> None:
        self.parts.setdefault(partition, {})[run_id] = (kwargs, options)

    def remove(self, runs: list[tuple[int, str]]) -> None:
        for partition, run_id in runs:
            self.parts.get(partition, {}).pop(run_id, None)

    def read(self, partition: int) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
        return dict(self.parts.get(partition, {}))
