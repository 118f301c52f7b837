"""Spans for the tracing tests: the test process's tracer provider, an OTLP/HTTP receiver for workers' spans,
and the check of a traced call's shape.

The test process has one global tracer provider (OpenTelemetry sets it once per process), made on first
use: its spans (fusion's in the in-process worker, a test's foreign service's) go to :data:`MEMORY`.
Workers in processes of their own export theirs over OTLP/HTTP to a :class:`Receiver`.  Both become
:class:`Span` records, so one check reads them all.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Span", "Receiver", "memory_spans", "provider", "by_name", "one", "children"]

_lock = threading.Lock()
_memory: Any = None


@dataclass(frozen=True)
class Span:
    """One finished span, from whichever process it came."""

    name: str
    kind: str  # INTERNAL, SERVER, CLIENT, PRODUCER, CONSUMER
    trace: str
    id: str
    parent: str | None
    service: str
    attributes: dict[str, Any] = field(default_factory=dict)
    links: tuple[str, ...] = ()  # the span ids it links to


def provider() -> Any:
    """The test process's global SDK tracer provider, exporting to memory (made on first call)."""
    global _memory
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    with _lock:
        if _memory is None:
            _memory = InMemorySpanExporter()
            made = TracerProvider(resource=Resource.create({"service.name": "test-process"}))
            made.add_span_processor(SimpleSpanProcessor(_memory))
            trace.set_tracer_provider(made)
    return trace.get_tracer_provider()


def memory_spans() -> list[Span]:
    """The spans the test process finished so far."""
    provider()
    out = []
    for s in _memory.get_finished_spans():
        ctx = s.get_span_context()
        out.append(Span(name=s.name, kind=s.kind.name, trace=f"{ctx.trace_id:032x}", id=f"{ctx.span_id:016x}",
                        parent=f"{s.parent.span_id:016x}" if s.parent else None,
                        service=str(s.resource.attributes.get("service.name")), attributes=dict(s.attributes or {}),
                        links=tuple(f"{link.context.span_id:016x}" for link in s.links)))
    return out


def clear_memory() -> None:
    provider()
    _memory.clear()


