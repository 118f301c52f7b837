"""fusion-celery settings: names, defaults and environment overrides.

Every setting lives in ``app.conf`` under a ``fusion_`` name, like Celery's own
settings, so ``app.config_from_object(...)`` and ``app.conf.update(...)`` work
as usual.  Each one can also be set from the environment (upper-case name, e.g.
``FUSION_KAFKA_BOOTSTRAP_SERVERS``); the environment wins over the defaults but
not over values set explicitly in code after :func:`apply_defaults` ran.

When the local stack was started with ``make up``, ``.stack/env`` holds the
endpoints; it is read as a last-resort default so that a fresh checkout finds
its own services without any configuration.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, make_dataclass
from pathlib import Path
from typing import Any

from celery import Celery

__all__ = ["SETTINGS", "Setting", "Settings", "settings", "reload", "defaults", "stack_env"]


def _csv(value: str) -> list[str]:
    """A JSON list (``["a{1,3}", "b"]``, for items with commas) or comma-separated items."""
    if value.lstrip().startswith("["):
        parsed = json.loads(value)
        if not isinstance(parsed, list) or not all(isinstance(x, str) for x in parsed):
            raise ValueError("expected a JSON list of strings")
        return parsed
    return [part.strip() for part in value.split(",") if part.strip()]


def _json_object(value: str) -> dict[str, Any]:
    parsed = json.loads(value)
    if not isinstance(parsed, dict):
        raise ValueError("expected a JSON object")
    return parsed


def _bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Setting:
    """One documented setting: its ``app.conf`` name, default and how to parse the environment."""

    name: str
    default: Any
    doc: str
    parse: Callable[[str], Any] = str

    @property
    def env(self) -> str:
        return self.name.upper()

    @property
    def attr(self) -> str:
        """The attribute of :class:`Settings` that holds it (the name without ``fusion_``)."""
        return self.name.removeprefix("fusion_")

    def coerce(self, value: Any) -> Any:
        """``value`` (from ``app.conf``: a string from a config file, or already typed) as this setting's type."""
        if value is None:
            return self.default
        if self.parse is _bool:
            return _bool(value) if isinstance(value, str) else bool(value)
        if self.parse in (int, float):
            if isinstance(value, bool):
                raise ValueError(f"setting {self.name} must be a number, got {value!r}")
            return self.parse(value)
        if isinstance(value, str) and self.parse in (_csv, _json_object):
            return self.parse(value)
        return value


