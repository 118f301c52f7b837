"""The wire protocol on Kafka: requests, replies and their headers.

This module is the public contract described in ``docs/reference/protocol.md``.
It is pure (no Kafka client in here) so that it can be tested, fuzzed and
re-implemented in any language.

Request (on a reactor's or service's topic), a UTF-8 JSON object::

    {"data": <any JSON>, "return-topic": "fusion.rt....", "id": "corr-1", "deadline": 1764270000000}

``return_topic`` and ``response-topic`` are accepted as spellings of
``return-topic``.  Headers of the same names may carry the metadata instead.

Reply (on the return topic): the JSON of the result itself.  fusion-celery adds
the headers ``fusion-status`` (``ok`` or ``error``) and ``fusion-id``.  An error
reply has status ``error`` and the body ``{"error": {"type": ..., "message": ...}}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

from .errors import PayloadTooLarge, ProtocolError, RemoteError, ReplyNotAllowed
from .message import Message

__all__ = [
    "RETURN_TOPIC_KEYS",
    "STATUS_HEADER",
    "ID_HEADER",
    "decode_request",
    "encode_request",
    "encode_reply",
    "encode_error",
    "decode_reply",
    "check_return_topic",
    "check_size",
    "headers_dict",
    "reply_rejection",
]

RETURN_TOPIC_KEYS = ("return-topic", "return_topic", "response-topic")
STATUS_HEADER = "fusion-status"
ID_HEADER = "fusion-id"
DEADLINE_HEADER = "fusion-deadline"
ROOT_HEADER = "fusion-root-id"
PARENT_HEADER = "fusion-parent-id"
RUN_HEADER = "fusion-run-id"
_TOPIC_RE = re.compile(r"[A-Za-z0-9._-]{1,249}")  # used with fullmatch: "$" would let a final "\n" through

Headers = Sequence[tuple[str, bytes | str | None]] | dict[str, Any] | None


def headers_dict(headers: Headers) -> dict[str, str]:
    """Kafka headers as ``{name: text}``; undecodable values are shown with replacement characters."""
    if not headers:
        return {}
    items: Iterable[tuple[str, Any]] = headers.items() if isinstance(headers, dict) else headers
    out: dict[str, str] = {}
    for name, value in items:
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        out[str(name)] = "" if value is None else str(value)
    return out


def check_size(payload: bytes, limit: int, what: str) -> None:
    """Raise :class:`PayloadTooLarge` when ``payload`` exceeds ``limit`` bytes."""
    if limit and len(payload) > limit:
        raise PayloadTooLarge(f"{what} is {len(payload)} bytes, above the limit of {limit} "
                              f"(setting fusion_max_message_bytes)")


def valid_topic_name(name: Any) -> bool:
    """True for a legal Kafka topic name (1-249 of ``[A-Za-z0-9._-]``, not ``.`` or ``..``)."""
    return isinstance(name, str) and bool(_TOPIC_RE.fullmatch(name)) and name not in {".", ".."}


def check_return_topic(topic: str, prefix: str, allowlist: Iterable[str | re.Pattern[str]] = ()) -> None:
    """Raise :class:`ReplyNotAllowed` unless a reply may be written to ``topic``.

    Allowed are legal topic names that start with the return-topic ``prefix`` or
    fully match one of the ``allowlist`` regular expressions.
    """
    if not valid_topic_name(topic):
        raise ReplyNotAllowed(f"return topic {topic!r} is not a legal Kafka topic name")
    if prefix and topic.startswith(prefix):
        return
    for pattern in allowlist:
        if re.fullmatch(pattern, topic):
            return
    raise ReplyNotAllowed(f"return topic {topic!r} is not allowed: it lacks the prefix {prefix!r} "
                          f"and matches no pattern of fusion_reply_allowlist")


def parse_deadline(raw: Any, what: str = "'deadline'") -> int | None:
    """A request's deadline as epoch milliseconds (None: it has none), from a number or its text.

    Raises:
        ProtocolError: (``bad-field``) ``raw`` is a boolean, not a number, NaN or infinite; the
            message names the field as ``what``.
    """
    if raw is None:
        return None
    if isinstance(raw, bool):
        raise ProtocolError(f"{what} must be epoch milliseconds, not a boolean", "bad-field")
    if isinstance(raw, str):
        try:
            raw = float(raw)
        except ValueError:
            raise ProtocolError(f"{what} must be epoch milliseconds, got {raw!r}", "bad-field") from None
    if not isinstance(raw, (int, float)) or raw != raw or raw in (float("inf"), float("-inf")):
        raise ProtocolError(f"{what} must be epoch milliseconds, got {raw!r}", "bad-field")
    return int(raw)


def text_key(key: bytes | str | None) -> str | None:
    """A record's key as text (undecodable bytes replaced), as a :class:`Message` carries it."""
    return key.decode("utf-8", "replace") if isinstance(key, bytes) else key


