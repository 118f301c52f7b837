"""The durable registry of pending waits: the interface, and how to pick a backend.

A *wait* is a Celery task whose completion was deferred until a reply arrives on
its return topic.  It is registered before its request is sent, and removed once
its reply (or its timeout) was handled.  Because it lives outside the worker's
memory, a wait survives the crash of the worker that made it: the registry
divides the pending waits among the live workers' waiters, and whoever owns a
wait completes it from the reply Kafka kept.

Backends (one module each under :mod:`fusion_celery.backends`):

- ``kafka://<topic>`` — a compacted Kafka topic, divided by a consumer group (default);
- ``zookeeper://host:port/path`` — persistent znodes in buckets, divided with kazoo;
- ``memory://`` — one process only, for unit tests.
"""

from __future__ import annotations

import abc
import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal
from urllib.parse import urlparse

from celery import Celery

from .config import setting
from .errors import ConfigurationError

__all__ = ["Wait", "Change", "Registry", "Watcher", "registry_for", "now_ms"]


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Wait:
    """One pending wait: which task to complete, from which return topic, and how."""

    id: str
    return_topic: str
    topic: str
    deadline: int
    request: dict[str, Any]
    task_name: str = "fusion.dispatch"
    dep: str | None = None
    carry: dict[str, Any] | None = None
    reactor: dict[str, Any] | None = None
    owner: str = ""
    created: int = field(default_factory=now_ms)
    total: int | None = None

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> Wait:
        d = json.loads(raw)
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @property
    def label(self) -> str:
        return f"dep {self.dep!r} (topic {self.topic!r})" if self.dep else f"request to topic {self.topic!r}"


@dataclass(frozen=True)
class Change:
    """What a :class:`Watcher` reports: a wait it now owns, or waits it no longer owns."""

    kind: Literal["add", "remove", "drop"]
    wait: Wait | None = None
    ids: tuple[str, ...] = ()


class Watcher(abc.ABC):
    """A waiter's view of the registry: the waits this worker owns, as a stream of changes."""

    @abc.abstractmethod
    def poll(self, timeout: float) -> list[Change]:
        """Changes since the last call, waiting at most ``timeout`` seconds for the first one."""

    @abc.abstractmethod
    def close(self) -> None:
        """Leave: the waits this watcher owned go to the other workers."""


class Registry(abc.ABC):
    """Where pending waits are kept."""

    @abc.abstractmethod
    def register(self, wait: Wait) -> None:
        """Store ``wait`` durably; return only when it is stored (raise otherwise)."""

    @abc.abstractmethod
    def remove(self, wait: Wait) -> None:
        """Forget ``wait`` (its reply was handled).  Removing twice is harmless."""

    @abc.abstractmethod
    def watch(self, name: str) -> Watcher:
        """Join the waiters; ``name`` identifies this worker."""

    @abc.abstractmethod
    def pending(self) -> list[Wait]:
        """Every pending wait, whoever owns it (for the reaper and the CLI)."""

    @contextlib.contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        """Run a periodic job (e.g. the reaper) in one place at a time.

        Yields ``True`` when this process may run the job ``name`` now, ``False``
        when another one is running it (skip this round).  The default, for
        backends that cannot coordinate, always yields ``True``: the job must
        then be harmless to run in several places at once.
        """
        yield True

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release the registry's clients."""


def registry_for(app: Celery) -> Registry:
    """The registry the ``fusion_registry_url`` setting names."""
    url = setting(app, "fusion_registry_url")
    scheme = urlparse(url).scheme
    if scheme == "kafka":
        from .backends.kafka import KafkaRegistry
        return KafkaRegistry(app, url)
    if scheme == "zookeeper":
        from .backends.zookeeper import ZooKeeperRegistry
        return ZooKeeperRegistry(app, url)
    if scheme == "memory":
        from .backends.memory import MemoryRegistry
        return MemoryRegistry.shared(url)
    raise ConfigurationError(f"fusion_registry_url={url!r}: unknown scheme {scheme!r} "
                             f"(use kafka://, zookeeper:// or memory://)")
