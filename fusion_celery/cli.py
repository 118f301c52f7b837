"""``celery fusion ...``: call reactors, look at return topics and waits, draw deps-maps, grant Kafka ACLs.

Plugged into Celery's command line through the ``celery.commands`` entry point,
so the app comes from ``celery -A``::

    celery -A fusion_celery fusion call math '[1, 2, 3]' --wait
    celery -A fusion_celery fusion topics
    celery -A fusion_celery fusion reap
    celery -A fusion_celery fusion graph math '[1, 2, 3]' --format dot
    celery -A fusion_celery fusion status
    celery -A fusion_celery fusion acls --principal User:fusion [--apply]

Errors are one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from typing import Any, NoReturn

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


def _fail(message: str) -> NoReturn:
    raise click.ClickException(message)


def _kafka(app: Any) -> Any:
    from .clients import clients
    from .errors import ConfigurationError
    try:
        c = clients(app)
        c.check_reachable(10)
    except ConfigurationError as exc:
        _fail(str(exc))
    return c


@click.group(name="fusion", help="fusion-celery: call reactors, inspect return topics and waits, draw deps-maps.")
def fusion() -> None:
    import logging
    # The commands report trouble as one line; Kafka client chatter would bury it.
    for name in ("fusion_celery.rdkafka", "fusion_celery.transport", "fusion_celery.clients"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


def _request_key(key: str | None, corr_id: str | None) -> str:
    """The Kafka key of ``call``'s request: ``--key``, else the correlation id, else a fresh random one.

    Never the topic's name: every request would land on one partition of the topic.
    """
    if key is not None:
        return key
    return corr_id if corr_id is not None else uuid.uuid4().hex


def progress_bar(done: int, total: int, width: int = 20) -> str:
    """A one-line progress bar of ``done`` of ``total`` deps: ``[##########----------] 1/2 deps done``."""
    filled = width * min(done, total) // total if total > 0 else width
    return f"[{'#' * filled}{'-' * (width - filled)}] {min(done, total)}/{total} deps done"


def _run_progress(app: Any, run: str) -> tuple[int, int] | None:
    """``(done, total)`` of the run ``run`` while its task state is ``PROGRESS``, else None.

    Read where every Celery user would read it (``AsyncResult(run).info``, see
    :mod:`fusion_celery.taskstate`); a result backend this command cannot reach shows nothing.
    """
    from celery.result import AsyncResult

    from .taskstate import PROGRESS
    try:
        result = AsyncResult(run, app=app)
        info = result.info if result.state == PROGRESS else None
    except Exception:  # progress is a nicety; the backend may be elsewhere
        return None
    if not isinstance(info, dict):
        return None
    return int(info.get("done", 0)), int(info.get("total", 0))


@fusion.command(help="Send DATA (JSON) to TOPIC; with --wait print the answer, else the delivery record.")
@click.argument("topic")
@click.argument("data")
@click.option("--wait/--no-wait", default=False,
              help="Wait for the answer on a fresh return topic; meanwhile show the progress of the reactor's deps "
                   "on stderr (a bar when stdout is a terminal, else a line per change).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Seconds to wait for the answer.")
@click.option("--id", "corr_id", default=None, help="Correlation id to send (echoed in the reply headers).")
@click.option("--key", default=None,
              help="Kafka key of the request (default: its correlation id, so that requests spread over the "
                   "topic's partitions; requests with the same key land on one partition).")
@click.pass_context
def call(ctx: click.Context, topic: str, data: str, wait: bool, timeout: float, corr_id: str | None,
         key: str | None) -> None:
    from confluent_kafka import TopicPartition

    from .clients import close_clients
    from .clock import now_ms
    from .config import settings
    from .errors import FusionError, ProtocolError, RemoteError
    from .intake import run_id
    from .pipeline import delivery_record
    from .protocol import decode_reply, encode_request, reply_rejection, valid_topic_name
    from .returntopics import take

    payload = _json_arg(data)
    if not valid_topic_name(topic):
        raise click.BadParameter(f"{topic!r} is not a legal Kafka topic name", param_hint="TOPIC")
    app = _app(ctx)
    c = _kafka(app)
    if not c.topic_exists(topic):
        _fail(f"topic {topic!r} does not exist")
    if not wait:
        try:
            rec = c.produce(topic, encode_request(payload, None, id=corr_id), key=_request_key(key, corr_id))
        except FusionError as exc:
            _fail(str(exc))
        click.echo(json.dumps(delivery_record(rec)))
        return

    corr_id = corr_id or uuid.uuid4().hex  # the reply must echo it (see protocol.reply_rejection)
    # One deadline for the return topic's name (no wait is registered: the name alone keeps the
    # reaper away until then, plus its grace), the request and this command's wait.
    deadline_ms = now_ms() + int(timeout * 1000)
    return_topic = take(app, deadline_ms)
    consumer = c.consumer(**{"group.id": "fusion.cli", "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    tty = sys.stdout.isatty()
    try:
        consumer.assign([TopicPartition(return_topic, 0, 0)])  # see waiter.py: offset 0 avoids a lookup
        deadline = time.monotonic() + max(0.0, (deadline_ms - now_ms()) / 1000)
        try:
            rec = c.produce(topic, encode_request(payload, return_topic, id=corr_id, deadline=deadline_ms),
                            key=_request_key(key, corr_id))
        except FusionError as exc:
            _fail(str(exc))
        run = run_id(rec.topic(), rec.partition(), rec.offset(), rec.timestamp()[1])
        shown = None
        while time.monotonic() < deadline:
            for msg in consumer.consume(1, timeout=0.2):
                if msg.error() is not None:
                    continue
                why = reply_rejection(msg.headers(), corr_id, require_id=settings(app).reply_id_required)
                if why is not None:
                    click.echo(f"ignored a record on {return_topic}: {why}", err=True)
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
            seen = _run_progress(app, run)
            if seen and seen != shown:
                if tty:
                    click.echo(f"\r{progress_bar(*seen)}", err=True, nl=False)
                else:
                    click.echo(f"deps done: {seen[0]}/{seen[1]}", err=True)
                shown = seen
        _fail(f"no answer from {topic} within {timeout:g}s (run {run})")
    finally:
        consumer.close()
        c.delete_topics([return_topic])
        close_clients(app)


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
              help="Seconds after the later of a topic's creation time and deadline (default: the "
                   "fusion_reaper_grace setting).")
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


# -- acls ----------------------------------------------------------------------------------------
#: Consumer groups with fixed names: the waiter's reply readers (waiter.py), the reader of every pending
#: wait (backends/kafka.py: the reaper, `celery fusion topics`) and `celery fusion call --wait` (above).
FIXED_GROUPS = ("fusion.reply-readers", "fusion.registry-reader", "fusion.cli")


def deployment_acls(app: Any, principal: str, host: str = "*", calls: tuple[str, ...] = ()) -> list[Any]:
    """The Kafka ACL bindings a deployment's workers need, every one for ``principal`` alone.

    Computed from the app's settings and the reactors ``fusion_imports`` defines:

    - the registry topic of a ``kafka://`` registry (literal: read, write, describe, create) and its
      consumer group ``fusion.waiters.<topic>``: a registry record names the task a waiter completes
      and the signatures it applies, so whoever may write the topic decides what the workers run;
    - return topics, as a prefix (create, delete, describe, read, write: one topic per wait);
    - each reactor's topic, dead-letter topic and consumer group (create only when
      ``fusion_create_topics`` is on);
    - ``calls``: topics the deps-maps and pipelines send requests to beyond this deployment's reactors
      (describe, write); a name ending in ``*`` is a prefix;
    - the cluster: ``IdempotentWrite`` (brokers before Kafka 3.0 ask it of idempotent producers).
    """
    from confluent_kafka.admin import AclBinding, AclOperation, AclPermissionType, ResourcePatternType, ResourceType

    from .backends.kafka import GROUP_PREFIX, KafkaRegistry
    from .config import settings
    from .intake import consumer_group, dlq_topic
    from .runtime import reactors
    from .worker import import_reactor_modules

    import_reactor_modules(app)
    op = AclOperation
    conf = settings(app)
    create = (op.CREATE,) if conf.create_topics else ()
    grants: list[tuple[Any, str, Any, tuple[Any, ...]]] = []
    url = str(conf.registry_url)
    if url.startswith("kafka:"):
        registry = KafkaRegistry(app, url).topic
        grants.append((ResourceType.TOPIC, registry, ResourcePatternType.LITERAL,
                       (op.CREATE, op.DESCRIBE, op.READ, op.WRITE)))
        grants.append((ResourceType.GROUP, f"{GROUP_PREFIX}{registry}", ResourcePatternType.LITERAL,
                       (op.DESCRIBE, op.READ)))
    grants.append((ResourceType.TOPIC, str(conf.return_topic_prefix), ResourcePatternType.PREFIXED,
                   (op.CREATE, op.DELETE, op.DESCRIBE, op.READ, op.WRITE)))
    grants += [(ResourceType.GROUP, group, ResourcePatternType.LITERAL, (op.DESCRIBE, op.READ))
               for group in FIXED_GROUPS]
    for topic, name in sorted(reactors(app).items()):
        task = app.tasks[name]
        # WRITE on the reactor's own topic: deps-maps of this deployment call its reactors.
        grants.append((ResourceType.TOPIC, topic, ResourcePatternType.LITERAL,
                       (*create, op.DESCRIBE, op.READ, op.WRITE)))
        grants.append((ResourceType.TOPIC, dlq_topic(app, topic), ResourcePatternType.LITERAL,
                       (*create, op.DESCRIBE, op.WRITE)))
        grants.append((ResourceType.GROUP, consumer_group(app, task), ResourcePatternType.LITERAL,
                       (op.DESCRIBE, op.READ)))
    for name in calls:
        prefixed = name.endswith("*")
        grants.append((ResourceType.TOPIC, name.rstrip("*"),
                       ResourcePatternType.PREFIXED if prefixed else ResourcePatternType.LITERAL,
                       (op.DESCRIBE, op.WRITE)))
    grants.append((ResourceType.BROKER, "kafka-cluster", ResourcePatternType.LITERAL, (op.IDEMPOTENT_WRITE,)))
    bindings: dict[Any, None] = {}  # ordered and without duplicates (a --calls topic may be a reactor's)
    for rtype, name, pattern, ops in grants:
        for operation in ops:
            bindings[AclBinding(rtype, name, pattern, principal, host, operation, AclPermissionType.ALLOW)] = None
    return list(bindings)


def _acl_rows(bindings: list[Any]) -> list[tuple[str, str, str, str, list[str]]]:
    """One row per resource: (host, resource type, pattern type, name, operations)."""
    rows: dict[tuple[str, str, str, str], list[str]] = {}
    for b in bindings:
        rows.setdefault((b.host, b.restype.name, b.resource_pattern_type.name, b.name), []).append(b.operation.name)
    return [(*key, ops) for key, ops in rows.items()]


def _kafka_acls_command(servers: str, principal: str, row: tuple[str, str, str, str, list[str]]) -> str:
    """The ``kafka-acls.sh`` command line that adds one row of grants."""
    import shlex
    host, rtype, pattern, name, ops = row
    resource = {"TOPIC": f"--topic {shlex.quote(name)}", "GROUP": f"--group {shlex.quote(name)}",
                "BROKER": "--cluster"}[rtype]
    camel = " ".join(f"--operation {''.join(w.capitalize() for w in o.split('_'))}" for o in ops)
    return (f"kafka-acls.sh --bootstrap-server {shlex.quote(servers)} --add --allow-principal "
            f"{shlex.quote(principal)} --allow-host {shlex.quote(host)} {camel} {resource} "
            f"--resource-pattern-type {pattern.lower()}")


def _registry_audit(admin: Any, registry: str, group: str, principal: str) -> list[str]:
    """ALLOW grants in force that let a principal other than ``principal`` use the registry topic or group.

    A ``MATCH`` filter finds the literal, prefixed and wildcard (``*``) bindings that cover a resource.
    """
    from confluent_kafka.admin import (
        AclBindingFilter,
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
    )

    found = []
    for rtype, name in ((ResourceType.TOPIC, registry), (ResourceType.GROUP, group)):
        flt = AclBindingFilter(rtype, name, ResourcePatternType.MATCH, None, None, AclOperation.ANY,
                               AclPermissionType.ALLOW)
        for b in admin.describe_acls(flt, request_timeout=30).result(35):
            if b.principal != principal:
                found.append(f"{b.principal} (host {b.host}) {b.operation.name} on {b.restype.name} "
                             f"{b.resource_pattern_type.name} {b.name!r}")
    return sorted(set(found))


@fusion.command(help="Print, or with --apply create, the Kafka ACLs a deployment's workers need, for PRINCIPAL "
                     "only: the registry topic and its consumer group, return topics (a prefix), the reactors "
                     "of fusion_imports with their dead-letter topics and consumer groups.")
@click.option("--principal", required=True, help="The workers' Kafka principal, e.g. User:fusion.")
@click.option("--host", default="*", show_default=True, help="Host the grants are limited to.")
@click.option("--calls", "calls", multiple=True, metavar="TOPIC",
              help="A topic the deps-maps or pipelines send requests to that is not one of these reactors "
                   "(repeatable; a trailing * makes it a prefix).")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "kafka-acls"]), default="table",
              show_default=True, help="How to print the grants: a table, JSON, or kafka-acls.sh commands.")
