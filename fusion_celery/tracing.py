"""OpenTelemetry tracing of a request's hops (``fusion_tracing``; off by default).

A request crosses processes twice per hop: over Kafka (a pipeline's call, each dependency
request, each reply) and over Celery (the intake hands the record to a reactor task, the
run hands its deps-map to dispatching subtasks and its processing step).  Each hop carries
W3C trace context:

* on Kafka, in the record's ``traceparent`` and ``tracestate`` headers (see
  docs/reference/protocol.md): a service that copies ``traceparent`` from a request to its
  reply, or makes it the parent of a span of its own, joins the trace;
* on Celery, in the task message's headers of the same names, which a task reads from its
  request (``task.request.traceparent``).  They are set when a signature is made
  (:func:`carry`), not when it is sent, because a chord's body is sent later by whichever
  process completes its last dependency (a waiter), in no span of the run;
* in the registry, in a wait's ``trace`` (the span that sent the request), so that the
  waiter that reads the reply, in another process, makes its span a child of it.

The spans follow OpenTelemetry's messaging conventions: ``send <topic>`` (PRODUCER) for each
record fusion sends, ``receive <topic>`` (CONSUMER) for each record an intake or a waiter
takes, and one INTERNAL span per task step (``run``, ``process``, ``combine``).

Off (the default) every function here returns at once, having created nothing: no span, no
header, and no OpenTelemetry module imported.  On, fusion uses the process's tracer provider;
when the user set none, it makes an SDK one from the ``OTEL_*`` environment (:func:`setup`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from celery import Celery

from .config import settings
from .errors import ConfigurationError

__all__ = ["HEADERS", "enabled", "setup", "flush", "send", "receive", "timed_out", "step", "carry", "parent_of",
           "kafka_headers"]

#: The trace-context headers fusion writes on its Kafka records and Celery task messages.
HEADERS = ("traceparent", "tracestate")

_NOTHING: contextlib.nullcontext[dict[str, str]] = contextlib.nullcontext({})
_lock = threading.Lock()
_tracer: Any = None
_provider: Any = None  # the SDK provider fusion made (None: the user's, or none yet)


def enabled(app: Celery) -> bool:
    """Whether ``app`` traces (``fusion_tracing``): the one check every hot path makes first."""
    return bool(settings(app).tracing)


def setup() -> Any:
    """The tracer fusion's spans come from, made on first use.

    When the process has no tracer provider of its own (the OpenTelemetry API's
    default), fusion sets an SDK one, configured as OpenTelemetry's SDKs are, from
    the environment: ``OTEL_TRACES_EXPORTER`` (comma-separated exporter names, as
    the installed packages register them: ``otlp_proto_http`` or ``otlp``,
    ``console``, ``none``; default ``otlp``), the exporters' own variables
    (``OTEL_EXPORTER_OTLP_ENDPOINT``, ...), ``OTEL_SERVICE_NAME`` and
    ``OTEL_RESOURCE_ATTRIBUTES`` for the resource, and ``OTEL_BSP_*`` for the
    batching.  A provider the user set before (``trace.set_tracer_provider``) is
    used as it is.

    Raises:
        ConfigurationError: the OpenTelemetry packages are not installed, or an exporter is unknown.
    """
    global _tracer, _provider
    if _tracer is not None:
        return _tracer
    with _lock:
        if _tracer is not None:
            return _tracer
        try:
            from opentelemetry import trace
        except ImportError:
            raise ConfigurationError("fusion_tracing needs OpenTelemetry: pip install 'fusion-celery[tracing]'") \
                from None
        if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):  # the API's default: nobody set one
            _provider = _sdk_provider()
            trace.set_tracer_provider(_provider)
        from . import __version__
        _tracer = trace.get_tracer("fusion_celery", __version__)
        return _tracer


def _sdk_provider() -> Any:
    """An SDK tracer provider exporting through ``OTEL_TRACES_EXPORTER``'s exporters, in batches."""
    from importlib.metadata import entry_points

    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or "fusion-celery"})
    provider = TracerProvider(resource=resource)
    names = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if n.strip()]
    known = {ep.name: ep for ep in entry_points(group="opentelemetry_traces_exporter")}
    for name in names:
        if name == "none":
            continue
        ep = known.get(name) or (known.get("otlp_proto_http") if name == "otlp" else None)
        if ep is None:
            raise ConfigurationError(f"OTEL_TRACES_EXPORTER: no exporter {name!r} is installed "
                                     f"(installed: {', '.join(sorted(known)) or 'none'})")
        provider.add_span_processor(BatchSpanProcessor(ep.load()()))
    return provider


