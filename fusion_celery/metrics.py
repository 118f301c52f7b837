"""Prometheus metrics of a worker, served by its main process (``fusion_metrics_port``; off by default).

What an operator alerts on: waits pending and how long they take, replies and their status,
timeouts, dead letters, how far each intake is behind its topic, the return topics made and
deleted, and the share of the registry each worker holds.  The metrics are counted from the
signals of :mod:`fusion_celery.signals` and read from the waiter and the intakes when scraped;
nothing is counted when the setting is 0 (no receiver is connected, no module imported).

Where each count happens decides how it reaches the main process's HTTP server:

* the waiter and the intakes live in the main process: waits pending, registry partitions
  and intake lag are read from them at scrape time (:class:`Live`), and the waits' outcomes,
  timeouts and dead letters are counted by receivers of signals sent there;
* replies are sent by reactors' steps, and return topics are created and leased by
  dispatches, in the pool's children.  With a forking pool (prefork, Celery's default) those
  counts use prometheus-client's multiprocess mode: each process writes its counters to
  memory-mapped files in one directory, and the main process adds them up at scrape time,
  those of children that exited included (counters are cumulative).  Celery sends no signal
  or event to the main process that says a reply went out, nor with what status, so counting
  there would be a guess; the files are exact.  The directory is ``PROMETHEUS_MULTIPROC_DIR``
  when set, else a fresh one that the worker removes when it stops; it is chosen before the
  pool forks, so that the children inherit it.  With a pool that does not fork (threads,
  solo, gevent) there is one process and plain in-memory metrics.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from celery import Celery

from . import signals
from .config import settings
from .errors import ConfigurationError

__all__ = ["Metrics", "Live", "DURATION_BUCKETS", "forks", "channel_of"]

logger = logging.getLogger(__name__)

#: Buckets of the wait duration histogram, in seconds: a fast service answers in milliseconds, a batch
#: job in an hour (``fusion_default_timeout``).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                    3600.0, float("inf"))


def forks(pool_cls: Any) -> bool:
    """Whether a worker with the pool class ``pool_cls`` runs its tasks in forked children (prefork)."""
    from celery.concurrency.prefork import TaskPool
    return isinstance(pool_cls, type) and issubclass(pool_cls, TaskPool)


def channel_of(name: str, prefix: str) -> str | None:
    """The reply channel of the return topic ``name`` (``leased``, ``shared``, ``ephemeral``), from its name;
    None for a topic that is not a return topic."""
    if not name.startswith(prefix):
        return None
    rest = name[len(prefix):]
    if rest.startswith("lease."):
        return "leased"
    if rest.startswith("shared."):
        return "shared"
    return "ephemeral"


def _app_of(sender: Any) -> Any:
    return sender if isinstance(sender, Celery) else getattr(sender, "app", None)


class Live:
    """A collector of what the main process holds, read when scraped: waits pending per dependency topic,
    registry partitions owned and intake lag per reactor partition."""

    def __init__(self) -> None:
        self.waiter: Any = None
        self.intake: Any = None

    def describe(self) -> list[Any]:
        return []  # the families vary with what is held; nothing to check against other collectors

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        pending = GaugeMetricFamily("fusion_waits_pending", "Waits this worker's waiter holds, by dependency topic.",
                                    labels=["topic"])
        owned = GaugeMetricFamily("fusion_registry_partitions_owned",
                                  "Registry partitions (Kafka) or buckets (ZooKeeper) this worker's waiter owns.")
        status = self.waiter.status() if self.waiter is not None else None
        if status is not None:
            for topic, count in sorted(status["by_topic"].items()):
                pending.add_metric([topic], count)
            if status.get("partitions") is not None:
                owned.add_metric([], len(status["partitions"]))
        yield pending
        yield owned
        lag = GaugeMetricFamily("fusion_intake_lag",
                                "Records of a reactor topic's partition not yet handed to Celery by this worker.",
                                labels=["topic", "partition"])
        for thread in list(self.intake.threads) if self.intake is not None else []:
            for partition, records in sorted(dict(thread.lag).items()):
                lag.add_metric([thread.topic, str(partition)], records)
        yield lag


class Metrics:
    """The metrics of one app in one worker: counters fed by signals, the :class:`Live` collector, and
    the HTTP server.

    Made in the worker's main process before the pool forks (:class:`~fusion_celery.worker.FusionStep`),
    so that the children inherit the receivers.

    Parameters:
        app: the app whose signals are counted (signals of other apps in the process are not).
        multiprocess_dir: where the processes write their counts (multiprocess mode), or None
            for a worker of one process.

    Raises:
        ConfigurationError: prometheus-client is not installed.
    """

    def __init__(self, app: Celery, multiprocess_dir: str | None = None) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Histogram
        except ImportError:
            raise ConfigurationError("fusion_metrics_port needs prometheus-client: pip install "
                                     "'fusion-celery[metrics]'") from None
        self.app = app
        self.prefix = str(settings(app).return_topic_prefix)
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry(auto_describe=True)
        self.live = Live()
        self.server: Any = None
        if multiprocess_dir is not None:
            from prometheus_client import multiprocess
            multiprocess.MultiProcessCollector(self.registry, path=multiprocess_dir)
            owner = None  # the values live in the files; the collector above reads them
        else:
            owner = self.registry
        self.registry.register(self.live)
        self.wait_duration = Histogram(
            "fusion_wait_duration_seconds", "Seconds from a dependency's request to its reply, by dependency topic "
            "and outcome (ok, error: an error or unreadable reply).", ["topic", "outcome"],
            buckets=DURATION_BUCKETS, registry=owner)
        self.replies = Counter("fusion_replies", "Replies to runs' callers that Kafka took, by reactor topic and "
                               "status (ok, error).", ["topic", "status"], registry=owner)
        self.timeouts = Counter("fusion_dependency_timeouts", "Waits that reached their deadline without a reply, "
                                "by dependency topic.", ["topic"], registry=owner)
        self.dead_letters = Counter("fusion_dead_letters", "Records an intake put on its reactor's dead-letter topic, "
                                    "by reactor topic and reason.", ["topic", "reason"], registry=owner)
        self.created = Counter("fusion_return_topics_created", "Return topics this worker created, by reply channel.",
                               ["channel"], registry=owner)
        self.deleted = Counter("fusion_return_topics_deleted", "Return topics this worker asked Kafka to delete, "
                               "by reply channel.", ["channel"], registry=owner)
        self.leased = Counter("fusion_return_topics_leased", "Waits given a topic of a lease pool (reply channel "
                              "leased).", registry=owner)
        self._receivers = [
            (signals.wait_completed, self._completed), (signals.wait_failed, self._failed),
            (signals.wait_timed_out, self._timed_out), (signals.reply_sent, self._reply_sent),
            (signals.dead_lettered, self._dead_lettered), (signals.dependency_sent, self._dependency_sent),
            (signals.topics_created, self._topics_created), (signals.topics_deleted, self._topics_deleted),
        ]
        for signal, receiver in self._receivers:
            signal.connect(receiver, weak=False)

    # -- the receivers ---------------------------------------------------------------------------------
    def _ours(self, sender: Any) -> bool:
        return _app_of(sender) is self.app

    def _completed(self, sender: Any = None, topic: str = "", runtime: float = 0.0, **_: Any) -> None:
        if self._ours(sender):
            self.wait_duration.labels(topic, "ok").observe(runtime)

    def _failed(self, sender: Any = None, topic: str = "", runtime: float = 0.0, **_: Any) -> None:
        if self._ours(sender):
            self.wait_duration.labels(topic, "error").observe(runtime)

    def _timed_out(self, sender: Any = None, topic: str = "", **_: Any) -> None:
        if self._ours(sender):
            self.timeouts.labels(topic).inc()

    def _reply_sent(self, sender: Any = None, topic: str | None = None, status: str = "ok", **_: Any) -> None:
        if self._ours(sender):
            self.replies.labels(topic or "", status).inc()

    def _dead_lettered(self, sender: Any = None, topic: str = "", reason: str = "", **_: Any) -> None:
        if self._ours(sender):
            self.dead_letters.labels(topic, reason).inc()

    def _dependency_sent(self, sender: Any = None, channel: str | None = None, **_: Any) -> None:
        if channel == "leased" and self._ours(sender):
            self.leased.inc()

    def _count_topics(self, counter: Any, sender: Any, names: tuple[str, ...]) -> None:
        if not self._ours(sender):
            return
        for name in names:
            channel = channel_of(name, self.prefix)
            if channel is not None:
                counter.labels(channel).inc()

    def _topics_created(self, sender: Any = None, names: tuple[str, ...] = (), **_: Any) -> None:
        self._count_topics(self.created, sender, names)

    def _topics_deleted(self, sender: Any = None, names: tuple[str, ...] = (), **_: Any) -> None:
        self._count_topics(self.deleted, sender, names)

    # -- serving ---------------------------------------------------------------------------------------
    def watch(self, waiter: Any, intake: Any) -> None:
        """Read waits pending and partitions owned from ``waiter``, and the lag from ``intake``'s threads."""
        self.live.waiter, self.live.intake = waiter, intake

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        """Serve ``/metrics`` on ``address:port`` from a thread of this process.

        Raises:
            ConfigurationError: the port cannot be bound.
        """
        from prometheus_client import start_http_server
        try:
            self.server, _thread = start_http_server(port, addr=address, registry=self.registry)
        except OSError as exc:
            raise ConfigurationError(f"fusion_metrics_port: cannot serve metrics on {address}:{port}: {exc}") from None
        where = ""
        if self.multiprocess_dir:
            where = f" (the pool's processes write their counts to {self.multiprocess_dir})"
        logger.info("fusion-celery: metrics on http://%s:%d/metrics%s", address, port, where)

    def scrape(self) -> str:
        """The metrics as Prometheus's text format (what ``/metrics`` answers)."""
        from prometheus_client import generate_latest
        return generate_latest(self.registry).decode()

    def close(self) -> None:
        """Close the HTTP server and disconnect the receivers."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        for signal, receiver in self._receivers:
            signal.disconnect(receiver)
        self.live.waiter = self.live.intake = None


def multiprocess_dir(pool_cls: Any) -> tuple[str | None, bool]:
    """Prepare prometheus-client's multiprocess mode for a worker whose pool forks (see the module docstring).

    Called in the worker's main process before the pool forks.  Sets ``PROMETHEUS_MULTIPROC_DIR``
    (the children inherit the environment) and makes the metrics created from now on write to it.

    Parameters:
        pool_cls: the worker's pool class.

    Returns:
        The directory (None: the pool does not fork), and whether it was made here (and is to be
        removed when the worker stops).
    """
    if not forks(pool_cls):
        return None, False
    from .compat import prometheus_multiprocess
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    made = not path
    if made:
        path = tempfile.mkdtemp(prefix="fusion-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    prometheus_multiprocess()
    return path, made


def remove_dir(path: str | None) -> None:
    """Remove a multiprocess directory :func:`multiprocess_dir` made."""
    if path:
        shutil.rmtree(path, ignore_errors=True)
