"""The message a reactor receives: the Kafka record plus the decoded request."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Message"]


@dataclass
class Message:
    """One request taken from a reactor's topic.

    Carries what fusion-clj handed to its ``deps-fn`` (``topic``, ``partition``,
    ``offset``, ``key``, ``value``) plus the decoded parts of the request:
    ``data`` (the payload), ``return_topic``, ``id`` (the correlation id),
    ``deadline`` (epoch milliseconds or ``None``) and the Kafka ``headers``.
    ``dialect`` names the request/reply convention the caller speaks
    (:mod:`fusion_celery.dialects`); ``correlation`` is that dialect's correlation id as
    the caller sent it (Spring's raw bytes as hex) and ``reply_partition`` the partition
    of the return topic the caller asked for (Spring's ``kafka_replyPartition``).

    It travels inside Celery task messages, so everything in it is JSON.
    """

    topic: str
    data: Any = None
    return_topic: str | None = None
    id: str | None = None
    deadline: int | None = None
    partition: int | None = None
    offset: int | None = None
    key: str | None = None
    value: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    timestamp: int | None = None
    dialect: str = "fusion"
    correlation: str | None = None
    reply_partition: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the form in which a message travels through Celery)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Message:
        """Rebuild a message from :meth:`to_dict`'s output (unknown keys are ignored)."""
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    @property
    def expired(self) -> bool:
        """True once the request's deadline has passed: nobody waits for its answer any more."""
        return self.deadline is not None and time.time() * 1000 > self.deadline

    def __getitem__(self, key: str) -> Any:
        # fusion-clj's deps-fn read the message as a map: message["value"] etc.
        return getattr(self, key.replace("-", "_"))
