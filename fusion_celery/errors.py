"""The exceptions fusion-celery raises, so callers can tell one failure from another.

All of them derive from :class:`FusionError`.  They are plain exceptions with a
single string argument so that Celery's JSON result serializer can store them
and rebuild them on the client side (``.get()`` raises the same type).
"""

from __future__ import annotations

__all__ = [
    "FusionError",
    "ConfigurationError",
    "ProtocolError",
    "DepsMapError",
    "DependencyFailed",
    "DependencyTimeout",
    "RemoteError",
    "RequestExpired",
    "ReplyNotAllowed",
    "PayloadTooLarge",
    "UnknownTopic",
]


class FusionError(Exception):
    """Base class of every fusion-celery error."""


class ConfigurationError(FusionError):
    """A setting is wrong or a service fusion-celery needs cannot be reached."""


class ProtocolError(FusionError):
    """A Kafka message does not follow the wire protocol.

    ``reason`` is a short machine-readable code (``not-json``, ``not-object``,
    ``too-large``, ``return-topic-not-allowed``, ``bad-field``, ``not-utf8``,
    ``undecodable``: the intake's decoder itself failed)
    that also goes into the dead-letter header ``fusion-dlq-reason``.
    """

    def __init__(self, message: str, reason: str = "bad-field") -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # keep `reason` across pickling
        return (type(self), (self.args[0], self.reason))


class PayloadTooLarge(ProtocolError):
    """A request or reply is larger than ``fusion_max_message_bytes``."""

    def __init__(self, message: str, reason: str = "too-large") -> None:
        super().__init__(message, reason)


class ReplyNotAllowed(ProtocolError):
    """A message names a return topic outside the reply allow-list."""

    def __init__(self, message: str, reason: str = "return-topic-not-allowed") -> None:
        super().__init__(message, reason)


class DepsMapError(FusionError, ValueError):
    """A deps-map is invalid; the message names the dependency (or key) at fault."""


class UnknownTopic(FusionError):
    """Kafka refused a record because its topic does not exist (it was deleted, or never made)."""


class DependencyFailed(FusionError):
    """A dependency replied with an error, or could not be sent."""


class DependencyTimeout(DependencyFailed):
    """No reply arrived on a dependency's return topic before its timeout."""


class RemoteError(FusionError):
    """A service replied with ``{"error": {"type": ..., "message": ...}}``."""


class RequestExpired(FusionError):
    """A request arrived after its ``deadline``; it was not worked on."""