def decode_request(
    value: bytes | None,
    *,
    topic: str,
    headers: Headers = None,
    key: bytes | str | None = None,
    partition: int | None = None,
    offset: int | None = None,
    timestamp: int | None = None,
    max_bytes: int = 0,
    prefix: str = "fusion.rt.",
    allowlist: Iterable[str] = (),
) -> Message:
    """Turn a Kafka record into a :class:`Message`, or raise :class:`ProtocolError` saying why not.

    The error's ``reason`` is one of ``empty``, ``too-large``, ``not-utf8``,
    ``not-json``, ``not-object``, ``bad-field`` and ``return-topic-not-allowed``.
    """
    if value is None or len(value) == 0:
        raise ProtocolError("the message has no value", "empty")
    check_size(value, max_bytes, "the request")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"the value is not UTF-8 (byte {exc.start})", "not-utf8") from None
    try:
        body = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"the value is not JSON: {str(exc)[:200]}", "not-json") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"the value is a JSON {type(body).__name__}, not an object", "not-object")

    hdrs = headers_dict(headers)
    return_topic = next((body[k] for k in RETURN_TOPIC_KEYS if body.get(k) is not None), None)
    if return_topic is None:
        return_topic = next((hdrs[k] for k in RETURN_TOPIC_KEYS if hdrs.get(k)), None)
    if return_topic is not None:
        if not isinstance(return_topic, str):
            raise ProtocolError(f"'return-topic' must be a string, got {type(return_topic).__name__}",
                                "bad-field")
        check_return_topic(return_topic, prefix, allowlist)

    corr = body.get("id", hdrs.get(ID_HEADER) or hdrs.get("id"))
    if corr is not None and not isinstance(corr, (str, int)) or isinstance(corr, bool):
        raise ProtocolError(f"'id' must be a string or an integer, got {type(corr).__name__}", "bad-field")
    deadline = parse_deadline(body.get("deadline", hdrs.get(DEADLINE_HEADER) or hdrs.get("deadline")))
    return Message(
        topic=topic,
        data=body.get("data"),
        return_topic=return_topic,
        id=None if corr is None else str(corr),
        deadline=deadline,
        partition=partition,
        offset=offset,
        key=text_key(key),
        value=body,
        headers=hdrs,
        timestamp=timestamp,
    )


def encode_request(data: Any, return_topic: str | None = None, id: str | None = None,
                   deadline: int | None = None) -> bytes:
    """The JSON body of a request, with ``return-topic`` spelled as the fusion-clj README does."""
    body: dict[str, Any] = {"data": data}
    if return_topic is not None:
        body["return-topic"] = return_topic
    if id is not None:
        body["id"] = id
    if deadline is not None:
        body["deadline"] = int(deadline)
    return json.dumps(body, separators=(",", ":")).encode()


def reply_headers(status: str, id: str | None) -> list[tuple[str, bytes]]:
    """The headers fusion-celery puts on its replies."""
    headers = [(STATUS_HEADER, status.encode())]
    if id is not None:
        headers.append((ID_HEADER, str(id).encode()))
    return headers


def encode_reply(result: Any) -> bytes:
    """A success reply: the JSON of the result itself."""
    try:
        return json.dumps(result, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"the result cannot be sent as JSON: {exc}", "bad-field") from None


def encode_error(type_: str, message: str) -> bytes:
    """An error reply's body: ``{"error": {"type": ..., "message": ...}}``."""
    return json.dumps({"error": {"type": type_, "message": message}}, separators=(",", ":")).encode()


def decode_reply(value: bytes | None, headers: Headers = None) -> Any:
    """The result carried by a reply, or raise :class:`RemoteError` for an error reply.

    A reply is an error when its ``fusion-status`` header says ``error``.  A reply
    without the header (a plain service) is an error only if its body is exactly
    ``{"error": {"type": str, "message": str}}``.  A body that is not JSON raises
    :class:`ProtocolError`.
    """
    hdrs = headers_dict(headers)
    if value is None:
        raise ProtocolError("the reply has no value", "empty")
    try:
        body = json.loads(value.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"the reply is not UTF-8 JSON: {str(exc)[:200]}", "not-json") from None
    status = hdrs.get(STATUS_HEADER)
    looks_like_error = (isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], dict)
                        and set(body["error"]) == {"type", "message"})
    if status == "error" or (status is None and looks_like_error):
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            raise RemoteError(f"{err.get('type', 'Error')}: {err.get('message', '')}")
        raise RemoteError(f"error reply: {str(body)[:500]}")
    return body


def reply_rejection(headers: Headers, wait_id: str, *, require_id: bool = False) -> str | None:
    """Why a record on a return topic may not complete the wait ``wait_id``; ``None`` when it may.

    A return topic's name is the only thing a caller gives away, so a record on it
    proves nothing by itself: anybody who learns the name (or names it as the
    return topic of a request of their own) can write there.  A record that carries
    an id (``fusion-id``) completes the wait only with the wait's own id; a fusion
    reply (it always carries ``fusion-status``) must carry the id, since a fusion
    reactor answers a request without an id with no ``fusion-id`` at all.  A record
    with neither header comes from a service that knows nothing of fusion-celery and
    is accepted, as the protocol promises, unless ``require_id`` is set.
    """
    hdrs = headers_dict(headers)
    got = hdrs.get(ID_HEADER)
    if got is not None:
        return None if got == wait_id else f"its {ID_HEADER} {got[:100]!r} is not this wait's id"
    if STATUS_HEADER in hdrs:
        return f"it is a fusion reply without {ID_HEADER} (an answer to somebody else's request)"
    if require_id:
        return f"it carries no {ID_HEADER} (setting fusion_reply_id_required)"
    return None
