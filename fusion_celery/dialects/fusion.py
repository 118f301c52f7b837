"""fusion-celery's own dialect: the wire protocol of :mod:`fusion_celery.protocol`.

A request is a JSON object (``data``, ``return-topic``, ``id``, ``deadline``); the
answer is the result's JSON with the headers ``fusion-status`` and ``fusion-id``,
keyed by the request's ``id``.  It is the dialect of every request no other
dialect recognises.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..protocol import (
    ID_HEADER,
    decode_reply,
    decode_request,
    encode_request,
    headers_dict,
    reply_headers,
    reply_rejection,
)
from . import Dialect, Outgoing, RawHeaders, header

if TYPE_CHECKING:
    from ..message import Message
    from ..run import Caller

__all__ = ["FusionDialect"]


class FusionDialect(Dialect):
    """The fusion wire protocol (``docs/reference/protocol.md``)."""

    name = "fusion"

    def recognises(self, value: bytes | None, headers: RawHeaders) -> bool:
        return True

    def decode_request(self, value: bytes | None, *, topic: str, headers: RawHeaders = None,
                       key: bytes | str | None = None, partition: int | None = None, offset: int | None = None,
                       timestamp: int | None = None, max_bytes: int = 0, prefix: str = "fusion.rt.",
                       allowlist: Iterable[str] = ()) -> Message:
        return decode_request(value, topic=topic, headers=headers, key=key, partition=partition, offset=offset,
                              timestamp=timestamp, max_bytes=max_bytes, prefix=prefix, allowlist=allowlist)

    def encode_reply(self, caller: Caller, status: str, body: bytes) -> Outgoing:
        return Outgoing(body, reply_headers(status, caller.id), key=caller.id)

    def encode_request(self, data: Any, *, return_topic: str, id: str, deadline: int | None) -> Outgoing:
        return Outgoing(encode_request(data, return_topic or None, id=id, deadline=deadline))

    def rejection(self, value: bytes | None, headers: RawHeaders, wait_id: str, *,
                  require_id: bool = False) -> str | None:
        return reply_rejection(headers, wait_id, require_id=require_id)

    def decode_reply(self, value: bytes | None, headers: RawHeaders) -> Any:
        return decode_reply(value, headers)

    def correlation(self, value: bytes | None, headers: RawHeaders) -> str | None:
        found = header(headers, ID_HEADER)
        return None if found is None else headers_dict([(ID_HEADER, found)])[ID_HEADER]
