"""The Kafka clients of one process: a shared producer and admin client, consumers on demand, topic helpers.

librdkafka handles must never cross a ``fork`` (billiard forks pool children from
the worker's main process, also later on).  :func:`clients` therefore keys the
shared clients by process id: a forked child that asks for them gets fresh ones
and never touches its parent's.

librdkafka keeps an object for every topic a client produced to or looked up,
for the client's whole life (deleted topics included), and walks them all every
second and on every metadata answer.  With a new return topic per request, the
CPU a request costs would grow with the requests a process served, so the shared
clients are replaced after ``fusion_kafka_client_recycle_topics`` distinct topics
(:meth:`Clients._touch`).

The client classes come from a namespace chosen once per :class:`Clients`:
``confluent_kafka`` normally, the in-memory stub :mod:`fusion_celery.testing.kafka`
when ``fusion_kafka_bootstrap_servers`` starts with ``memory://`` (see :func:`kafka_api`).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import importlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from types import ModuleType, SimpleNamespace
from typing import Any, TypeVar

from celery import Celery
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from .config import settings
from .errors import ConfigurationError, FusionError, UnknownTopic
from .signals import topics_created, topics_deleted
from .transport import client_config, errors_logger, log_error, transient

__all__ = ["Clients", "clients", "close_clients", "close_all_clients", "deletion_failed", "kafka_api", "STUB_MODULE"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The module that stands in for ``confluent_kafka`` with ``memory://`` bootstrap servers.
STUB_MODULE = "fusion_celery.testing.kafka"

#: Seconds :meth:`Clients.topic_exists` trusts a positive answer by default.
KNOWN_TOPIC_TTL = 60.0

#: Delivery errors that mean the topic does not exist: the broker refused the record
#: (``UNKNOWN_TOPIC_OR_PART``), or librdkafka knows the topic is gone or never found it within
#: ``topic.metadata.propagation.max.ms`` (``_UNKNOWN_TOPIC``).
_NO_SUCH_TOPIC = frozenset({KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC})

_CONFLUENT = SimpleNamespace(Producer=Producer, Consumer=Consumer, AdminClient=AdminClient, NewTopic=NewTopic)


def kafka_api(app: Celery) -> ModuleType | SimpleNamespace:
    """Where the clients of ``app`` come from: an object with ``Producer``, ``Consumer``, ``AdminClient``, ``NewTopic``.

    Parameters:
        app: the app whose ``fusion_kafka_bootstrap_servers`` decides.

    Returns:
        ``confluent_kafka``'s classes; with ``memory://`` bootstrap servers, the module
        :data:`STUB_MODULE`, imported now (so only ``memory://`` needs it).

    Raises:
        ConfigurationError: ``memory://`` is asked for and the stub cannot be imported.
    """
    servers = str(settings(app).kafka_bootstrap_servers)
    if not servers.startswith("memory://"):
        return _CONFLUENT
    try:
        return importlib.import_module(STUB_MODULE)
    except ImportError as exc:
        raise ConfigurationError(f"fusion_kafka_bootstrap_servers={servers!r} needs the in-memory Kafka stub "
                                 f"{STUB_MODULE}, which cannot be imported: {exc}") from None


def deletion_failed(future: Any) -> str | None:
    """Why the done deletion ``future`` (of :meth:`Clients.delete_topics`) failed; None when the topic is gone
    (deleted, or there was no such topic)."""
    try:
        future.result(timeout=0)
    except KafkaException as exc:
        err = exc.args[0]
        return None if err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART else err.str()
    except Exception as exc:
        return str(exc) or type(exc).__name__
    return None


class Clients:
    """The shared producer and admin client of one process for one app, plus topic helpers.

    Use :func:`clients` to get this process's instance; an instance made directly is
    its owner's to :meth:`close`.

    Parameters:
        app: the app whose ``fusion_kafka_*`` settings configure the clients.

    Raises:
        ConfigurationError: see :func:`kafka_api`.
    """

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.pid = os.getpid()
        self.api = kafka_api(app)
        self._lock = threading.Lock()
        self._producer: Producer | None = None
        self._admin: AdminClient | None = None
        self._known_topics: dict[str, float] = {}
        self._attached: dict[str, Any] = {}
        self._unawaited: list[Any] = []  # futures of admin requests nobody waits for (see close)
        self._touched: dict[str, set[str]] = {"producer": set(), "admin": set()}
        self._retired: list[tuple[float, str, Any]] = []  # (when, kind, client) replaced, closed after a grace
        self._replication: tuple[int, int] | None = None
        self._brokers = 0  # brokers the cluster listed when replication() first ran

    @property
    def retry_timeout(self) -> float:
        """Seconds a call keeps retrying while Kafka is unreachable (``fusion_kafka_retry_timeout``)."""
        return settings(self.app).kafka_retry_timeout

    def retrying(self, what: str, fn: Callable[[], T],
                 passing: Callable[[KafkaError], bool] | None = None) -> T:
        """``fn()``, tried again while it fails with a transient Kafka error, for :attr:`retry_timeout` seconds.

        Parameters:
            what: what ``fn`` does, to start the error message with.
            fn: the call.
            passing: also retry the errors for which it returns True (transient for this call only).

        Returns:
            What ``fn`` returned.

        Raises:
            FusionError: starting with ``what``, when the error is not transient or the
                broker stayed away too long; never a raw ``KafkaException`` (which cannot
                be pickled into a task's result).
        """
        deadline = time.monotonic() + self.retry_timeout
        delay = 0.2
        while True:
            try:
                return fn()
            except KafkaException as exc:
                err = exc.args[0]
                if not isinstance(err, KafkaError):
                    raise FusionError(f"{what}: {err}") from None
                again = transient(err) or (passing is not None and passing(err))
                if not again or time.monotonic() + delay > deadline:
                    hint = (f" (Kafka at {settings(self.app).kafka_bootstrap_servers} unreachable for "
                            f"{self.retry_timeout:.0f}s, setting fusion_kafka_retry_timeout)") if again else ""
                    raise FusionError(f"{what}: {err.str()}{hint}") from None
                errors_logger.warning("kafka: %s: %s; retrying", what, err.str())
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _touch(self, kind: str, topics: Iterable[str]) -> None:
        """Count the distinct topics the shared ``kind`` client touched; past the limit, retire it.

        The next call then makes a fresh client, and the retired one is closed once no
        call can still be using it (see the module's docstring for why).
        """
        limit = settings(self.app).kafka_client_recycle_topics
        if limit > 0:
            retired = None
            with self._lock:
                seen = self._touched[kind]
                seen.update(topics)
                if len(seen) >= limit:
                    seen.clear()
                    retired = getattr(self, f"_{kind}")
                    setattr(self, f"_{kind}", None)
                    if retired is not None:
                        self._retired.append((time.monotonic(), kind, retired))
                    if kind == "producer":
                        # The new producer has not seen these topics: librdkafka would hold a record
                        # for one deleted meanwhile for topic.metadata.propagation.max.ms before
                        # failing it.  Looked up again, they are known to it (or found missing).
                        self._known_topics.clear()
            if retired is not None:
                logger.info("kafka: replacing this process's %s after %d topics (librdkafka keeps every topic "
                            "a client touched; setting fusion_kafka_client_recycle_topics)", kind, limit)
        self._close_retired()

    def _close_retired(self, force: bool = False) -> None:
        """Close the retired clients that no call can still be using (all of them with ``force``)."""
        if not self._retired:
            return
        # A call holds its client at most this long: produce() waits retry_timeout + 10 s for its
        # delivery report, admin requests answer within 35 s.
        grace = max(self.retry_timeout + 15, 45.0)
        now = time.monotonic()
        with self._lock:
            due = [r for r in self._retired if force or now - r[0] > grace]
            self._retired = [r for r in self._retired if r not in due]
        for _, kind, client in due:
            try:
                if kind == "producer":
                    if client.flush(10):
                        client.purge()
                    client.close()
                else:
                    client.__exit__(None, None, None)
            except Exception as exc:  # a client that cannot close cleanly must not fail the caller
                logger.warning("kafka: closing a retired %s: %s", kind, exc)

    @property
    def producer(self) -> Producer:
        """The shared producer (idempotent, ``acks=all``), made on first use."""
        with self._lock:
            if self._producer is None:
                self._producer = self.api.Producer(client_config(
                    self.app, "producer",
                    # librdkafka gives up on a record when we do: a record reported as failed is never
                    # delivered later, so sending it again (a retried reply) cannot duplicate it.
                    # log_level 5: no INFO line per deleted return topic it once produced to (PARTCNT)
                    defaults={"message.timeout.ms": int(self.retry_timeout * 1000), "log_level": 5},
                    **{"linger.ms": 0, "acks": "all", "enable.idempotence": True, "error_cb": log_error},
                ))
            return self._producer

    @property
    def admin(self) -> AdminClient:
        """The shared admin client, made on first use."""
        with self._lock:
            if self._admin is None:
                self._admin = self.api.AdminClient(client_config(self.app, "admin", {"log_level": 5},
                                                                 error_cb=log_error))
            return self._admin

    def consumer(self, defaults: dict[str, Any] | None = None, **extra: Any) -> Consumer:
        """A new consumer, which the caller owns and closes.

        Parameters:
            defaults: librdkafka settings the user's ``fusion_kafka_*config`` override.
            extra: librdkafka settings that override the user's.

        Returns:
            The consumer (not subscribed).
        """
        extra.setdefault("error_cb", log_error)
        return self.api.Consumer(client_config(self.app, "consumer", defaults, **extra))

    def attachment(self, key: str, make: Callable[[], T]) -> T:
        """The object attached to these clients under ``key``, made by ``make()`` on first use.

        An attachment lives as long as these clients: :meth:`close` calls its ``close()``
        first, while the clients still work (e.g. the return-topic pool deletes its
        unused topics).

        Parameters:
            key: the attachment's name.
            make: makes the object; called at most once per key.

        Returns:
            The object.
        """
        with self._lock:
            found = self._attached.get(key)
            if found is None:
                found = self._attached[key] = make()
            return found

    def produce(self, topic: str, value: bytes | None, *, key: bytes | str | None = None,
                headers: list[tuple[str, bytes]] | None = None, timeout: float | None = None,
                partition: int | None = None) -> Any:
        """Produce one record and wait until Kafka acknowledged it.

        librdkafka keeps trying while the broker is away, for :attr:`retry_timeout`
        seconds (its ``message.timeout.ms``); ``timeout`` defaults to a little more, so
        the outcome is known: a record reported as failed was not written.

        Parameters:
            topic: where to.
            value: the record's value.
            key: the record's key.
            headers: the record's headers.
            timeout: seconds to wait for the delivery report.
            partition: the partition (None: the one the key picks).

        Returns:
            The delivered message (its topic, partition, offset, timestamp).

        Raises:
            UnknownTopic: the topic does not exist (any more): the broker refused the record, or
                librdkafka knows the topic is gone.  It is then dropped from :meth:`topic_exists`'s cache.
            FusionError: naming the topic, when delivery failed otherwise or was not reported in time.
        """
        if timeout is None:
            timeout = self.retry_timeout + 10
        done = threading.Event()
        outcome: dict[str, Any] = {}

        def on_delivery(err: KafkaError | None, msg: Any) -> None:
            outcome["err"], outcome["msg"] = err, msg
            done.set()

        producer = self.producer
        where = {} if partition is None else {"partition": partition}
        try:
            try:
                producer.produce(topic, value, key=key, headers=headers, on_delivery=on_delivery, **where)
            except BufferError:
                producer.poll(1.0)
                producer.produce(topic, value, key=key, headers=headers, on_delivery=on_delivery, **where)
        except KafkaException as exc:
            raise self._send_failed(topic, exc.args[0]) from None
        deadline = time.monotonic() + timeout
        while not done.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FusionError(f"no delivery report for Kafka topic {topic!r} within {timeout:.0f}s "
                                  f"(is Kafka at {settings(self.app).kafka_bootstrap_servers} up?)")
            producer.poll(min(remaining, 0.5))
        if outcome["err"] is not None:
            raise self._send_failed(topic, outcome["err"])
        self._touch("producer", (topic,))
        return outcome["msg"]

    def _send_failed(self, topic: str, err: KafkaError | Any) -> FusionError:
        """The error to raise for a record to ``topic`` that Kafka refused with ``err``.

        A refusal because the topic does not exist also drops the topic from the cache of
        :meth:`topic_exists`, so that the next look-up asks the broker again.
        """
        if isinstance(err, KafkaError) and err.code() in _NO_SUCH_TOPIC:
            self.forget_topic(topic)
            return UnknownTopic(f"Kafka topic {topic!r} does not exist ({err.str()})")
        text = err.str() if isinstance(err, KafkaError) else err
        return FusionError(f"cannot send to Kafka topic {topic!r}: {text}")

    def topic_exists(self, topic: str, ttl: float = KNOWN_TOPIC_TTL, wait: float = 2.0) -> bool:
        """Whether ``topic`` exists.

        A positive answer is cached for ``ttl`` seconds, so that sending request after
        request to a topic costs no metadata round trip each; the cache forgets a topic
        when a record sent to it is refused because it does not exist (see :meth:`produce`),
        and when the producer that looked it up is replaced.  A topic created a moment
        ago may not be in the broker's metadata yet, so a negative answer is only given
        after looking again for ``wait`` seconds (negative answers are not cached).

        Parameters:
            topic: the topic.
            ttl: seconds a positive answer is cached (0: ask the broker now).
            wait: seconds to keep looking before answering no.

        Returns:
            True when the metadata lists the topic with partitions.

        Raises:
            FusionError: Kafka cannot be asked (see :meth:`retrying`).
        """
        now = time.monotonic()
        if ttl > 0 and self._known_topics.get(topic, 0) > now:
            return True
        deadline = now + wait
        while True:
            md = self.retrying(f"cannot look up Kafka topic {topic!r}",
                               lambda: self.producer.list_topics(topic, timeout=10))
            self._touch("producer", (topic,))
            tmd = md.topics.get(topic)
            if tmd is not None and tmd.error is None and tmd.partitions:
                self._known_topics[topic] = time.monotonic() + ttl
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def forget_topic(self, topic: str) -> None:
        """Drop ``topic`` from :meth:`topic_exists`'s cache: the next look-up asks the broker.

        Parameters:
            topic: the topic.
        """
        self._known_topics.pop(topic, None)

    def replication(self) -> tuple[int, int]:
        """The replication factor and ``min.insync.replicas`` of the topics fusion-celery creates.

        ``fusion_topic_replication_factor`` and ``fusion_topic_min_insync_replicas``; where a
        setting is 0, the default that is safe on a cluster and still works on one broker:
        min(3, brokers) copies, and 2 in sync where there are 3 copies or more.  The brokers
        are counted once per process (at the first topic it creates).

        Returns:
            ``(replication_factor, min_insync_replicas)``.
        """
        if self._replication is None:
            conf = settings(self.app)
            md = self.retrying("cannot look up the Kafka cluster's brokers", lambda: self.admin.list_topics(timeout=10))
            self._brokers = len(md.brokers)
            rf = conf.topic_replication_factor
            if rf <= 0:
                rf = max(1, min(3, self._brokers))
            elif rf > self._brokers:
                logger.warning("kafka: fusion_topic_replication_factor is %d, the cluster lists %d broker(s)",
                               rf, self._brokers)
            isr = conf.topic_min_insync_replicas
            if isr <= 0:
                isr = 2 if rf >= 3 else 1
            self._replication = (rf, isr)
            logger.info("kafka: topics fusion-celery creates have %d replica(s), min.insync.replicas %d", rf, isr)
        return self._replication

    def create_topics(self, names: Iterable[str], partitions: int = 1, config: dict[str, str] | None = None,
                      timeout: float = 30.0, exist_ok: bool = True, visible: bool = False) -> None:
        """Create topics, replicated as :meth:`replication` says, and wait for the controller's answer.

        Parameters:
            names: the topics (a name given twice is created once).
            partitions: partitions of each.
            config: topic settings of each (``min.insync.replicas`` here wins over :meth:`replication`'s).
            timeout: seconds the controller has to answer.
            exist_ok: whether a topic that exists already is fine.
            visible: also wait until the metadata lists every partition with a leader
                (see :meth:`wait_visible`): a consumer that *subscribes* to a topic it
                does not see yet only looks again at its next metadata refresh.

        Raises:
            FusionError: naming the topics, when they cannot be created.
        """
        names = list(dict.fromkeys(names))  # a name twice in one request crashes librdkafka's result handling
        if not names:
            return
        pending = list(names)
        created: list[str] = []

        rf, isr = self.replication()
        config = {"min.insync.replicas": str(isr), **(config or {})}

        def create() -> None:
            new = [self.api.NewTopic(n, num_partitions=partitions, replication_factor=rf, config=config)
                   for n in pending]
            futures = self.admin.create_topics(new, operation_timeout=timeout, request_timeout=timeout)
            for name, fut in futures.items():
                try:
                    fut.result(timeout=timeout + 5)
                    created.append(name)
                except KafkaException as exc:
                    if not (exist_ok and exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS):
                        raise
                pending.remove(name)  # created (or there already): not again on a retry

        def broker_restarting(err: KafkaError) -> bool:
            """A broker re-registering (a restart) lowers the registered count for a moment: a replication
            factor the cluster had brokers for is refused only that long."""
            return err.code() == KafkaError.INVALID_REPLICATION_FACTOR and rf <= self._brokers

        try:
            self.retrying(f"cannot create Kafka topic(s) {', '.join(map(repr, pending))}", create, broker_restarting)
        finally:
            if created:
                topics_created.send(sender=self.app, names=tuple(created))
        if visible:
            self.wait_visible(names, timeout)

    def wait_visible(self, names: Iterable[str], timeout: float = 30.0) -> None:
        """Wait until the metadata shows every partition of ``names`` with a leader.

        Parameters:
            names: the topics.
            timeout: seconds to wait.

        Raises:
            FusionError: a topic has no leader after ``timeout`` seconds.
        """
        pending = set(names)
        deadline = time.monotonic() + timeout
        self._touch("admin", pending)
        while pending:
            for name in list(pending):
                md = self.retrying(f"cannot look up Kafka topic {name!r}", lambda name=name: self.admin.list_topics(
                    topic=name, timeout=max(1.0, deadline - time.monotonic())))
                tmd = md.topics.get(name)
                if tmd is not None and tmd.error is None and tmd.partitions and \
                        all(p.leader >= 0 for p in tmd.partitions.values()):
                    pending.discard(name)
            if pending:
                if time.monotonic() > deadline:
                    raise FusionError(f"Kafka topics {sorted(pending)} were created but have no leader after "
                                      f"{timeout:.0f}s")
                time.sleep(0.02)

    def delete_topics(self, names: Iterable[str], wait: bool = False, timeout: float = 30.0) -> dict[str, Any]:
        """Delete topics; missing ones are fine.

        Parameters:
            names: the topics (a name given twice is deleted once).
            wait: block until the controller answered (failures other than "no such
                topic" are logged); otherwise :meth:`close` waits for the answers.
            timeout: seconds the controller has to answer.

        Returns:
            The deletions' futures by topic (done when ``wait``), for a caller that tries again
            what failed (see :func:`deletion_failed`).
        """
        names = list(dict.fromkeys(names))  # a name twice in one request crashes librdkafka's result handling
        if not names:
            return {}
        futures = self.admin.delete_topics(names, operation_timeout=timeout, request_timeout=timeout)
        topics_deleted.send(sender=self.app, names=tuple(names))
        if not wait:
            with self._lock:
                self._unawaited = [f for f in self._unawaited if not f.done()] + list(futures.values())
            return futures
        for name, fut in futures.items():
            try:
                fut.result(timeout=timeout + 5)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                    logger.warning("cannot delete topic %s: %s", name, exc.args[0].str())
            except Exception as exc:  # no answer in time
                logger.warning("cannot delete topic %s: %s", name, exc)
        return futures

    def check_reachable(self, timeout: float) -> None:
        """Make sure a Kafka broker answers.

        Parameters:
            timeout: seconds to wait for an answer.

        Raises:
            ConfigurationError: no broker answered within ``timeout`` seconds.
        """
        servers = settings(self.app).kafka_bootstrap_servers
        try:
            self.admin.list_topics(timeout=timeout)
        except KafkaException as exc:
            raise ConfigurationError(
                f"Kafka at {servers} did not answer within {timeout:.0f}s ({exc.args[0].str()}); "
                f"check fusion_kafka_bootstrap_servers / FUSION_KAFKA_BOOTSTRAP_SERVERS") from None

    def close(self) -> None:
        """Close the attachments, flush the producer, and destroy the clients.

        Destroyed here, not left to the garbage collector: the cyclic collector may run on a
        librdkafka thread (it runs Python callbacks of admin requests), and a client destroyed
        from one of librdkafka's own threads aborts the process.
        """
        with self._lock:
            attached, self._attached = self._attached, {}
        for key, obj in attached.items():
            try:
                obj.close()
            except Exception as exc:  # closing must not keep the clients open
                logger.warning("kafka: closing %s: %s", key, exc)
        with self._lock:
            producer, admin, self._producer, self._admin = self._producer, self._admin, None, None
            unawaited, self._unawaited = self._unawaited, []
        if producer is not None:
            remaining = producer.flush(10)
            if remaining:
                logger.warning("%d Kafka message(s) were not delivered before close", remaining)
                producer.purge()
            producer.close()
        if admin is not None:
            concurrent.futures.wait(unawaited, timeout=10)  # e.g. the waiter's last topic deletions
            admin.__exit__(None, None, None)
        self._close_retired(force=True)


_clients: dict[tuple[int, int], Clients] = {}
_inherited: list[Clients] = []
_clients_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # Another thread of the parent may have held the lock at the moment of the fork.
    global _clients_lock
    _clients_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
# Flush and drop the clients while the interpreter is whole: a client destroyed during
# finalization may call its Python callbacks (logger, error_cb) too late and crash the process.
atexit.register(lambda: close_all_clients())


def clients(app: Celery) -> Clients:
    """This process's :class:`Clients` for ``app``.

    Parameters:
        app: the app.

    Returns:
        The instance made by the first call in this process (a forked child gets its own).

    Raises:
        ConfigurationError: see :func:`kafka_api`.
    """
    key = (id(app), os.getpid())
    with _clients_lock:
        found = _clients.get(key)
        if found is None:
            for stale in [k for k in _clients if k[1] != key[1]]:
                # A parent's handles, inherited through fork: never use them, never close them, and
                # never let them be garbage-collected either (their destructor would tear down
                # librdkafka threads that do not exist in this process: a segfault).
                _inherited.append(_clients.pop(stale))
            found = _clients[key] = Clients(app)
        return found


def close_clients(app: Celery) -> None:
    """Close and drop this process's clients for ``app`` (a warm shutdown); the next use makes new ones."""
    with _clients_lock:
        found = _clients.pop((id(app), os.getpid()), None)
    if found is not None:
        found.close()


def close_all_clients() -> None:
    """Close and drop every :class:`Clients` this process made (a pool child on its way out, the interpreter's exit)."""
    with _clients_lock:
        mine = [k for k in _clients if k[1] == os.getpid()]
        found = [_clients.pop(k) for k in mine]
    for c in found:
        c.close()
