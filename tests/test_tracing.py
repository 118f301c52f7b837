"""Tracing in the fast tier: the in-process worker and stub Kafka, spans exported to memory.

One pipeline call whose reactor has three deps (two fusion reactors, one foreign service that copies
``traceparent``) makes one trace with every hop in place; a foreign service that ignores the headers
still answers; with tracing off nothing is traced, no header written and no OpenTelemetry tracing
module imported.  tests/test_tracing_worker.py runs the same call through real workers and Kafka.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from support import otel
from support.stack import ROOT

from fusion_celery import DependencyFailed, Message, Pipeline, reactor, register_arg_in_fn
from fusion_celery.testing import in_process_app, worker
from fusion_celery.testing.app import kafka_broker
from fusion_celery.testing.kafka import Consumer, Producer

TIMEOUT = 15.0
DEPS = {"a": "add", "b": "double", "c": "foreign"}


def define(app: Celery) -> None:
    @reactor("add", app=app)
    def add(message: Message) -> Any:
        return sum(message.data)

    @reactor("double", app=app)
    def double(message: Message) -> Any:
        return 2 * message.data

    @reactor("three", app=app, deps=lambda m: {"a": {"topic": "add", "args": m.data["args"]},
                                               "b": {"topic": "double", "args": 21},
                                               "c": {"topic": m.data["foreign"], "args": 1}})
    def three(message: Message, results: dict[str, Any]) -> Any:
        return results

    register_arg_in_fn("tracing-divides-by-zero", lambda args, result: result / 0)

    @reactor("fails-to-send", app=app, deps={
        "a": {"topic": "add", "args": [1]},
        "b": {"topic": "add", "args": [], "deps": ["a"], "arg_in_fn": "tracing-divides-by-zero"}})
    def fails_to_send(message: Message, results: dict[str, Any]) -> Any:
        raise AssertionError("never runs: dep b fails before its request is sent")

    @reactor("waits", app=app, deps={"quiet": {"topic": "silent", "args": [], "timeout": 0.5}})
    def waits(message: Message, results: dict[str, Any]) -> Any:
        raise AssertionError("never runs: its dependency times out")


@pytest.fixture(scope="module")
def traced() -> Iterator[Celery]:
    otel.provider()  # fusion uses the process's provider: spans go to memory
    app = in_process_app("traced", fusion_default_timeout=TIMEOUT, fusion_tracing=True)
    define(app)
    for topic in ("foreign", "quiet-foreign", "silent"):
        kafka_broker(app).create_topic(topic)
    with worker(app):
        yield app


def foreign(app: Celery, topic: str, propagate: bool) -> otel.ForeignService:
    service = otel.ForeignService(Consumer, Producer, {"bootstrap.servers": app.conf.fusion_kafka_bootstrap_servers},
                                  topic, lambda data: data + 100, propagate=propagate)
    service.start()
    return service


def settled(count: int) -> list[otel.Span]:
    """The test process's spans once ``count`` of them ended (the last reply's span ends after the caller
    got the answer)."""
    from support.waiting import wait_for
    return wait_for(lambda: len(spans := otel.memory_spans()) >= count and spans, 10, f"{count} spans")


def test_one_call_over_three_deps_makes_one_trace_through_every_hop(traced):
    otel.clear_memory()
    service = foreign(traced, "foreign", propagate=True)
    try:
        answer = Pipeline("three", app=traced).delay({"args": [1, 2], "foreign": "foreign"},
                                                     timeout=TIMEOUT).get(timeout=TIMEOUT + 5)
    finally:
        service.stop()
    assert answer == {"a": 3, "b": 42, "c": 101}
    # call, intake, run, 3 x (send, reply received), 2 x (intake, run, reply), the service's span, body,
    # final reply, final reply received
    spans = settled(19)
    otel.check_traced_call(spans, root="three", deps=DEPS, joined={"a", "b", "c"})
    [request] = service.seen_headers
    sent = otel.one(spans, "send foreign", **{"fusion.dep": "c"})
    assert request["traceparent"].split("-")[2] == sent.id


def test_a_service_that_ignores_the_headers_still_answers_and_is_left_out(traced):
    otel.clear_memory()
    service = foreign(traced, "quiet-foreign", propagate=False)
    try:
        answer = Pipeline("three", app=traced).delay({"args": [1, 2], "foreign": "quiet-foreign"},
                                                     timeout=TIMEOUT).get(timeout=TIMEOUT + 5)
    finally:
        service.stop()
    assert answer == {"a": 3, "b": 42, "c": 101}
    assert "traceparent" in service.seen_headers[0]  # sent, though the service ignores it
    spans = settled(18)
    otel.check_traced_call(spans, root="three", deps={**DEPS, "c": "quiet-foreign"}, joined={"a", "b"})


def test_a_span_current_at_the_call_is_the_traces_root(traced):
    otel.clear_memory()
    tracer = otel.provider().get_tracer("test")
    with tracer.start_as_current_span("caller") as caller:
        assert Pipeline("add", app=traced).delay([1, 2], timeout=TIMEOUT).get(timeout=TIMEOUT + 5) == 3
    spans = settled(6)
    assert {s.trace for s in spans} == {f"{caller.get_span_context().trace_id:032x}"}
    assert otel.one(spans, "send add").parent == f"{caller.get_span_context().span_id:016x}"


def test_celerys_own_instrumentation_nests_fusions_spans_in_its_task_spans(traced):
    """opentelemetry-instrumentation-celery adds a span per task sent and run, and injects the context current
    when a task is sent: fusion's step spans become children of its ``run/<task>`` spans, still one trace.
    It sends the chord body from the waiter, so the body's spans hang under the reply that completed the
    last dependency rather than under the run (fusion alone carries the run's context there)."""
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    otel.clear_memory()
    instrumentor = CeleryInstrumentor()
    instrumentor.instrument(tracer_provider=otel.provider())
    service = foreign(traced, "foreign", propagate=True)
    try:
        answer = Pipeline("three", app=traced).delay({"args": [1, 2], "foreign": "foreign"},
                                                     timeout=TIMEOUT).get(timeout=TIMEOUT + 5)
    finally:
        service.stop()
        instrumentor.uninstrument()
    assert answer == {"a": 3, "b": 42, "c": 101}
    spans = settled(19 + 2 * 8)  # + sent and run: pipeline, three, its body, 3 dispatches, add, double
    assert len({s.trace for s in spans}) == 1, otel.describe(spans)
    for step, task in [("fusion.reactor.three run", "fusion.reactor.three"),
                       ("fusion.reactor.three.process", "fusion.reactor.three.process"),
                       ("fusion.reactor.add run", "fusion.reactor.add")]:
        assert otel.one(spans, step).parent == otel.one(spans, f"run/{task}").id, otel.describe(spans)
    body_sent = otel.one(spans, "apply_async/fusion.reactor.three.process")
    assert next(s for s in spans if s.id == body_sent.parent).name.endswith(" reply"), otel.describe(spans)


def test_a_dependency_that_times_out_ends_in_an_error_reply_within_the_trace(traced):
    otel.clear_memory()
    with pytest.raises(DependencyFailed, match="DependencyTimeout"):
        Pipeline("waits", app=traced).delay(None, timeout=TIMEOUT).get(timeout=TIMEOUT + 5)
    spans = settled(7)  # send, receive, run, send silent, timeout, reply (error), receive reply
    assert len({s.trace for s in spans}) == 1, otel.describe(spans)
    timeout = otel.one(spans, "timeout silent")
    assert timeout.parent == otel.one(spans, "send silent").id
    final = otel.one(spans, "reply waits")
    assert final.parent == timeout.id and final.attributes["fusion.status"] == "error"


def test_a_dependency_that_fails_before_its_request_is_sent_answers_within_the_trace(traced):
    otel.clear_memory()
    with pytest.raises(DependencyFailed, match="division by zero"):
        Pipeline("fails-to-send", app=traced).delay(None, timeout=TIMEOUT).get(timeout=TIMEOUT + 5)
    # send, receive, run, dep a (send, receive, run, reply, receive reply), reply (error, from dep b's
    # on_failure), receive reply
    spans = settled(10)
    assert len({s.trace for s in spans}) == 1, otel.describe(spans)
    final = otel.one(spans, "reply fails-to-send")
    assert final.parent == otel.one(spans, "fusion.reactor.fails-to-send run").id
    assert final.attributes["fusion.status"] == "error"


def test_an_exporter_nobody_installed_is_a_configuration_error(monkeypatch):
    from fusion_celery import ConfigurationError, tracing
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "nonesuch")
    with pytest.raises(ConfigurationError, match="no exporter 'nonesuch' is installed .*console"):
        tracing._sdk_provider()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert tracing._sdk_provider() is not None


PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_the_plain_example_service_copies_the_trace_headers_or_answers_in_a_span_of_its_own():
    from examples.plain_service.language import handle, handle_traced
    request = json.dumps({"data": "the cat and the dog", "return-topic": "fusion.rt.x", "id": "r1"}).encode()
    incoming = [("traceparent", PARENT.encode()), ("tracestate", b"k=v"), ("other", b"x")]
    _, _, headers = handle(request, headers=incoming)
    assert dict(headers) == {"fusion-status": b"ok", "fusion-id": b"r1", "traceparent": PARENT.encode(),
                             "tracestate": b"k=v"}
    assert handle(request)[2] == [("fusion-status", b"ok"), ("fusion-id", b"r1")]  # no trace: no trace headers

    otel.clear_memory()
    _, _, headers = handle_traced(otel.provider().get_tracer("example"), "language", request, incoming)
    [span] = otel.memory_spans()
    assert span.name == "process language" and span.trace == PARENT.split("-")[1]
    assert span.parent == PARENT.split("-")[2]
    assert dict(headers)["traceparent"].decode().split("-")[1:3] == [span.trace, span.id]


OFF = textwrap.dedent("""
    import sys
    from fusion_celery import Pipeline, reactor, tracing
    from fusion_celery.testing import in_process_app, worker
    from fusion_celery.testing.producer import Producer

    seen = []  # the names of the headers of every record produced
    produce = Producer.produce
    def recording(self, topic, *args, headers=None, **kwargs):
        seen.extend(name for name, _ in (headers.items() if isinstance(headers, dict) else headers or []))
        return produce(self, topic, *args, headers=headers, **kwargs)
    Producer.produce = recording

    app = in_process_app("untraced", fusion_default_timeout=10)
    reactor("add", app=app)(lambda m: sum(m.data))
    reactor("sum", app=app, deps={"a": {"topic": "add", "args": [1, 2]}})(lambda m, r: r["a"])
    with worker(app):
        assert Pipeline("sum", app=app).delay(None, timeout=10).get(timeout=15) == 3
    assert seen.count("fusion-status") == 2 and seen.count("fusion-root-id") == 2, seen  # replies, requests
    assert not {"traceparent", "tracestate"} & set(seen), seen
    assert tracing._tracer is None
    loaded = sorted(m for m in sys.modules if m.startswith(("opentelemetry.propagate", "opentelemetry.sdk.trace",
                                                             "opentelemetry.trace.propagation.tracecontext")))
    assert not loaded, loaded
    print("untraced ok")
""")


def test_off_traces_nothing_and_imports_no_tracing_module():
    proc = subprocess.run([sys.executable, "-c", OFF], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and "untraced ok" in proc.stdout, proc.stdout + proc.stderr
