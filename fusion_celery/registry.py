"""The durable registry of pending waits: the interface, and how to pick a backend.

A *wait* is a Celery task whose completion was deferred until a reply arrives on
its return topic.  It is registered before its request is sent, and removed once
its reply (or its timeout) was handled.  Because it lives outside the worker's
memory, a wait survives the crash of the worker that made it: the registry
divides the pending waits among the live workers' waiters, and whoever owns a
wait completes it from the reply Kafka kept.

The ``fusion_registry_url`` setting names the backend by its URL scheme.  Backends
are found through the entry-point group ``fusion_celery.registries`` (see
:func:`registry_for`), so another package can add one; the built-in ones (one
module each under :mod:`fusion_celery.backends`) are:

- ``kafka://<topic>`` — a compacted Kafka topic, divided by a consumer group (default);
- ``zookeeper://host:port/path`` — persistent znodes in buckets, divided with kazoo;
- ``memory://`` — one process only, for unit tests.
"""

from __future__ import annotations

import abc
import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Literal
from urllib.parse import urlparse

from celery import Celery

from .clock import now_ms
from .config import settings
from .errors import ConfigurationError
from .run import Run

__all__ = ["Wait", "Change", "Registry", "Watcher", "RegistryFactory", "ENTRY_POINT_GROUP", "BUILTIN_REGISTRIES",
           "registry_for"]


@dataclass
class Wait:
    """One pending wait: which task to complete, from which return topic, and how.

    ``request`` is the parked task's saved request context
    (:func:`fusion_celery.completion.save_request`), ``carry`` the results its
    canvas step received, ``run`` the reactor or pipeline run a failure answers.
    Times are epoch milliseconds.  ``dialect`` is the one the service speaks
    (:mod:`fusion_celery.dialects`): the waiter reads the answer in it.  ``trace`` is the
    ``traceparent`` of the span that sent the request (``fusion_tracing``; None when off): the
    waiter's span for the reply is its child (:mod:`fusion_celery.tracing`).
    """

    id: str
    return_topic: str
    topic: str
    deadline: int
    request: dict[str, Any]
    task_name: str = "fusion.dispatch"
    dep: str | None = None
    carry: dict[str, Any] | None = None
    run: Run | None = None
    owner: str = ""
    created: int = field(default_factory=now_ms)
    channel: str = "ephemeral"
    offset: int = 0
    pool: str | None = None
    dialect: str = "fusion"
    trace: str | None = None

    def to_json(self) -> bytes:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["run"] = self.run.to_dict() if self.run else None
        if data["trace"] is None:
            del data["trace"]  # written only when tracing: a record stays as it was without it
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> Wait:
        d = json.loads(raw)
        names = {f.name for f in fields(cls)}
        values = {k: d[k] for k in names if k in d}
        # Records written before the run was typed name it "reactor".
        values["run"] = Run.from_dict(d.get("run") or d.get("reactor"))
        return cls(**values)

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
    """A waiter's view of the registry: the waits this worker owns, as a stream of changes.

    ``add`` reports a wait this watcher now owns (also one it was given by a
    rebalance), ``remove`` waits removed from the registry, ``drop`` waits it no
    longer owns (another watcher takes them).  The waiter calls :meth:`poll` from
    one thread only.
    """

    @abc.abstractmethod
    def poll(self, timeout: float) -> list[Change]:
        """The changes since the last call.

        Parameters:
            timeout: seconds to wait for the first change (0: do not wait).

        Returns:
            The changes, oldest first; empty when none came within ``timeout``.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Leave: the waits this watcher owned go to the other workers' watchers."""

    def owned(self) -> list[int] | None:
        """The registry partitions (Kafka) or buckets (ZooKeeper) this watcher owns now; None for a backend
        that does not divide the waits (every watcher sees them all).  Safe to call from another thread."""
        return None


