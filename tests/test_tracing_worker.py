"""Tracing through real workers, Kafka and Redis: one pipeline call, one trace, every hop.

A real `celery worker` (prefork, its own deployment) traces with ``FUSION_TRACING=1`` and exports
its spans, from its main process (intakes, waiter) and its pool's children (tasks), over OTLP/HTTP
to a receiver in the test (``OTEL_TRACES_EXPORTER=otlp``, as a user would point it at a collector).
The test process calls the pipeline inside a span of its own and plays the foreign services, which
record their spans in memory: the spans of every process are checked as one trace.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from confluent_kafka import Consumer, Producer
from support import otel
from support.waiting import wait_for
from support.workers import REGISTRIES, isolated_env

from fusion_celery import Pipeline, create_app

pytestmark = pytest.mark.integration

TIMEOUT = 60.0


@pytest.fixture
def receiver() -> Iterator[otel.Receiver]:
    r = otel.Receiver()
    yield r
    r.close()


@pytest.fixture(params=REGISTRIES)
def traced_worker(request, worker_factory, receiver):
    """A tracing worker with a registry of its own, on each registry backend (waits keep their trace there)."""
    env = {**isolated_env(request.param), "FUSION_TRACING": "1", "OTEL_TRACES_EXPORTER": "otlp",
           "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint, "OTEL_SERVICE_NAME": "fusion-worker",
           "OTEL_BSP_SCHEDULE_DELAY": "100"}
    worker = worker_factory(name="traced", env=env, concurrency=2)
    return worker, env


def call_in_a_span(env: dict[str, str], topic: str, data, monkeypatch) -> tuple[object, str, str]:
    """Call the pipeline of ``topic`` with ``data`` from this process, inside a span; the answer, the
    span's trace id and its span id."""
    monkeypatch.setenv("CELERY_BROKER_URL", env["CELERY_BROKER_URL"])  # Celery prefers it to the app's
    monkeypatch.setenv("CELERY_RESULT_BACKEND", env["CELERY_RESULT_BACKEND"])
    client = create_app("traced-client", broker=env["CELERY_BROKER_URL"], backend=env["CELERY_RESULT_BACKEND"],
                        set_as_current=False)
    client.conf.fusion_tracing = True
    tracer = otel.provider().get_tracer("test")
    try:
        with tracer.start_as_current_span("test call") as span:
            answer = Pipeline(topic, app=client).delay(data, timeout=TIMEOUT).get(timeout=TIMEOUT + 30)
    finally:
        client.close()
    ctx = span.get_span_context()
    return answer, f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def test_one_pipeline_call_over_three_deps_is_one_trace_across_every_process(traced_worker, kit, receiver,
                                                                              monkeypatch):
    worker, env = traced_worker
    run = env["FUSION_TEST_RUN"]
    otel.clear_memory()
    copies, ignores = kit.topic(), kit.topic()
    services = [otel.ForeignService(Consumer, Producer, {"bootstrap.servers": kit.servers}, topic, fn,
                                    propagate=propagate)
                for topic, fn, propagate in [(copies, lambda d: d * 10, True), (ignores, lambda d: d + 1, False)]]
    for s in services:
        s.start()
    generic = f"{run}.generic"
    deps = {"a": {"topic": f"{run}.add", "args": [1, 2]},  # a fusion reactor
            "b": {"topic": copies, "args": 4},            # a foreign service that copies traceparent
            "c": {"topic": ignores, "args": 4}}           # one that knows nothing of it
    try:
        answer, trace_id, caller = call_in_a_span(env, generic, {"deps": deps}, monkeypatch)
    finally:
        for s in services:
            s.stop()
    assert answer == {"results": {"a": 3, "b": 40, "c": 5}, "echo": None}
    assert "traceparent" in services[1].seen_headers[0]  # sent to it too; it just ignores it

    # worker: intake, run, 3 x (send, reply received), add's intake, run and reply, body, reply, final reply
    # received; the test process: its call's span and the copying service's
    def all_spans():
        spans = receiver.spans + otel.memory_spans()
        return len(spans) >= 17 and spans
    spans = wait_for(all_spans, 60, "the spans of the worker's processes")
    assert otel.check_traced_call(spans, root=generic, deps={"a": f"{run}.add", "b": copies, "c": ignores},
                                  joined={"a", "b"}) == trace_id
    assert otel.one(spans, f"send {generic}").parent == caller
    assert {s.service for s in spans} == {"fusion-worker", "test-process"}
    print(otel.describe(spans))
    assert worker.stop() == 0
