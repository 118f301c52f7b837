"""Reply channels: how a wait gets the return topic its request names, and what becomes of it afterwards.

The wire protocol is the same for all of them: a request names a return topic and
the service writes its answer there.  What differs is where that topic comes from:

- ``ephemeral`` (:mod:`.ephemeral`): a topic created for the request and deleted
  after it, fusion-clj's literal design.  Two controller round trips per request.
- ``leased`` (:mod:`.leased`): long-lived topics of a per-worker pool, each leased
  to one wait at a time; the wait reads from the topic's end at lease time.  Works
  with every service, including those that echo no id.
- ``shared`` (:mod:`.shared`): a few permanent topics read by every waiter; a reply
  finds its wait by the ``fusion-id`` header, so only for services that echo it.

A dependency chooses with the ``reply`` key of its deps-map entry; a reactor
(``@app.reactor(reply=...)``), a pipeline (``Pipeline(reply=...)``) and the app
(``fusion_reply_channel``) give defaults.  ``docs/operations/topics.md`` says how
to choose.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import ConfigurationError

if TYPE_CHECKING:
    from celery import Celery

    from ..registry import Wait

__all__ = ["CHANNELS", "Opened", "ReplyChannel", "channel", "check_name", "wait_opened"]

#: The channels, by the name a deps-map entry, a reactor, a pipeline or ``fusion_reply_channel`` gives.
CHANNELS = ("ephemeral", "leased", "shared")


@dataclass(frozen=True)
class Opened:
    """The return topic a channel gave one wait, and where that wait reads it from.

    Attributes:
        return_topic: the topic the request names.
        channel: the channel's name.
        offset: the offset of the topic's partition 0 from which the wait reads (0 for a new topic;
            the topic's end at lease time for a leased one; unused for ``shared``).
        pool: the pool a leased topic goes back to.
    """

    return_topic: str
    channel: str = "ephemeral"
    offset: int = 0
    pool: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Opened:
        return cls(d["return_topic"], d.get("channel", "ephemeral"), int(d.get("offset", 0)), d.get("pool"))


class ReplyChannel(abc.ABC):
    """One kind of reply channel; one instance per app and process (see :func:`channel`).

    Parameters:
        app: the app (its settings, Kafka and result backend).
    """

    name: ClassVar[str]
    #: Whether one topic serves many waits at once, a reply finding its wait by its ``fusion-id`` header.
    by_id: ClassVar[bool] = False

    def __init__(self, app: Celery) -> None:
        self.app = app

    @abc.abstractmethod
    def open(self, wait_id: str, deadline_ms: int, owner: str = "") -> Opened:
        """A return topic, existing in Kafka, for the wait ``wait_id`` that ends at ``deadline_ms`` (epoch ms).

        ``owner`` is the worker whose dispatch registers the wait (a leased topic comes from its pool).

        Raises:
            FusionError: no topic can be had (Kafka or the result backend away).
        """

    @abc.abstractmethod
    def end(self, wait_id: str, opened: Opened, next_offset: int | None) -> None:
        """The wait ``wait_id`` on ``opened`` is over (or its request was never sent).

        Parameters:
            wait_id: the wait's id (a leased topic is given back only by the wait it is leased to).
            opened: what :meth:`open` gave the wait (a :class:`~fusion_celery.registry.Wait` names the same).
            next_offset: the offset after the wait's reply when the topic held nothing else; None when
                the topic may not serve another wait (no reply read: a timeout, a failed send; or a
                record the wait should not have seen).
        """

    def tick(self, force: bool = False) -> None:  # noqa: B027 - optional hook
        """Background upkeep, called often by the waiter's thread (deletions, cooldowns); ``force``: all now."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what this process holds (the waiter's thread calls it when it stops)."""


def check_name(name: Any, where: str) -> str:
    """``name`` when it names a channel, else a :class:`ConfigurationError` saying ``where`` it was given."""
    if name not in CHANNELS:
        raise ConfigurationError(f"{where}: unknown reply channel {name!r} (one of {', '.join(CHANNELS)})")
    return name


def channel(app: Celery, name: str | None = None) -> ReplyChannel:
    """This process's channel ``name`` for ``app`` (None: ``fusion_reply_channel``), made on first use.

    Instances live with this process's Kafka clients (closed and made again after a fork).
    """
    from ..clients import clients
    from ..config import settings
    name = check_name(name or settings(app).reply_channel, "reply channel")

    def make() -> ReplyChannel:
        if name == "leased":
            from .leased import LeasedChannel
            return LeasedChannel(app)
        if name == "shared":
            from .shared import SharedChannel
            return SharedChannel(app)
        from .ephemeral import EphemeralChannel
        return EphemeralChannel(app)

    return clients(app).attachment(f"reply-channel-{name}", make)


def wait_opened(wait: Wait) -> Opened:
    """The :class:`Opened` a registered wait names."""
    return Opened(wait.return_topic, wait.channel, wait.offset, wait.pool)