class Registry(abc.ABC):
    """Where pending waits are kept.

    A backend implements the four abstract methods, and :meth:`exclusive` and
    :meth:`close` when it can coordinate or holds clients; it is made by a
    :data:`RegistryFactory` that :func:`registry_for` finds by the URL scheme.
    """

    @abc.abstractmethod
    def register(self, wait: Wait) -> None:
        """Store ``wait`` durably, returning only once it is stored.

        Parameters:
            wait: the wait; a wait with the same id replaces it.

        Raises:
            FusionError: the wait could not be stored (its request must then not be
                sent); :class:`~fusion_celery.errors.ConfigurationError` when the
                registry is unreachable or refuses access.
        """

    @abc.abstractmethod
    def remove(self, wait: Wait) -> None:
        """Forget ``wait``, whose reply was handled.  Removing twice, or a wait never stored, is harmless.

        Parameters:
            wait: the wait (its id is what counts).
        """

    @abc.abstractmethod
    def watch(self, name: str) -> Watcher:
        """Join the waiters that divide the pending waits among themselves.

        Parameters:
            name: identifies this worker (its hostname), in logs and the registry.

        Returns:
            A watcher reporting the waits this worker owns.
        """

    @abc.abstractmethod
    def pending(self) -> list[Wait]:
        """Every pending wait, whoever owns it (for the reaper and the CLI).

        Returns:
            The waits, in no particular order.
        """

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


#: What an entry point of :data:`ENTRY_POINT_GROUP` names: ``factory(app, url)`` returns the registry for ``url``.
RegistryFactory = Callable[[Celery, str], Registry]

#: The entry-point group registry backends are found in, by URL scheme.
ENTRY_POINT_GROUP = "fusion_celery.registries"

#: The built-in backends, as entry points (the package declares the same in its metadata; these keep a
#: source checkout that was never installed working).
BUILTIN_REGISTRIES: tuple[EntryPoint, ...] = (
    EntryPoint("kafka", "fusion_celery.backends.kafka:KafkaRegistry", ENTRY_POINT_GROUP),
    EntryPoint("zookeeper", "fusion_celery.backends.zookeeper:ZooKeeperRegistry", ENTRY_POINT_GROUP),
    EntryPoint("memory", "fusion_celery.backends.memory:MemoryRegistry.shared", ENTRY_POINT_GROUP),
)


def _backends() -> dict[str, EntryPoint]:
    """The registry backends by URL scheme: the built-in ones, then the installed entry points (which win)."""
    found = {ep.name: ep for ep in BUILTIN_REGISTRIES}
    found.update((ep.name, ep) for ep in entry_points(group=ENTRY_POINT_GROUP))
    return found


def registry_for(app: Celery) -> Registry:
    """A new registry client for the registry the ``fusion_registry_url`` setting names.

    The URL's scheme picks the backend: the entry point of that name in the group
    :data:`ENTRY_POINT_GROUP` names a :data:`RegistryFactory`, called with ``app``
    and the URL.  A package adds a backend by declaring one, e.g. in its
    ``pyproject.toml``::

        [project.entry-points."fusion_celery.registries"]
        redis = "mypackage.registry:RedisRegistry"

    Parameters:
        app: the app whose ``fusion_registry_url`` names the registry.

    Returns:
        The registry client (see :func:`fusion_celery.runtime.registry` for this
        process's shared one).

    Raises:
        ConfigurationError: no backend is known for the URL's scheme (the message
            names the scheme and the known ones), or the backend refuses the URL.
    """
    url = str(settings(app).registry_url)
    parsed = urlparse(url)
    scheme = parsed.scheme
    _userinfo, at, hostinfo = parsed.netloc.rpartition("@")
    shown = parsed._replace(netloc=f"***@{hostinfo}").geturl() if at else url  # never show a password
    backends = _backends()
    ep = backends.get(scheme)
    if ep is None:
        known = ", ".join(f"{name}://" for name in sorted(backends))
        raise ConfigurationError(f"fusion_registry_url={shown!r}: no registry backend for the scheme {scheme!r} "
                                 f"(known: {known}; a package adds one through the entry-point group "
                                 f"{ENTRY_POINT_GROUP!r})")
    try:
        factory: RegistryFactory = ep.load()
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"fusion_registry_url={shown!r}: cannot load the registry backend {ep.value!r} "
                                 f"for the scheme {scheme!r}: {exc}") from None
    return factory(app, url)
