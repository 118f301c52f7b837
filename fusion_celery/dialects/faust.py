"""Faust's request/reply dialect (``agent.ask``, faust-streaming).

``agent.ask(value)`` sends one of two forms, chosen by the serving agent's
``use_reply_headers``:

- the headers form (Faust's default): the value itself (``[1,2,3]``, Faust's JSON
  serializer) with the headers ``Faust-Ag-ReplyTo`` (the reply topic) and
  ``Faust-Ag-CorrelationId`` (a UUID as text);
- the record form (``use_reply_headers=False``): a ``ReqRepRequest`` record
  ``{"value": ..., "reply_to": ..., "correlation_id": ..., "__faust": {"ns": "@ReqRepRequest"}}``.

The answer is a ``ReqRepResponse`` record ``{"key": ..., "value": ...,
"correlation_id": ..., "__faust": {"ns": "@ReqRepResponse"}}``; Faust refuses one
without ``key`` (it may be null).  A Faust agent's answer carries no header.

Both ways: a reactor answers a Faust caller with a ``ReqRepResponse`` (the fusion
error object as its ``value`` when the work failed, and the fusion headers beside
it); fusion-celery's request to a Faust agent (a deps-map entry with
``"dialect": "faust"``) is in the headers form, and the waiter takes the
``ReqRepResponse`` whose ``correlation_id`` is the wait's id.
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

__all__ = ["FaustDialect", "REPLY_TO", "CORRELATION_ID", "REQUEST_NS", "RESPONSE_NS"]

REPLY_TO = "Faust-Ag-ReplyTo"
CORRELATION_ID = "Faust-Ag-CorrelationId"
#: The namespaces Faust gives its request/reply records (``faust.agents.models``).
REQUEST_NS = "@ReqRepRequest"
RESPONSE_NS = "@ReqRepResponse"
_META = "__faust"

def _ns(body: Any) -> str | None:
    meta = body.get(_META) if isinstance(body, dict) else None
    ns = meta.get("ns") if isinstance(meta, dict) else None
    return ns if isinstance(ns, str) else None

def _json(value: bytes | None, what: str) -> Any:
    if value is None or len(value) == 0:
        raise ProtocolError(f"{what} has no value", "empty")
    try:
        return json.loads(value.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what} is not UTF-8 (byte {exc.start})", "not-utf8") from None
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"{what} is not JSON: {str(exc)[:200]}", "not-json") from None

def _is_request_record(body: Any) -> bool:
    ns = _ns(body)
    return ns is not None and (ns == REQUEST_NS or ns.endswith("ReqRepRequest"))

class FaustDialect(Dialect):
    """Faust's ``agent.ask``: ``Faust-Ag-*`` headers or a ``ReqRepRequest`` record; ``ReqRepResponse`` back."""

    name = "faust"

    def recognises(self, value: bytes | None, headers: RawHeaders) -> bool:
        if header(headers, REPLY_TO) is not None:
            return True
        # The record form: a JSON object with Faust's metadata (a cheap look before parsing it).
        if not value or b'"' + _META.encode() + b'"' not in value:
            return False
        try:
            return _is_request_record(json.loads(value.decode("utf-8")))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return False

    def decode_request(self, value: bytes | None, *, topic: str, headers: RawHeaders = None,
                       key: bytes | str | None = None, partition: int | None = None, offset: int | None = None,
                       timestamp: int | None = None, max_bytes: int = 0, prefix: str = "fusion.rt.",
                       allowlist: Iterable[str] = ()) -> Message:
        from ..message import Message

        if value is not None:
            check_size(value, max_bytes, "the request")
        body = _json(value, "the value")
        raw_reply_to = header(headers, REPLY_TO)
        if raw_reply_to is not None:  # the headers form: the value is the data
            data = body
            try:
                reply_to: Any = raw_reply_to.decode("utf-8")
                raw_corr = header(headers, CORRELATION_ID)
                correlation: Any = None if raw_corr is None else raw_corr.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ProtocolError(f"a Faust request's {REPLY_TO} or {CORRELATION_ID} header is not UTF-8 "
                                    f"(byte {exc.start})", "bad-field") from None
            where = f"the header {REPLY_TO}"
        else:  # the record form
            if not _is_request_record(body):
                raise ProtocolError("the value is not a Faust ReqRepRequest record", "bad-field")
            for name in ("value", "reply_to", "correlation_id"):
                if name not in body:
                    raise ProtocolError(f"a Faust ReqRepRequest record needs {name!r}", "bad-field")
            data, reply_to, correlation = body["value"], body["reply_to"], body["correlation_id"]
            where = "a Faust ReqRepRequest's 'reply_to'"
            if not isinstance(correlation, str):
                raise ProtocolError(f"a Faust ReqRepRequest's 'correlation_id' must be a string, got "
                                    f"{type(correlation).__name__}", "bad-field")
        if not isinstance(reply_to, str):
            raise ProtocolError(f"{where} must be a string, got {type(reply_to).__name__}", "bad-field")
        check_return_topic(reply_to, prefix, allowlist)
        hdrs = headers_dict(headers)
        deadline_ms = parse_deadline(hdrs.get(DEADLINE_HEADER) or None, f"the header {DEADLINE_HEADER}")
        return Message(topic=topic, data=data, return_topic=reply_to, id=correlation, deadline=deadline_ms,
                       partition=partition, offset=offset, key=text_key(key), value=body, headers=hdrs,
                       timestamp=timestamp,
                       dialect=self.name, correlation=correlation)

    def encode_reply(self, caller: Caller, status: str, body: bytes) -> Outgoing:
        response = {"key": caller.key, "value": json.loads(body), "correlation_id": caller.correlation,
                    _META: {"ns": RESPONSE_NS}}
        return Outgoing(json.dumps(response, separators=(",", ":")).encode(), reply_headers(status, caller.id))

    def encode_request(self, data: Any, *, return_topic: str, id: str, deadline: int | None) -> Outgoing:
        headers = [(REPLY_TO, return_topic.encode()), (CORRELATION_ID, id.encode())]
        if deadline is not None:
            headers.append((DEADLINE_HEADER, str(int(deadline)).encode()))
        return Outgoing(json.dumps(data, separators=(",", ":")).encode(), headers)

    def _response(self, value: bytes | None) -> dict[str, Any]:
        body = _json(value, "the reply")
        if not isinstance(body, dict):
            raise ProtocolError(f"the reply is a JSON {type(body).__name__}, not a Faust ReqRepResponse record",
                                "not-object")
        for name in ("key", "value", "correlation_id"):
            if name not in body:
                raise ProtocolError(f"a Faust ReqRepResponse record needs {name!r}", "bad-field")
        return body

    def rejection(self, value: bytes | None, headers: RawHeaders, wait_id: str, *,
                  require_id: bool = False) -> str | None:
        try:
            got = self._response(value)["correlation_id"]
        except ProtocolError as err:
            return f"it is not a Faust answer: {err}"
        if got != wait_id:
            return f"its correlation_id {str(got)[:100]!r} is not this wait's id"
        return None

    def decode_reply(self, value: bytes | None, headers: RawHeaders) -> Any:
        result = self._response(value)["value"]
        if headers_dict(headers).get("fusion-status") == "error" or _looks_like_error(result):
            return decode_reply(json.dumps(result).encode(), headers)  # raises RemoteError
        return result

    def correlation(self, value: bytes | None, headers: RawHeaders) -> str | None:
        if not value or b"correlation_id" not in value:
            return None
        try:
            got = self._response(value)["correlation_id"]
        except ProtocolError:
            return None
        return got if isinstance(got, str) else None

def _looks_like_error(result: Any) -> bool:
    return (isinstance(result, dict) and set(result) == {"error"} and isinstance(result["error"], dict)
            and set(result["error"]) == {"type", "message"})
