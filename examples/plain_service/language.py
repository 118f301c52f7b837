"""A language-guessing service that speaks fusion-celery's wire protocol with confluent-kafka alone.

It imports neither fusion-celery nor Celery: any Kafka service that follows
the protocol (docs/reference/protocol.md) can serve a deps-map or call a
reactor.  For each request on its topic it

1. parses the value as a JSON object (anything else is logged and skipped:
   without a readable request there is nobody to answer);
2. skips requests whose ``deadline`` (epoch ms) has passed: nobody waits;
3. works on ``data`` (a text, or an object with a ``text``);
4. if the request names a return topic (``return-topic``, ``return_topic`` or
   ``response-topic``), writes the JSON of its answer there, with the headers
   ``fusion-status: ok`` and ``fusion-id: <id>``; when the work fails, the
   body ``{"error": {"type", "message"}}`` with ``fusion-status: error``, so
   the caller fails at once instead of timing out;
5. commits the request's offset only after its reply was acknowledged
   (at-least-once, like the reactors);
6. copies the request's ``traceparent`` and ``tracestate`` headers (W3C trace
   context) to its reply.  With OpenTelemetry installed and ``OTEL_TRACES_EXPORTER``
   set, it also makes a span of its own, a child of the request's, and its reply
   carries that span's ``traceparent``: the service shows in the caller's trace
   (docs/operations/tracing.md).  A service that does neither still works.

    python -m examples.plain_service.language [--bootstrap-server HOST:PORT] [--topic language]

The bootstrap servers default to ``FUSION_KAFKA_BOOTSTRAP_SERVERS`` or
127.0.0.1:9092; the topic to ``FUSION_EXAMPLES_PREFIX`` + ``language``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

RETURN_TOPIC_KEYS = ("return-topic", "return_topic", "response-topic")

# A handful of the most frequent words of each language: enough for a demo.
MARKERS = {
    "en": {"the", "and", "of", "to", "is", "was", "for", "on", "with", "it"},
    "fr": {"le", "la", "les", "et", "des", "du", "est", "un", "une", "y"},
    "de": {"der", "die", "das", "und", "ist", "nicht", "ein", "eine", "mit", "zu"},
    "es": {"el", "los", "las", "y", "es", "del", "un", "una", "con", "por"},
    "nl": {"de", "het", "een", "en", "van", "is", "niet", "met", "op", "dat"},
}


def guess_language(data: Any) -> dict[str, Any]:
    """``{"language": code, "confidence": share of marker words}`` for a text or ``{"text": ...}``."""
    text = data.get("text") if isinstance(data, dict) else data
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"expected a text or {{'text': ...}}, got {type(data).__name__}")
    words = re.findall(r"[^\W\d_]+", text.lower())
    hits = {lang: sum(w in markers for w in words) for lang, markers in MARKERS.items()}
    best = max(hits, key=hits.get)
    if hits[best] == 0:
        return {"language": "unknown", "confidence": 0.0}
    return {"language": best, "confidence": round(hits[best] / max(1, sum(hits.values())), 2)}


# --8<-- [start:protocol]
TRACE_HEADERS = ("traceparent", "tracestate")


def handle(value: bytes | None, process=guess_language,
           headers: list[tuple[str, bytes]] | None = None) -> tuple[str, bytes, list[tuple[str, bytes]]] | None:
    """The reply ``(return topic, body, headers)`` for one request with ``headers``, or None when nobody is
    to be answered."""
    try:
        request = json.loads(value or b"")
    except ValueError:
        print(f"skipped a value that is not JSON: {value[:80]!r}", file=sys.stderr)
        return None
    if not isinstance(request, dict):
        print(f"skipped a request that is not a JSON object: {value[:80]!r}", file=sys.stderr)
        return None
    deadline = request.get("deadline")
    if isinstance(deadline, (int, float)) and time.time() * 1000 > deadline:
        return None  # expired: the caller gave up already
    return_topic = next((request[k] for k in RETURN_TOPIC_KEYS if request.get(k)), None)
    try:
        body, status = json.dumps(process(request.get("data"))), "ok"
    except Exception as exc:  # an answer the caller can act on, instead of silence and a timeout
        body, status = json.dumps({"error": {"type": type(exc).__name__, "message": str(exc)}}), "error"
    if not return_topic:
        return None  # fire-and-forget: the work is done, nobody to answer
    reply_headers = [("fusion-status", status.encode())]
    if request.get("id") is not None:
        reply_headers.append(("fusion-id", str(request["id"]).encode()))
    # The reply stays in the request's trace (fusion's waiter makes its span a child of the request's anyway).
    reply_headers += [(name, value) for name, value in headers or [] if name in TRACE_HEADERS and value]
    return return_topic, body.encode(), reply_headers


def send_reply(producer: Producer, return_topic: str, body: bytes, headers: list[tuple[str, bytes]]) -> None:
    """Write one reply and wait for Kafka's acknowledgement.

    A return topic that no longer exists means the caller gave up (and its
    topic was cleaned up): the reply is dropped.  Any other failure raises, so
    the request's offset is not committed and it is answered after a restart.
    """
    outcome: list[KafkaError | None] = []
    producer.produce(return_topic, body, headers=headers, on_delivery=lambda err, _msg: outcome.append(err))
    producer.flush(60)
    err = outcome[0] if outcome else KafkaError(KafkaError._MSG_TIMED_OUT)
    if err is None:
        return
    if err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
        print(f"return topic {return_topic} is gone (the caller gave up); reply dropped", file=sys.stderr)
        return
    raise KafkaException(err)


# --8<-- [end:protocol]


def tracer() -> Any:
    """An OpenTelemetry tracer when the SDK is installed and ``OTEL_TRACES_EXPORTER`` names an exporter
    (``otlp``, ``console``), else None: the service then only copies the trace headers."""
    name = os.environ.get("OTEL_TRACES_EXPORTER", "none")
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        return None
    if name == "console":
        exporter = ConsoleSpanExporter()
    elif name.startswith("otlp"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        exporter = OTLPSpanExporter()
    else:
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME",
                                                                                       "language-service")}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return trace.get_tracer("language-service")


# --8<-- [start:tracing]
def handle_traced(tracer: Any, topic: str, value: bytes | None,
                  headers: list[tuple[str, bytes]] | None) -> tuple[str, bytes, list[tuple[str, bytes]]] | None:
    """:func:`handle` in a span that is a child of the request's ``traceparent``; the reply carries the span's."""
    from opentelemetry import trace
    from opentelemetry.propagate import extract, inject
    carrier = {name: v.decode() for name, v in headers or [] if name in TRACE_HEADERS and v}
    with tracer.start_as_current_span(f"process {topic}", context=extract(carrier), kind=trace.SpanKind.CONSUMER,
                                      attributes={"messaging.system": "kafka",
                                                  "messaging.destination.name": topic}):
        own: dict[str, str] = {}
        inject(own)
        return handle(value, headers=[(name, v.encode()) for name, v in own.items()])
# --8<-- [end:tracing]


def serve(bootstrap: str, topic: str) -> None:
    """Create ``topic`` if needed, then answer its requests until SIGTERM or Ctrl-C."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=-1)])[topic].result(30)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"language-service.{topic}",
        "auto.offset.reset": "earliest",
        "enable.auto.offset.store": False,  # store an offset only once its request was answered
    })
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0, "acks": "all",
                         "message.timeout.ms": 30000})
    stop: list[bool] = []
    traced = tracer()
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    consumer.subscribe([topic])
    print(f"language service: serving topic {topic!r} on {bootstrap}", flush=True)
    try:
        while not stop:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            if traced is None:
                reply = handle(msg.value(), headers=msg.headers())
            else:
                reply = handle_traced(traced, topic, msg.value(), msg.headers())
            if reply is not None:
                send_reply(producer, *reply)
            consumer.store_offsets(message=msg)
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()  # commits the stored offsets
        producer.flush(10)
        if traced is not None:
            from opentelemetry import trace
            trace.get_tracer_provider().shutdown()  # exports the spans still batched
        print("language service: stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.plain_service.language",
                                     description="A language-guessing service on Kafka (confluent-kafka only).")
    parser.add_argument("--bootstrap-server",
                        default=os.environ.get("FUSION_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"))
    parser.add_argument("--topic", default=os.environ.get("FUSION_EXAMPLES_PREFIX", "") + "language")
    args = parser.parse_args(argv)
    serve(args.bootstrap_server, args.topic)
    return 0


if __name__ == "__main__":
    sys.exit(main())