def flush(timeout_ms: int = 5000) -> None:
    """Export the spans still batched in this process (a pool process or worker about to exit).

    Only the provider fusion made is flushed; a user's provider is the user's to flush.
    """
    if _provider is not None:
        _provider.force_flush(timeout_ms)


def parent_of(carrier: Mapping[str, Any] | Sequence[tuple[str, Any]] | None) -> Any:
    """The OpenTelemetry context ``carrier`` (headers with ``traceparent``: a dict, or a Kafka record's
    list of pairs) names, or None for none valid."""
    if carrier is not None and not isinstance(carrier, Mapping):
        from .protocol import headers_dict
        carrier = headers_dict(carrier)
    if not carrier or not carrier.get("traceparent"):
        return None
    from opentelemetry import trace
    from opentelemetry.propagate import extract
    context = extract({k: str(carrier[k]) for k in HEADERS if carrier.get(k)})
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def _link(carrier: Mapping[str, Any] | Sequence[tuple[str, Any]] | None, parent: Any) -> list[Any]:
    """A link to the span ``carrier`` names, unless it is ``parent``'s span or names none."""
    context = parent_of(carrier)
    if context is None:
        return []
    from opentelemetry import trace
    linked = trace.get_current_span(context).get_span_context()
    if parent is not None and trace.get_current_span(parent).get_span_context().span_id == linked.span_id:
        return []
    return [trace.Link(linked)]


def _inject() -> dict[str, str]:
    """The current span's trace context as headers (``traceparent``, ``tracestate`` when there is one)."""
    from opentelemetry.propagate import inject
    carrier: dict[str, str] = {}
    inject(carrier)
    return {k: v for k, v in carrier.items() if k in HEADERS}


def kafka_headers(context: Mapping[str, str]) -> list[tuple[str, bytes]]:
    """``context`` (what :func:`send` yields) as Kafka record headers."""
    return [(k, v.encode()) for k, v in context.items()]


def _control_flow(exc: BaseException) -> bool:
    """Whether ``exc`` ends a step as planned rather than failing it: a parked task's ``Ignore``,
    a ``Retry``, a claim's ``Later``."""
    from celery.exceptions import Ignore, Retry

    from .claims import Later
    return isinstance(exc, (Ignore, Retry, Later))


@contextlib.contextmanager
def _span(name: str, kind_name: str, parent: Any, links: list[Any], attributes: dict[str, Any]) -> Iterator[dict]:
    from opentelemetry import trace
    kind = getattr(trace.SpanKind, kind_name)
    with setup().start_as_current_span(name, context=parent, kind=kind, links=links,
                                       attributes={k: v for k, v in attributes.items() if v is not None},
                                       record_exception=False, set_status_on_exception=False) as span:
        try:
            yield _inject()
        except BaseException as exc:
            if not _control_flow(exc):
                span.record_exception(exc)
                span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:500]))
            raise


def _task_context(task: Any) -> Any:
    """The parent of a span a task starts: None (the current span) when there is one, as a Celery
    instrumentation's task span is; else the span its message's ``traceparent`` header names."""
    from opentelemetry import trace
    if task is None or trace.get_current_span().get_span_context().is_valid:
        return None
    return parent_of({k: getattr(task.request, k, None) for k in HEADERS})


