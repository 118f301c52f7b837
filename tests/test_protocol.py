"""Unit tests of the wire protocol (pure logic, no services)."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion_celery.errors import PayloadTooLarge, ProtocolError, RemoteError, ReplyNotAllowed
from fusion_celery.protocol import (
    check_return_topic,
    decode_reply,
    decode_request,
    encode_error,
    encode_reply,
    encode_request,
    reply_headers,
)


def dec(value, **kw):
    return decode_request(value, topic="in", **kw)


@pytest.mark.parametrize("key", ["return-topic", "return_topic", "response-topic"])
def test_all_three_return_topic_spellings(key):
    msg = dec(json.dumps({"data": [1, 2], key: "fusion.rt.1.abc"}).encode())
    assert msg.return_topic == "fusion.rt.1.abc"
    assert msg.data == [1, 2]


def test_metadata_and_unknown_keys():
    msg = dec(b'{"data": {"a": 1}, "id": "c-1", "deadline": 1700000000000, "extra": true}',
              key=b"k", partition=2, offset=7, headers=[("h", b"v")])
    assert (msg.id, msg.deadline, msg.key, msg.partition, msg.offset) == ("c-1", 1700000000000, "k", 2, 7)
    assert msg.headers == {"h": "v"} and msg.value["extra"] is True and msg.return_topic is None


def test_metadata_from_headers():
    msg = dec(b'{"data": 1}', headers=[("return-topic", b"fusion.rt.9.x"), ("fusion-id", b"h-1")])
    assert msg.return_topic == "fusion.rt.9.x" and msg.id == "h-1"


@pytest.mark.parametrize("value,reason", [
    (b"", "empty"), (b"\xff\xfe", "not-utf8"), (b"{not json", "not-json"), (b"[1,2]", "not-object"),
    (b'{"data": 1, "return-topic": 5}', "bad-field"), (b'{"data": 1, "deadline": "soon"}', "bad-field"),
    (b'{"data": 1, "id": [1]}', "bad-field"),
    (b'{"data": 1, "return-topic": "payments"}', "return-topic-not-allowed"),
    (b'{"data": 1, "return-topic": "../etc"}', "return-topic-not-allowed"),
    (b'{"data": 1, "return-topic": "fusion.rt.x\\n"}', "return-topic-not-allowed"),
])
def test_malformed_requests_have_typed_reasons(value, reason):
    with pytest.raises(ProtocolError) as exc:
        dec(value)
    assert exc.value.reason == reason


def test_size_limit():
    with pytest.raises(PayloadTooLarge):
        dec(json.dumps({"data": "x" * 100}).encode(), max_bytes=50)


def test_allowlist():
    check_return_topic("replies.team-a", "fusion.rt.", [r"replies\..*"])
    with pytest.raises(ReplyNotAllowed):
        check_return_topic("replies.team-a", "fusion.rt.", [])


def test_request_roundtrip_uses_readme_spelling():
    body = json.loads(encode_request([1, 2, 3], "fusion.rt.1.a", id="x", deadline=5))
    assert body == {"data": [1, 2, 3], "return-topic": "fusion.rt.1.a", "id": "x", "deadline": 5}


def test_replies():
    assert decode_reply(encode_reply({"a": 1}), reply_headers("ok", "1")) == {"a": 1}
    assert decode_reply(b"6") == 6  # a plain service's reply: just the JSON of the result
    with pytest.raises(RemoteError, match="ValueError: bad"):
        decode_reply(encode_error("ValueError", "bad"), reply_headers("error", "1"))
    with pytest.raises(RemoteError):
        decode_reply(encode_error("E", "m"))  # a plain service's error body, no header
    assert decode_reply(b'{"error": "not the error shape"}') == {"error": "not the error shape"}
    with pytest.raises(ProtocolError):
        decode_reply(b"\x00garbage")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.from_regex(r'\{.*\}', fullmatch=True).map(str.encode))
def test_decoder_never_raises_anything_but_protocol_error(value):
    try:
        msg = dec(value, max_bytes=200)
    except ProtocolError as exc:
        assert exc.reason
    else:
        assert msg.topic == "in"


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                                      max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["data", "return-topic", "id", "deadline", "x"]), json_values))
def test_any_json_object_is_a_request_or_a_typed_error(body):
    try:
        msg = dec(json.dumps(body).encode())
    except ProtocolError as exc:
        assert exc.reason in {"bad-field", "return-topic-not-allowed"}
    else:
        assert msg.data == body.get("data")
        if msg.return_topic:
            assert msg.return_topic.startswith("fusion.rt.")  # the allow-list holds


header_values = st.none() | st.binary(max_size=40) | st.text(max_size=40) | st.sampled_from(
    [b"fusion.rt.1.a", b"payments", b"\xff\xfe", b"1700000000000", b"NaN", b"-1e400", b""])
headers = st.lists(st.tuples(st.sampled_from(["return-topic", "return_topic", "response-topic", "fusion-id", "id",
                                              "fusion-deadline", "deadline", "x"]) | st.text(max_size=8),
                             header_values), max_size=6)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200) | st.recursive(json_values, lambda inner: st.dictionaries(
    st.sampled_from(["data", "return-topic", "return_topic", "response-topic", "id", "deadline"]), inner,
    max_size=5), max_leaves=10).map(lambda v: json.dumps(v).encode()),
       headers, st.none() | st.binary(max_size=20) | st.text(max_size=20))
def test_any_value_headers_and_key_give_a_request_or_a_typed_error(value, hdrs, key):
    try:
        msg = dec(value, headers=hdrs, key=key, max_bytes=150)
    except ProtocolError as exc:
        assert exc.reason in {"empty", "too-large", "not-utf8", "not-json", "not-object", "bad-field",
                              "return-topic-not-allowed"} and str(exc)
    else:
        assert msg.return_topic is None or msg.return_topic.startswith("fusion.rt.")
        assert msg.id is None or isinstance(msg.id, str)
        assert msg.deadline is None or isinstance(msg.deadline, int)
        json.dumps(msg.to_dict())  # it travels in a Celery message: always JSON


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_deeply_nested_json_is_a_typed_error(depth):
    with pytest.raises(ProtocolError):
        dec(b'{"data": ' + b"[" * depth + b"]" * depth + b"}")


@settings(max_examples=300, deadline=None)
@given(st.none() | st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()), headers)
def test_any_reply_is_a_result_or_a_typed_error(value, hdrs):
    try:
        result = decode_reply(value, hdrs)
    except (ProtocolError, RemoteError) as exc:
        assert str(exc)
    else:
        json.dumps(result)


#: Kafka's rules for a topic name, written out here rather than taken from the code under test: 1 to 249
#: characters, each an ASCII letter, digit, ".", "_" or "-"; not "." or "..".
KAFKA_TOPIC_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def kafka_legal(name: str) -> bool:
    return 1 <= len(name) <= 249 and all(ch in KAFKA_TOPIC_CHARS for ch in name) and name not in {".", ".."}


def allowed(name: str) -> bool:
    """What check_return_topic(name, "fusion.rt.", [r"replies\\.team-a"]) must let through."""
    return kafka_legal(name) and (name.startswith("fusion.rt.") or name == "replies.team-a")


ALLOW_LIST_TRAPS = [
    "fusion.rt.", "fusion.rt.x", "fusion.rtx", "replies.team-a", "replies.team-a.x", "xreplies.team-a", "..", ".",
    # with the prefix, and still not a legal name
    "fusion.rt.\n", "fusion.rt.x\n", "fusion.rt.1700000000000.abc\n", "fusion.rt.x\r", "fusion.rt.x\r\n",
    "fusion.rt.x\x00", "fusion.rt.x y", "fusion.rt.\t", "\nfusion.rt.x", "fusion.rt./../x", "fusion.rt./etc/passwd",
    "fusion.rt.x/", "fusion.rt.x:y", "fusion.rt.*", "replies.team-a\n",
    "fusion.rt." + "x" * 239, "fusion.rt." + "x" * 240, "fusion.rt." + "x" * 1000,  # 249 (legal), 250, 1010
    # unicode look-alikes of legal characters
    "fusion.rt.\uff11\uff12\uff13", "fusion\u2024rt.x", "fusion.rt\uff0ex", "fusion.rt.\u0430", "\uff46usion.rt.x",
    "fusion.rt.x\u200b", "fusion.rt.x\u00a0", "fusion.rt.\u2010x", "fusion.rt.\u2170", "fusion.rt.\u00b9",
    "fusion.rt.x\u2028", "fusion.rt.x\x85", "replies.team\u2011a",
]


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=60)
       | st.sampled_from(ALLOW_LIST_TRAPS)
       | st.text(max_size=40).map(lambda rest: "fusion.rt." + rest)
       | st.text(alphabet="abc.-_\n\r/ ", max_size=20).map(lambda rest: "fusion.rt." + rest)
       | st.integers(225, 260).map(lambda n: "fusion.rt." + "x" * (n - len("fusion.rt."))))
def test_allow_list_holds_for_any_name(name):
    assert_allow_list_holds(name)


@pytest.mark.parametrize("name", ALLOW_LIST_TRAPS)
def test_allow_list_holds_for_every_trap(name):
    """Every trap, every run (the fuzz test above only samples them)."""
    assert_allow_list_holds(name)


def assert_allow_list_holds(name: str) -> None:
    try:
        check_return_topic(name, "fusion.rt.", [r"replies\.team-a"])
    except ReplyNotAllowed:
        assert not allowed(name), f"{name!r} was refused"
    else:
        assert allowed(name), f"{name!r} was allowed"


def test_the_independent_rules_see_the_traps():
    """The expectation above is not vacuous: it refuses and allows what it should."""
    assert allowed("fusion.rt.x") and allowed("fusion.rt." + "x" * 239) and allowed("replies.team-a")
    for trap in ["fusion.rt.x\n", "fusion.rt./../x", "fusion.rt." + "x" * 240, "fusion.rt.\u0430", "..",
                 "replies.team-a.x"]:
        assert not allowed(trap), trap