SETTINGS: tuple[Setting, ...] = (
    Setting("fusion_kafka_bootstrap_servers", "127.0.0.1:9092",
            "Kafka bootstrap servers (librdkafka `bootstrap.servers`)."),
    Setting("fusion_kafka_config", {},
            "librdkafka settings for every client (e.g. `security.protocol`, `sasl.mechanism`, "
            "`sasl.username`, `sasl.password`, `ssl.ca.location`).", _json_object),
    Setting("fusion_kafka_producer_config", {}, "Extra librdkafka settings for producers.", _json_object),
    Setting("fusion_kafka_consumer_config", {}, "Extra librdkafka settings for consumers.", _json_object),
    Setting("fusion_kafka_admin_config", {}, "Extra librdkafka settings for the admin client.", _json_object),
    Setting("fusion_zookeeper_hosts", "127.0.0.1:2181",
            "ZooKeeper hosts, `host:port[,host:port]` (used when a `zookeeper://` registry URL names none)."),
    Setting("fusion_zookeeper_session_timeout", 10.0,
            "ZooKeeper session timeout in seconds: how long a dead worker keeps its buckets of waits.", float),
    Setting("fusion_zookeeper_connect_timeout", 5.0,
            "Seconds a ZooKeeper registry call waits for a connection before failing.", float),
    Setting("fusion_zookeeper_time_boundary", 1.0,
            "Seconds the set of live waiters must stay unchanged before the ZooKeeper buckets are divided "
            "again (kazoo `SetPartitioner` `time_boundary`).", float),
    Setting("fusion_zookeeper_username", None,
            "User of the ZooKeeper registry's digest authentication. With a password (the next setting), every "
            "znode fusion-celery creates (waits, buckets, waiters, locks) gets a digest ACL that admits this "
            "identity alone (unset or empty: no authentication, znodes open to every client)."),
    Setting("fusion_zookeeper_password", None,
            "Password of `fusion_zookeeper_username` (ZooKeeper digest authentication). Celery masks settings "
            "named like this one in `celery inspect conf` and Flower; never logged."),
    Setting("fusion_imports", [], "Modules that define reactors, imported by the worker at start "
            "(comma-separated in the environment).", _csv),
    Setting("fusion_registry_url", "kafka://fusion.waits",
            "Where pending waits are kept: `kafka://<compacted topic>`, "
            "`zookeeper://host:port/path`, `memory://` (tests only), or the scheme of a backend another package "
            "adds through the entry-point group `fusion_celery.registries`."),
    Setting("fusion_registry_partitions", 12,
            "Partitions of the Kafka registry topic, or buckets of the ZooKeeper registry: the unit in which "
            "waits are divided among workers (the same value in every process).", int),
    Setting("fusion_return_topic_prefix", "fusion.rt.",
            "Prefix of the return topics fusion-celery makes: ephemeral ones, lease pools' (`<prefix>lease.`) and the "
            "shared ones (`<prefix>shared.`)."),
    Setting("fusion_return_topic_pool", 0,
            "Return topics each process creates ahead of time, in one request per batch, so that a dispatch "
            "does not wait for the Kafka controller (0: create each topic when it is needed). Unused ones are "
            "deleted when the process stops, and none older than half of the reaper's grace is handed out.", int),
    Setting("fusion_reply_channel", "leased",
            "How a dependency's return topic is had, unless its deps-map entry (`reply`), its reactor or its "
            "pipeline says otherwise: `leased` (long-lived topics of a per-worker pool, each leased to one wait "
            "at a time), `shared` (a few permanent topics; only for services that echo the `fusion-id` header) "
            "or `ephemeral` (a topic created and deleted per request). See docs/operations/topics.md."),
    Setting("fusion_lease_pool_max", 512,
            "Most topics a worker's lease pool holds, ready and leased; a wait that finds the pool at this bound "
            "gets an ephemeral topic.", int),
    Setting("fusion_lease_batch", 16,
            "Topics a lease pool creates at once (in one CreateTopics request) when it has none ready; also how "
            "many ready topics it keeps when idle.", int),
    Setting("fusion_lease_cooldown", 0.5,
            "Seconds a leased topic rests after its wait's reply before it is leased again; a topic that "
            "receives anything meanwhile is retired (deleted).", float),
    Setting("fusion_lease_idle", 300.0,
            "Seconds a ready leased topic may go unused before the pool deletes it (down to `fusion_lease_batch` "
            "topics).", float),
    Setting("fusion_return_topic_retention_ms", 7 * 24 * 3600 * 1000,
            "`retention.ms` of return topics: a safety net should a topic outlive the reaper.", int),
    Setting("fusion_reply_allowlist", [], "Regular expressions of extra topics a reactor may reply to "
            "(besides return topics with the prefix above); in the environment comma-separated or a JSON list.", _csv),
    Setting("fusion_reply_id_required", False,
            "Accept on a return topic only records whose `fusion-id` header is the wait's id. Off: a record "
            "without any fusion header (a service that knows nothing of fusion-celery) is accepted too; a "
            "record with a `fusion-id` or `fusion-status` header is accepted only with the wait's id either "
            "way. Turn it on when every service echoes the id.", _bool),
    Setting("fusion_dlq_suffix", ".dlq", "Dead-letter topic of a reactor: its topic plus this suffix."),
    Setting("fusion_consumer_group_prefix", "fusion.reactor.",
            "Consumer group of a reactor: this prefix plus its topic (override per reactor with `group=`)."),
    Setting("fusion_reactor_partitions", 3, "Partitions of a reactor topic fusion-celery creates.", int),
    Setting("fusion_topic_replication_factor", 0,
            "Copies of each topic fusion-celery creates (registry, reactor, dead-letter and return topics): "
            "0 takes min(3, the brokers the cluster lists when the process first creates a topic).", int),
    Setting("fusion_topic_min_insync_replicas", 0,
            "`min.insync.replicas` of each topic fusion-celery creates: 0 takes 2 where the replication factor "
            "is 3 or more (a broker may be down and no acknowledged record is lost with one more), else 1.", int),
    Setting("fusion_create_topics", True, "Create missing reactor and dead-letter topics at worker start.", _bool),
    Setting("fusion_max_in_flight", 100,
            "Messages per reactor handed to Celery and not yet finished; past it, consumption pauses.", int),
    Setting("fusion_max_message_bytes", 1_000_000, "Largest request or reply accepted, in bytes.", int),
    Setting("fusion_default_timeout", 3600.0, "Seconds a dependency or pipeline waits for its reply.", float),
    Setting("fusion_run_lease", 300.0,
            "Seconds a started reactor run, processing step, dispatch or reply holds its run-once lease when "
            "its task has no hard time limit (`time_limit` / `task_time_limit`, which wins). The worker renews "
            "the lease every third of it while the step runs, so another copy of its message (a redelivery) "
            "runs only after the holder finished, or this long after the holder died.", float),
    Setting("fusion_run_restart_after", 60.0,
            "Seconds after which an intake sends a reactor run again that shows no sign of having started "
            "(its Celery message was lost, e.g. popped by a broker that went away); doubled after each try, "
            "up to ten minutes. The copies are harmless: a run starts once (0: never).", float),
    Setting("fusion_reaper_interval", 60.0, "Seconds between two runs of the orphan return-topic reaper.", float),
    Setting("fusion_reaper_grace", 300.0,
            "Seconds after the later of the creation time and the deadline in its name before a return "
            "topic that no pending wait names counts as an orphan.", float),
    Setting("fusion_startup_timeout", 15.0, "Seconds the worker gives Kafka to answer at start.", float),
    Setting("fusion_kafka_retry_timeout", 60.0,
            "Seconds a Kafka operation on the request path (looking up or creating a topic, sending a request, "
            "reply or registry record) keeps retrying while Kafka is unreachable or restarting, before it fails "
            "with an error naming the topic; also the producer's `message.timeout.ms`.", float),
    Setting("fusion_kafka_client_recycle_topics", 1000,
            "Distinct topics a long-lived Kafka client (a process's producer and admin client, a waiter's reply "
            "consumers) may touch before it is replaced by a fresh one (0: never). librdkafka keeps every topic "
            "a client touched, deleted return topics included, and scans them all every second and on every "
            "metadata answer: without this, the CPU a request costs grows with the requests a worker served.", int),
    Setting("fusion_metrics_port", 0,
            "TCP port on which each worker's main process serves Prometheus metrics at `/metrics` (0: off). "
            "Needs the `metrics` extra (`prometheus-client`). See docs/operations/metrics.md.", int),
    Setting("fusion_metrics_address", "0.0.0.0",
            "Address the metrics server binds to (with `fusion_metrics_port`): every interface by default, as "
            "Prometheus scrapes from elsewhere; `127.0.0.1` keeps it to the host.", str),
    Setting("fusion_tracing", False,
            "Trace every request with OpenTelemetry: spans for the pipeline call, the intake, the reactor run, each "
            "dependency request, each reply received and the final reply, with W3C `traceparent` in the Kafka "
            "headers. Needs the `tracing` extra. Off: no span, no header, no OpenTelemetry import. Without a "
            "tracer provider of the user's, one is made from the `OTEL_*` environment (`OTEL_TRACES_EXPORTER`, "
            "`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_SERVICE_NAME`, ...). See docs/operations/tracing.md.", _bool),
    Setting("fusion_malloc_arena_max", 2,
            "glibc malloc arenas a worker may use (0: glibc's default, eight per core), set when the worker "
            "starts, as `MALLOC_ARENA_MAX` does (which wins when set): with librdkafka's many threads the "
            "default lets a worker's resident memory creep up with free memory the arenas keep.", int),
    Setting("fusion_malloc_mmap_threshold", 262144,
            "Bytes from which glibc serves an allocation with a mapping of its own, returned to the system when "
            "freed; set when the worker starts, as `MALLOC_MMAP_THRESHOLD_` does (which wins when set). 0: "
            "glibc's default, which raises the threshold after large frees and so lets librdkafka's large "
            "buffers leave holes in the heap that a long-running worker's resident memory keeps.", int),
)

