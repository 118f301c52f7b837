"""``celery fusion ...``: call reactors, look at return topics and waits, draw deps-maps.

Plugged into Celery's command line through the ``celery.commands`` entry point,
so the app comes from ``celery -A``::

    celery -A fusion_celery fusion call math '[1, 2, 3]' --wait
    celery -A fusion_celery fusion topics
    celery -A fusion_celery fusion reap
    celery -A fusion_celery fusion graph math '[1, 2, 3]' --format dot
    celery -A fusion_celery fusion status

Errors are one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

__all__ = ["fusion"]


def _app(ctx: click.Context) -> Any:
    from .application import install
    app = ctx.obj.app
    install(app)
    return app


def _json_arg(raw: str, what: str = "DATA") -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise click.BadParameter(f"not valid JSON ({exc}); quote it for the shell, e.g. '[1, 2, 3]'",
                                 param_hint=what) from None


def _fail(message: str) -> None:
    raise click.ClickException(message)


def _kafka(app: Any) -> Any:
    from .errors import ConfigurationError
    from .kafka import clients
    c = clients(app)
    try:
        c.check_reachable(10)
    except ConfigurationError as exc:
        _fail(str(exc))
    return c


@click.group(name="fusion", help="fusion-celery: call reactors, inspect return topics and waits, draw deps-maps.")
def fusion() -> None:
    import logging
    # The commands report trouble as one line; Kafka client chatter would bury it.
    for name in ("fusion_celery.rdkafka", "fusion_celery.kafka"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


@fusion.command(help="Send DATA (JSON) to TOPIC; with --wait print the answer, else the delivery record.")
@click.argument("topic")
@click.argument("data")
@click.option("--wait/--no-wait", default=False, help="Wait for the answer on a fresh return topic.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Seconds to wait for the answer.")
@click.option("--id", "corr_id", default=None, help="Correlation id to send (echoed in the reply headers).")
@click.pass_context
def call(ctx: click.Context, topic: str, data: str, wait: bool, timeout: float, corr_id: str | None) -> None:
    from confluent_kafka import TopicPartition

    from . import progress
    from .errors import FusionError, ProtocolError, RemoteError
    from .intake import run_id
    from .pipeline import delivery_record
    from .protocol import decode_reply, encode_request, valid_topic_name
    from .registry import now_ms

    payload = _json_arg(data)
    if not valid_topic_name(topic):
        raise click.BadParameter(f"{topic!r} is not a legal Kafka topic name", param_hint="TOPIC")
    app = _app(ctx)
    c = _kafka(app)
    if not c.topic_exists(topic):
        _fail(f"topic {topic!r} does not exist")
    if not wait:
        try:
            rec = c.produce(topic, encode_request(payload, None, id=corr_id), key=topic)
        except FusionError as exc:
            _fail(str(exc))
        click.echo(json.dumps(delivery_record(rec)))
        return

    return_topic = c.return_topic()
    consumer = c.consumer(**{"group.id": "fusion.cli", "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    tty = sys.stderr.isatty()
    try:
        consumer.assign([TopicPartition(return_topic, 0, 0)])  # see waiter.py: offset 0 avoids a lookup
        deadline = time.monotonic() + timeout
        rec = c.produce(topic, encode_request(payload, return_topic, id=corr_id,
                                              deadline=now_ms() + int(timeout * 1000)), key=topic)
        run = run_id(rec.topic(), rec.partition(), rec.offset(), rec.timestamp()[1])
        shown = None
        while time.monotonic() < deadline:
            for msg in consumer.consume(1, timeout=0.2):
                if msg.error() is not None:
                    continue
                if tty and shown:
                    click.echo("", err=True)
                try:
                    click.echo(json.dumps(decode_reply(msg.value(), msg.headers())))
                except RemoteError as exc:
                    _fail(f"{topic} replied with an error: {exc}")
                except ProtocolError as exc:
                    _fail(f"{topic} sent an unreadable reply: {exc}")
                return
            if tty:
                try:
                    seen = progress.read(app, run)
                except Exception:  # progress is a nicety; the backend may be elsewhere
                    seen = None
                if seen and seen != shown:
                    done, total = seen
                    click.echo(f"\rdeps done: {min(done, total)}/{total}", err=True, nl=False)
                    shown = seen
        _fail(f"no answer from {topic} within {timeout:g}s (run {run})")
    finally:
        consumer.close()
        c.delete_topics([return_topic])
        c.close()


@fusion.command(help="List live return topics with their age, owner and target.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def topics(ctx: click.Context, as_json: bool) -> None:
    from .reaper import return_topics
    app = _app(ctx)
    _kafka(app)
    found = return_topics(app)
    if as_json:
        click.echo(json.dumps([{"topic": t.name, "age_s": t.age_s, "owner": t.owner, "wait": t.wait_id,
                                "target": t.target} for t in found]))
        return
    if not found:
        click.echo("no return topics")
        return
    click.echo(f"{'RETURN TOPIC':<64} {'AGE':>9}  {'OWNER':<28} TARGET")
    for t in found:
        age = "?" if t.age_s is None else f"{t.age_s:.1f}s"
        click.echo(f"{t.name:<64} {age:>9}  {(t.owner or '(orphan)'):<28} {t.target or '-'}")


@fusion.command(help="Delete orphan return topics now (no pending wait names them).")
@click.option("--grace", type=click.FloatRange(min=0), default=None,
              help="Minimum age in seconds (default: the fusion_reaper_grace setting).")
@click.pass_context
def reap(ctx: click.Context, grace: float | None) -> None:
    from .reaper import reap as do_reap
    app = _app(ctx)
    _kafka(app)
    deleted = do_reap(app, grace)
    for name in deleted:
        click.echo(f"deleted {name}")
    click.echo(f"{len(deleted)} orphan return topic(s) deleted")


@fusion.command(help="Draw the deps-map of a reactor (by TOPIC) or pipeline (by name) for input DATA.")
@click.argument("target")
@click.argument("data", default="null")
@click.option("--format", "fmt", type=click.Choice(["mermaid", "dot"]), default="mermaid", show_default=True)
@click.pass_context
def graph(ctx: click.Context, target: str, data: str, fmt: str) -> None:
    from .errors import ConfigurationError, DepsMapError
    from .graph import DepsGraph
    from .message import Message
    from .runtime import reactors
    from .worker import import_reactor_modules

    payload = _json_arg(data)
    app = _app(ctx)
    try:
        import_reactor_modules(app)
    except ConfigurationError as exc:
        _fail(str(exc))
    known = reactors(app)
    if target in known:
        task = app.tasks[known[target]]
        deps = task.deps_fn
        deps_map = deps(Message(topic=target, data=payload, value={"data": payload})) if callable(deps) else deps
    elif f"fusion.pipeline.{target}" in app.tasks:
        deps = app.tasks[f"fusion.pipeline.{target}"].deps_fn
        deps_map = deps(payload) if callable(deps) else deps
    else:
        pipelines = sorted(n[len("fusion.pipeline."):] for n in app.tasks if n.startswith("fusion.pipeline."))
        _fail(f"no reactor serves topic {target!r} and no pipeline is named so "
              f"(reactors: {sorted(known) or 'none'}; pipelines: {pipelines or 'none'}; "
              f"are the modules in fusion_imports / FUSION_IMPORTS?)")
    if not deps_map:
        _fail(f"{target} has no deps for this input")
    try:
        g = DepsGraph(deps_map)
    except DepsMapError as exc:
        _fail(f"invalid deps-map: {exc}")
    click.echo(g.to_mermaid() if fmt == "mermaid" else g.to_dot())


@fusion.command(help="Show what the workers' waiters hold: pending waits, the oldest, counts by topic.")
@click.option("--timeout", type=float, default=2.0, show_default=True, help="Seconds to wait for workers.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def status(ctx: click.Context, timeout: float, as_json: bool) -> None:
    app = _app(ctx)
    try:
        replies = app.control.broadcast("fusion_status", reply=True, timeout=timeout)
    except Exception as exc:
        from kombu.utils.url import maybe_sanitize_url
        _fail(f"cannot reach the Celery broker {maybe_sanitize_url(app.conf.broker_url)}: {exc}")
    merged = {host: st for reply in replies or [] for host, st in reply.items()}
    if not merged:
        _fail(f"no worker answered within {timeout:g}s")
    if as_json:
        click.echo(json.dumps(merged))
        return
    for host, st in sorted(merged.items()):
        if "error" in st:
            click.echo(f"{host}: {st['error']}")
            continue
        oldest = "-" if st.get("oldest_age_s") is None else f"{st['oldest_age_s']:.1f}s ({st['oldest']['topic']})"
        click.echo(f"{host}: {st.get('pending', 0)} pending, oldest {oldest}, "
                   f"{st.get('completed', 0)} completed, {st.get('failed', 0)} failed")
        for topic, count in sorted((st.get("by_topic") or {}).items()):
            click.echo(f"    {topic}: {count}")