def send(app: Celery, topic: str, *, task: Any = None, name: str | None = None, **attributes: Any) -> Any:
    """A PRODUCER span ``send <topic>`` (or ``name``) around putting a record on ``topic``.

    Its parent is the current span, or when there is none, the span ``task``'s message names.

    Yields the span's trace context as headers (``{}`` when tracing is off): the record
    carries them (:func:`kafka_headers`), and a wait keeps ``traceparent`` for its reply.

    Parameters:
        app: the app (its ``fusion_tracing`` decides).
        topic: the record's topic.
        task: the task sending it (a pipeline or dispatching subtask), if any.
        name: the span's name instead (a return topic's name is unique to a request: no span name;
            a reply's span is ``reply <request topic>``).
        attributes: more span attributes (``None`` values are left out).
    """
    if not enabled(app):
        return _NOTHING
    return _span(name or f"send {topic}", "PRODUCER", _task_context(task), [],
                 {"messaging.system": "kafka", "messaging.operation.type": "send",
                  "messaging.destination.name": topic, **attributes})


def receive(app: Celery, topic: str, *, parent: Mapping[str, Any] | None = None,
            link: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None, name: str | None = None,
            **attributes: Any) -> Any:
    """A CONSUMER span ``receive <topic>`` around handling a record taken from ``topic``.

    Parameters:
        app: the app (its ``fusion_tracing`` decides).
        topic: the record's topic (``messaging.destination.name``).
        parent: headers naming the parent span (the record's own for an intake; the wait's
            request for a waiter).  None or no valid ``traceparent``: the span starts a trace.
        link: headers naming a span to link to (a reply's ``traceparent``, when it is not the parent).
        name: the span's name (default ``receive <topic>``).
        attributes: more span attributes.
    """
    if not enabled(app):
        return _NOTHING
    context = parent_of(parent)
    return _span(name or f"receive {topic}", "CONSUMER", context, _link(link, context),
                 {"messaging.system": "kafka", "messaging.operation.type": "receive",
                  "messaging.destination.name": topic, **attributes})


def timed_out(app: Celery, topic: str, *, parent: str | None, **attributes: Any) -> Any:
    """An INTERNAL span ``timeout <topic>``, status ERROR, around failing a wait that got no reply.

    Its parent is the request's span (the wait's ``traceparent``), so the error reply the
    timeout causes stays in the request's trace.
    """
    if not enabled(app):
        return _NOTHING
    return _failed(_span(f"timeout {topic}", "INTERNAL", parent_of({"traceparent": parent}), [],
                         {"error.type": "DependencyTimeout", "messaging.destination.name": topic, **attributes}))


@contextlib.contextmanager
def _failed(span_context: Any) -> Iterator[dict]:
    """``span_context``'s span, marked as failed."""
    from opentelemetry import trace
    with span_context as context:
        trace.get_current_span().set_status(trace.Status(trace.StatusCode.ERROR, "no reply before the deadline"))
        yield context


def step(task: Any, what: str, **attributes: Any) -> Any:
    """An INTERNAL span around a task step: ``<task name> run`` for a run's start step, the task's
    name for its finish step (``<name>.process``, ``<name>.combine``).

    Its parent is the current span when there is one (a Celery instrumentation's task span),
    else the one the task message's ``traceparent`` header names (:func:`carry`).
    """
    if not enabled(task.app):
        return _NOTHING
    name = task.name if task.name.endswith(f".{what}") else f"{task.name} {what}"
    return _span(name, "INTERNAL", _task_context(task), [],
                 {"celery.task_name": task.name, "celery.task_id": task.request.id, **attributes})


def carry(app: Celery, sig: Any) -> Any:
    """``sig`` with the current span's trace context in its message headers (unchanged when tracing is off).

    Set when the signature is made, so that the task joins the trace however late and
    from whatever process it is sent.
    """
    if not enabled(app):
        return sig
    context = _inject()
    if context:
        sig.options["headers"] = {**(sig.options.get("headers") or {}), **context}
    return sig