_KINDS = {0: "INTERNAL", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


def _value(v: Any) -> Any:
    which = v.WhichOneof("value")
    return getattr(v, which) if which else None


class Receiver:
    """An OTLP/HTTP (protobuf) trace receiver on ``127.0.0.1:<port>``: what workers export lands in :attr:`spans`."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
        self.spans: list[Span] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver._add(request)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        """The URL for ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``."""
        return f"http://127.0.0.1:{self.port}/v1/traces"

    def _add(self, request: Any) -> None:
        found = []
        for rs in request.resource_spans:
            service = next((_value(a.value) for a in rs.resource.attributes if a.key == "service.name"), "")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    found.append(Span(name=s.name, kind=_KINDS.get(s.kind, str(s.kind)), trace=s.trace_id.hex(),
                                      id=s.span_id.hex(), parent=s.parent_span_id.hex() or None, service=service,
                                      attributes={a.key: _value(a.value) for a in s.attributes},
                                      links=tuple(link.span_id.hex() for link in s.links)))
        with _lock:
            self.spans.extend(found)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def by_name(spans: list[Span], name: str) -> list[Span]:
    return [s for s in spans if s.name == name]


def one(spans: list[Span], name: str, **attributes: Any) -> Span:
    """The single span named ``name`` whose attributes include ``attributes``."""
    found = [s for s in by_name(spans, name) if all(s.attributes.get(k) == v for k, v in attributes.items())]
    assert len(found) == 1, f"expected one span {name!r} {attributes}, got {len(found)}: {describe(spans)}"
    return found[0]


def children(spans: list[Span], parent: Span) -> list[Span]:
    return [s for s in spans if s.parent == parent.id]


def describe(spans: list[Span]) -> str:
    """The spans as an indented tree (for failure messages and the report)."""
    ids = {s.id for s in spans}
    lines: list[str] = []

    def walk(span: Span, depth: int) -> None:
        link = f" (links {', '.join(span.links)})" if span.links else ""
        lines.append(f"{'  ' * depth}{span.name} [{span.kind}, {span.service}] {span.id}{link}")
        for child in sorted(children(spans, span), key=lambda c: c.name):
            walk(child, depth + 1)

    for root in sorted((s for s in spans if s.parent not in ids), key=lambda s: s.name):
        walk(root, 0)
    return "\n" + "\n".join(lines)


def check_traced_call(spans: list[Span], *, root: str, deps: dict[str, str], joined: set[str]) -> str:
    """Check the spans of one pipeline call to reactor ``root`` whose deps-map names ``deps``
    (``{dep name: topic}``); the deps in ``joined`` are served by something that joins the trace
    (a fusion reactor, or a service that copies ``traceparent``).  Returns the trace id.
    """
    traces = {s.trace for s in spans}
    assert len(traces) == 1, f"expected one trace, got {len(traces)}: {describe(spans)}"
    call = one(spans, f"send {root}")
    assert call.kind == "PRODUCER" and call.attributes["messaging.system"] == "kafka"
    intake = one(spans, f"receive {root}")
    assert intake.kind == "CONSUMER" and intake.parent == call.id
    run = one(spans, f"fusion.reactor.{root} run")
    assert run.parent == intake.id
    for dep, topic in deps.items():
        sent = one(spans, f"send {topic}", **{"fusion.dep": dep})
        assert sent.kind == "PRODUCER" and sent.parent == run.id, f"dep {dep}: {describe(spans)}"
        got = one(spans, f"receive {topic} reply", **{"fusion.dep": dep})
        assert got.kind == "CONSUMER" and got.parent == sent.id, f"dep {dep}: {describe(spans)}"
        served = [s for s in children(spans, sent) if s is not got]
        if dep in joined:
            assert served, f"dep {dep}: nothing joined the trace under its request: {describe(spans)}"
            assert got.links, f"dep {dep}: its reply's span is not linked to the service's: {describe(spans)}"
        else:
            assert not served and not got.links, f"dep {dep}: {describe(spans)}"
    body = one(spans, f"fusion.reactor.{root}.process")
    assert body.parent == run.id, f"the chord body is not the run's child: {describe(spans)}"
    final = one(spans, f"reply {root}")
    assert final.kind == "PRODUCER" and final.parent == body.id
    back = one(spans, f"receive {root} reply")
    assert back.parent == call.id and final.id in back.links, describe(spans)
    return traces.pop()


class ForeignService(threading.Thread):
    """A dependency service that knows nothing of fusion-celery: it answers ``fn(data)`` on the return topic.

    With ``propagate`` it does what a service that joins the trace does: its span for the request is a
    child of the request's ``traceparent``, and its reply carries that span's ``traceparent``.  Without,
    it neither reads nor writes trace headers.  ``consumer``/``producer`` are confluent-kafka's classes
    (or the in-process stub's); ``config`` their common settings.
    """

    def __init__(self, consumer: type, producer: type, config: dict[str, Any], topic: str, fn: Any, *,
                 propagate: bool) -> None:
        super().__init__(daemon=True)
        self.consumer = consumer({**config, "group.id": f"foreign-{topic}", "auto.offset.reset": "earliest"})
        self.producer = producer({**config, "linger.ms": 0})
        self.topic, self.fn, self.propagate = topic, fn, propagate
        self.stop_event = threading.Event()
        self.seen_headers: list[dict[str, str]] = []

    def run(self) -> None:
        import json
        self.consumer.subscribe([self.topic])
        while not self.stop_event.is_set():
            msg = self.consumer.poll(0.1)
            if msg is None or msg.error():
                continue
            headers = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in (msg.headers() or [])}
            self.seen_headers.append(headers)
            body = json.loads(msg.value())
            reply_headers = [("fusion-id", str(body["id"]).encode())] if body.get("id") else []
            if self.propagate:
                from opentelemetry import trace
                from opentelemetry.propagate import extract, inject
                tracer = provider().get_tracer("foreign-service")
                with tracer.start_as_current_span(f"serve {self.topic}", context=extract(headers),
                                                  kind=trace.SpanKind.CONSUMER):
                    out = self.fn(body["data"])
                    carrier: dict[str, str] = {}
                    inject(carrier)
                    reply_headers += [(k, v.encode()) for k, v in carrier.items()]
            else:
                out = self.fn(body["data"])
            self.producer.produce(body["return-topic"], json.dumps(out), headers=reply_headers)
            self.producer.flush(10)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)
        self.consumer.close()
