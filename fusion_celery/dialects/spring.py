"""Spring Kafka's request/reply dialect (``ReplyingKafkaTemplate``, ``@KafkaListener`` + ``@SendTo``).

A request carries its return topic in the header ``kafka_replyTopic``, optionally
the partition to answer on in ``kafka_replyPartition`` (a 4-byte big-endian int),
and a correlation id in ``kafka_correlationId``: any bytes (Spring's default is 16
random bytes, not text), which the answer carries back **byte for byte**.  The
record's value is the data itself (its JSON), not a fusion request object.

Both ways:

- a Spring caller's request to a reactor: the reactor answers on that topic (and
  partition) with the result's JSON and the correlation id echoed, plus the fusion
  headers; the return topic must pass :func:`~fusion_celery.protocol.check_return_topic`
  like any other;
- fusion-celery's request to a Spring service (a deps-map entry with
  ``"dialect": "spring"``): the data's JSON with ``kafka_replyTopic`` and the wait's id
  (UTF-8) as ``kafka_correlationId``; the answer completes the wait only when it
  echoes that id.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..errors import ProtocolError
from ..protocol import (
    DEADLINE_HEADER,
    check_return_topic,
    check_size,
    decode_reply,
    headers_dict,
    parse_deadline,
    reply_headers,
    text_key,
)
from . import Dialect, Outgoing, RawHeaders, header

if TYPE_CHECKING:
    from ..message import Message
    from ..run import Caller

__all__ = ["SpringDialect", "REPLY_TOPIC", "REPLY_PARTITION", "CORRELATION_ID"]

REPLY_TOPIC = "kafka_replyTopic"
REPLY_PARTITION = "kafka_replyPartition"
CORRELATION_ID = "kafka_correlationId"


def _text(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"the header {name} is not UTF-8 (byte {exc.start})", "bad-field") from None


class SpringDialect(Dialect):
    """Spring Kafka's headers: ``kafka_replyTopic``, ``kafka_replyPartition``, ``kafka_correlationId``."""

    name = "spring"

    def recognises(self, value: bytes | None, headers: RawHeaders) -> bool:
        return header(headers, REPLY_TOPIC) is not None

    def decode_request(self, value: bytes | None, *, topic: str, headers: RawHeaders = None,
                       key: bytes | str | None = None, partition: int | None = None, offset: int | None = None,
                       timestamp: int | None = None, max_bytes: int = 0, prefix: str = "fusion.rt.",
                       allowlist: Iterable[str] = ()) -> Message:
        from ..message import Message

        if value is None or len(value) == 0:
            raise ProtocolError("the message has no value", "empty")
        check_size(value, max_bytes, "the request")
        return_topic = _text(header(headers, REPLY_TOPIC) or b"", REPLY_TOPIC)
        check_return_topic(return_topic, prefix, allowlist)
        reply_partition = None
        raw_partition = header(headers, REPLY_PARTITION)
        if raw_partition is not None:
            if len(raw_partition) != 4:
                raise ProtocolError(f"the header {REPLY_PARTITION} must be a 4-byte big-endian int, got "
                                    f"{len(raw_partition)} bytes", "bad-field")
            reply_partition = int.from_bytes(raw_partition, "big", signed=True)
            if reply_partition < 0:
                raise ProtocolError(f"the header {REPLY_PARTITION} names partition {reply_partition}",
                                    "bad-field")
        correlation = header(headers, CORRELATION_ID)
        try:
            data = json.loads(value.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"the value is not UTF-8 (byte {exc.start})", "not-utf8") from None
        except (ValueError, RecursionError) as exc:
            raise ProtocolError(f"the value is not JSON: {str(exc)[:200]}", "not-json") from None
        hdrs = headers_dict(headers)
        deadline_ms = parse_deadline(hdrs.get(DEADLINE_HEADER) or None, f"the header {DEADLINE_HEADER}")
        return Message(topic=topic, data=data, return_topic=return_topic,
                       id=None if correlation is None else correlation.hex(), deadline=deadline_ms,
                       partition=partition, offset=offset, key=text_key(key), value=data, headers=hdrs,
                       timestamp=timestamp,
                       dialect=self.name, correlation=None if correlation is None else correlation.hex(),
                       reply_partition=reply_partition)

    def encode_reply(self, caller: Caller, status: str, body: bytes) -> Outgoing:
        headers = reply_headers(status, caller.id)
        if caller.correlation is not None:
            headers.append((CORRELATION_ID, bytes.fromhex(caller.correlation)))
        return Outgoing(body, headers, partition=caller.reply_partition)

    def encode_request(self, data: Any, *, return_topic: str, id: str, deadline: int | None) -> Outgoing:
        headers = [(REPLY_TOPIC, return_topic.encode()), (CORRELATION_ID, id.encode())]
        if deadline is not None:
            headers.append((DEADLINE_HEADER, str(int(deadline)).encode()))
        return Outgoing(json.dumps(data, separators=(",", ":")).encode(), headers)

    def rejection(self, value: bytes | None, headers: RawHeaders, wait_id: str, *,
                  require_id: bool = False) -> str | None:
        got = header(headers, CORRELATION_ID)
        if got is None:
            return f"it carries no {CORRELATION_ID} (a Spring service echoes it)"
        if got != wait_id.encode():
            return f"its {CORRELATION_ID} {got[:100]!r} is not this wait's id"
        return None

    def decode_reply(self, value: bytes | None, headers: RawHeaders) -> Any:
        return decode_reply(value, headers)

    def correlation(self, value: bytes | None, headers: RawHeaders) -> str | None:
        got = header(headers, CORRELATION_ID)
        if got is None:
            return None
        try:
            return got.decode("utf-8")
        except UnicodeDecodeError:
            return None
