"""Request/reply dialects: how a request names its return topic and its correlation, and what its answer echoes.

fusion-celery's own protocol (:mod:`fusion_celery.protocol`) is one dialect among
the request/reply conventions that Kafka services already speak.  Each dialect is
one module here and one :class:`Dialect` object:

- ``fusion`` (:mod:`.fusion`): a JSON object with ``data``, ``return-topic`` and ``id``;
  the answer is the result's JSON with the headers ``fusion-status`` and ``fusion-id``;
- ``spring`` (:mod:`.spring`): Spring Kafka's ``ReplyingKafkaTemplate`` and ``@SendTo``: the
  headers ``kafka_replyTopic``, ``kafka_replyPartition`` and ``kafka_correlationId``,
  the value is the data itself;
- ``faust`` (:mod:`.faust`): Faust's ``agent.ask``: the headers ``Faust-Ag-ReplyTo`` and
  ``Faust-Ag-CorrelationId`` with the data as the value, or a ``ReqRepRequest`` record;
  the answer is a ``ReqRepResponse`` record.

A dialect works both ways.  A reactor's intake finds the dialect of each request
it reads (:func:`dialect_of_request`: the first whose :meth:`Dialect.recognises`
says yes, ``fusion`` last) and the run answers in it (:meth:`Dialect.encode_reply`).
A deps-map entry's ``dialect`` says which one its service speaks: dispatch writes
the request in it (:meth:`Dialect.encode_request`) and the waiter reads the answer
with it (:meth:`Dialect.rejection`, :meth:`Dialect.decode_reply`).  Whatever the
dialect, a reactor replies only to a topic that :func:`~fusion_celery.protocol.check_return_topic`
allows.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import ConfigurationError

if TYPE_CHECKING:
    from ..message import Message
    from ..run import Caller

__all__ = ["DIALECTS", "Dialect", "Outgoing", "RawHeaders", "dialect", "dialect_of_request", "check_name",
           "header", "correlation_of"]

#: The dialects by the name a deps-map entry's ``dialect`` gives (``fusion`` is the default).
DIALECTS = ("fusion", "spring", "faust")

#: Kafka headers as a client library hands them over: ``(name, value)`` pairs, values as bytes.
RawHeaders = Sequence[tuple[str, bytes | str | None]] | None


@dataclass(frozen=True)
class Outgoing:
    """A record to write: its value, headers, key and (None: the partitioner's choice) partition."""

    value: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    key: bytes | str | None = None
    partition: int | None = None


def header(headers: RawHeaders, name: str) -> bytes | None:
    """The last value of header ``name`` (as bytes), or None when the record has no such header.

    Parameters:
        headers: the record's headers.
        name: the header's name (exact case: Kafka's header names are case-sensitive).
    """
    found: bytes | None = None
    for key, value in headers or ():
        if key == name:
            found = value.encode() if isinstance(value, str) else (value or b"")
    return found


class Dialect(abc.ABC):
    """One request/reply convention, both ways: a caller's requests to a reactor, and a service's answers
    to fusion-celery's requests."""

    #: The name a deps-map entry's ``dialect`` gives.
    name: ClassVar[str]

    # -- a reactor serving a caller that speaks this dialect -----------------------------------------
    @abc.abstractmethod
    def recognises(self, value: bytes | None, headers: RawHeaders) -> bool:
        """Whether a record on a reactor's topic is a request in this dialect (cheap: headers, a first look)."""

    @abc.abstractmethod
    def decode_request(self, value: bytes | None, *, topic: str, headers: RawHeaders = None,
                       key: bytes | str | None = None, partition: int | None = None, offset: int | None = None,
                       timestamp: int | None = None, max_bytes: int = 0, prefix: str = "fusion.rt.",
                       allowlist: Iterable[str] = ()) -> Message:
        """The request a record carries, or raise :class:`~fusion_celery.errors.ProtocolError` saying why not.

        The return topic is checked with :func:`~fusion_celery.protocol.check_return_topic`;
        the error's ``reason`` is one of the dead-letter reasons of the protocol.
        """

    @abc.abstractmethod
    def encode_reply(self, caller: Caller, status: str, body: bytes) -> Outgoing:
        """The answer to ``caller``: ``body`` is the fusion reply body (the result's JSON, or the error
        object) and ``status`` is ``ok`` or ``error``."""

    # -- fusion-celery calling a service that speaks this dialect --------------------------------------
    @abc.abstractmethod
    def encode_request(self, data: Any, *, return_topic: str, id: str, deadline: int | None) -> Outgoing:
        """The request fusion-celery sends a service: ``data``, answered on ``return_topic``, correlated by
        ``id`` (the wait's id), worth nothing after ``deadline`` (epoch ms)."""

    @abc.abstractmethod
    def rejection(self, value: bytes | None, headers: RawHeaders, wait_id: str, *,
                  require_id: bool = False) -> str | None:
        """Why a record on a return topic may not complete the wait ``wait_id``; None when it may."""

    @abc.abstractmethod
    def decode_reply(self, value: bytes | None, headers: RawHeaders) -> Any:
        """The result an answer carries; raise :class:`~fusion_celery.errors.RemoteError` for an error
        answer and :class:`~fusion_celery.errors.ProtocolError` for one that cannot be read."""

    @abc.abstractmethod
    def correlation(self, value: bytes | None, headers: RawHeaders) -> str | None:
        """The wait id an answer in this dialect carries, if any (a shared return topic's records find
        their wait by it)."""


def check_name(name: Any, what: str = "dialect") -> str:
    """``name`` if it names a dialect, else raise :class:`ConfigurationError` listing the dialects."""
    if name not in DIALECTS:
        raise ConfigurationError(f"{what}: unknown dialect {name!r}; the dialects are {list(DIALECTS)}")
    return name


_DIALECTS: dict[str, Dialect] = {}


def dialect(name: str | None) -> Dialect:
    """The dialect called ``name`` (None: ``fusion``).

    Raises:
        ConfigurationError: no dialect has that name.
    """
    name = check_name(name or "fusion")
    found = _DIALECTS.get(name)
    if found is None:
        if name == "spring":
            from .spring import SpringDialect as cls
        elif name == "faust":
            from .faust import FaustDialect as cls
        else:
            from .fusion import FusionDialect as cls
        found = _DIALECTS[name] = cls()
    return found


def dialect_of_request(value: bytes | None, headers: RawHeaders) -> Dialect:
    """The dialect of a request read on a reactor's topic: the first of ``spring`` and ``faust`` that
    recognises it, else ``fusion``."""
    for name in ("spring", "faust"):
        found = dialect(name)
        if found.recognises(value, headers):
            return found
    return dialect("fusion")


def correlation_of(value: bytes | None, headers: RawHeaders) -> str | None:
    """The wait id a record on a shared return topic carries, in whichever dialect it came: ``fusion-id``
    first, then Spring's ``kafka_correlationId``, then a Faust response's ``correlation_id``."""
    for name in DIALECTS:
        found = dialect(name).correlation(value, headers)
        if found is not None:
            return found
    return None