@click.option("--apply", "apply_", is_flag=True,
              help="Create the ACLs with the app's Kafka settings (run it with an administrator's credentials), "
                   "then warn about other principals allowed on the registry topic or group.")
@click.pass_context
def acls(ctx: click.Context, principal: str, host: str, calls: tuple[str, ...], fmt: str, apply_: bool) -> None:
    from confluent_kafka import KafkaException

    from .backends.kafka import GROUP_PREFIX, KafkaRegistry
    from .config import settings
    from .errors import ConfigurationError

    kind, _, name = principal.partition(":")
    if not kind or not name:
        raise click.BadParameter(f"{principal!r} is not a principal; use TYPE:NAME, e.g. User:fusion",
                                 param_hint="--principal")
    app = _app(ctx)
    try:
        bindings = deployment_acls(app, principal, host, calls)
    except ConfigurationError as exc:
        _fail(str(exc))
    rows = _acl_rows(bindings)
    if fmt == "json":
        click.echo(json.dumps([{"principal": principal, "host": h, "permission": "ALLOW", "resource_type": r,
                                "pattern_type": p, "name": n, "operations": ops} for h, r, p, n, ops in rows]))
    elif fmt == "kafka-acls":
        servers = str(settings(app).kafka_bootstrap_servers)
        for row in rows:
            click.echo(_kafka_acls_command(servers, principal, row))
    else:
        click.echo(f"{'RESOURCE':<8} {'PATTERN':<9} {'NAME':<56} OPERATIONS (ALLOW {principal}, host {host})")
        for _h, r, p, n, ops in rows:
            click.echo(f"{r:<8} {p:<9} {n:<56} {','.join(ops)}")
    if not apply_:
        return
    admin = _kafka(app).admin
    try:
        for binding, future in admin.create_acls(bindings, request_timeout=30).items():
            try:
                future.result(35)
            except KafkaException as exc:
                _fail(f"cannot create the ACL {binding.restype.name} {binding.resource_pattern_type.name} "
                      f"{binding.name!r} {binding.operation.name}: {exc.args[0].str()}")
        click.echo(f"applied {len(bindings)} ACL binding(s) for {principal}", err=True)
        url = str(settings(app).registry_url)
        if url.startswith("kafka:"):
            registry = KafkaRegistry(app, url).topic
            others = _registry_audit(admin, registry, f"{GROUP_PREFIX}{registry}", principal)
            for grant in others:
                click.echo(f"warning: {grant}: this principal may also use the registry, and whoever can "
                           f"write it decides what the workers run", err=True)
    except KafkaException as exc:
        _fail(f"cannot apply the ACLs: {exc.args[0].str()}")