def stack_env(path: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Read ``.stack/env`` (written by ``make up``) into a dict; empty if absent."""
    candidates = [Path(path)] if path else [Path(os.environ.get("FUSION_STACK_ENV", ".stack/env"))]
    if not path:
        candidates.append(Path(__file__).resolve().parent.parent / ".stack" / "env")
    for candidate in candidates:
        if candidate.is_file():
            values = {}
            for line in candidate.read_text().splitlines():
                line = line.strip()
                if not line or line.startswith("#") or "=" not in line:
                    continue
                key, _, value = line.removeprefix("export ").partition("=")
                values[key.strip()] = value.strip().strip("'\"")
            return values
    return {}


def defaults() -> dict[str, Any]:
    """The ``fusion_*`` settings as a defaults layer for ``app.add_defaults``.

    Order of precedence: a value the user set on ``app.conf`` (or through
    ``config_from_object``), then the environment, then ``.stack/env``, then the
    built-in default.
    """
    local = stack_env()
    values: dict[str, Any] = {}
    for s in SETTINGS:
        raw = os.environ.get(s.env, local.get(s.env))
        if raw is None:
            values[s.name] = s.default
            continue
        try:
            values[s.name] = s.parse(raw)
        except ValueError as exc:
            if s.parse is _json_object:
                # librdkafka settings hold passwords: name the variable and the JSON error, never the value
                raise ValueError(f"environment variable {s.env} is invalid: {exc}") from None
            raise ValueError(f"environment variable {s.env}={raw!r} is invalid: {exc}") from None
    return values


#: Every setting as a typed attribute (``kafka_bootstrap_servers``, ``default_timeout``, ...).
Settings = make_dataclass(
    "Settings", [(s.attr, Any) for s in SETTINGS], frozen=True,
    namespace={"__doc__": "The fusion settings of one app, typed: ``settings(app).default_timeout`` is a float."})


def settings(app: Celery) -> Any:
    """The fusion settings of ``app``, read from ``app.conf`` once and kept on the app.

    Each value is converted to its setting's type once, here (a config file or
    the environment gives strings), so callers use it as it is, and a wrong value
    fails at the first read instead of deep in a request.  The worker reads them
    again when it starts (after every config module was loaded); code that changes
    a ``fusion_*`` setting of an app already in use calls :func:`reload`.

    Parameters:
        app: the app.

    Returns:
        A frozen :class:`Settings`: one attribute per setting, named without ``fusion_``
        and of the setting's type (``settings(app).default_timeout`` is a float).

    Raises:
        ValueError: a setting holds a value of the wrong type.
    """
    cached = app.__dict__.get("_fusion_settings")
    if cached is None:
        cached = reload(app)
    return cached


def reload(app: Celery) -> Any:
    """Read ``app``'s fusion settings from ``app.conf`` again and keep them (see :func:`settings`).

    Parameters:
        app: the app.

    Returns:
        The new :class:`Settings`.

    Raises:
        ValueError: a setting holds a value of the wrong type.
    """
    conf = app.conf
    values = Settings(**{s.attr: s.coerce(conf.get(s.name)) for s in SETTINGS})
    app.__dict__["_fusion_settings"] = values
    return values
