"""A run: one reactor or pipeline task serving one request, and the caller its answer goes to.

Every hop of a request carries the run it belongs to: the reactor's first step
builds it, the dispatching subtasks carry it in their arguments and their waits,
and whoever answers (the processing step, a failing dependency, a lost worker)
reads where the answer goes from it.  On the wire (Celery arguments, registry
records) it is the JSON object ``{"id", "topic", "message": {"return_topic", "id", "topic"}}`` (the message
also has ``dialect``, ``correlation``, ``reply_partition`` and ``key`` for a caller of another dialect).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Caller", "Run"]


@dataclass(frozen=True)
class Caller:
    """Who asked: the return topic of the request (None: nobody waits on Kafka) and its correlation id.

    A caller that speaks another dialect than fusion's (:mod:`fusion_celery.dialects`)
    also has its ``dialect``, the ``correlation`` its answer must echo, the
    ``reply_partition`` it asked for and its request's ``key`` (a Faust answer carries it).
    """

    return_topic: str | None = None
    id: str | None = None
    topic: str | None = None
    dialect: str = "fusion"
    correlation: str | None = None
    reply_partition: int | None = None
    key: str | None = None

    @classmethod
    def of(cls, message: dict[str, Any] | None) -> Caller:
        """The caller of a request message (a :meth:`fusion_celery.Message.to_dict` or its wire subset)."""
        message = message or {}
        dialect = message.get("dialect") or "fusion"
        return cls(return_topic=message.get("return_topic"), id=message.get("id"), topic=message.get("topic"),
                   dialect=dialect, correlation=message.get("correlation"),
                   reply_partition=message.get("reply_partition"),
                   key=message.get("key") if dialect != "fusion" else None)

    def to_dict(self) -> dict[str, Any]:
        """The wire subset: the dialect's fields only for a caller of another dialect than fusion's."""
        d: dict[str, Any] = {"return_topic": self.return_topic, "id": self.id, "topic": self.topic}
        if self.dialect != "fusion":
            d.update(dialect=self.dialect, correlation=self.correlation, reply_partition=self.reply_partition,
                     key=self.key)
        return d


@dataclass(frozen=True)
class Run:
    """One run of a reactor (``topic`` set) or of a deps-map pipeline (``topic`` None).

    ``id`` is the Celery task id of the run: its result, its claims and its
    progress are kept under it.
    """

    id: str
    topic: str | None = None
    caller: Caller = Caller()

    def to_dict(self) -> dict[str, Any]:
        """The run as JSON-ready data, for task arguments and registry records."""
        return {"id": self.id, "topic": self.topic, "message": self.caller.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Run | None:
        """The run ``data`` describes (see :meth:`to_dict`), or None for no data."""
        if not data or not data.get("id"):
            return None
        return cls(id=data["id"], topic=data.get("topic"), caller=Caller.of(data.get("message")))
