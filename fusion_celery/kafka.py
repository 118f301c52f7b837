"""Kafka clients built from the app's settings, one set per process.

librdkafka handles must never cross a ``fork`` (billiard forks pool children from
the worker's main process, also later on).  :func:`clients` therefore keys the
shared producer and admin client by process id: a forked child that asks for
them gets fresh ones and never touches its parent's.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

from celery import Celery
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from .config import setting
from .errors import ConfigurationError, FusionError
from .returntopics import ReturnTopicPool, new_return_topic, topic_config

__all__ = ["Clients", "clients", "close_clients", "client_config", "consume_ready"]

logger = logging.getLogger(__name__)
#: librdkafka's own log lines go here instead of straight to stderr.
rdkafka_logger = logging.getLogger("fusion_celery.rdkafka")

_SECRET_WORDS = ("password", "secret", "token", "key")


def redact(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a librdkafka config that is safe to log (secrets replaced by ``***``)."""
    return {k: ("***" if any(w in k.lower() for w in _SECRET_WORDS) and "location" not in k else v)
            for k, v in config.items()}


def client_config(app: Celery, kind: str, defaults: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """librdkafka settings for a client of ``kind`` (``producer``, ``consumer`` or ``admin``).

    Precedence: ``extra`` (what fusion-celery needs to work) over the user's
    ``fusion_kafka_<kind>_config`` over ``fusion_kafka_config`` over ``defaults``.
    """
    config: dict[str, Any] = {"bootstrap.servers": setting(app, "fusion_kafka_bootstrap_servers")}
    config.update(defaults or {})
    config.update(setting(app, "fusion_kafka_config") or {})
    config.update(setting(app, f"fusion_kafka_{kind}_config") or {})
    config.update(extra)
    config.setdefault("logger", rdkafka_logger)
    return config


class _Throttle(logging.Filter):
    """Let one of a kind of log line through per ``interval`` seconds (librdkafka repeats itself).

    While a broker is down every client reports every failed connection attempt, several
    times a second: without this a worker writes thousands of identical lines per minute.
    Lines are of a kind when they are equal once digits are ignored.
    """

    def __init__(self, interval: float = 10.0) -> None:
        super().__init__()
        self.interval = interval
        self._last: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        kind = "".join(c for c in record.getMessage() if not c.isdigit())[:300]
        now = time.monotonic()
        with self._lock:
            last, skipped = self._last.get(kind, (0.0, 0))
            if now - last < self.interval:
                self._last[kind] = (last, skipped + 1)
                return False
            if len(self._last) > 1000:
                self._last.clear()
            self._last[kind] = (now, 0)
        if skipped:
            record.msg = f"{record.msg} (and {skipped} similar in the last {self.interval:.0f}s)"
        return True


rdkafka_logger.addFilter(_Throttle())
_errors_logger = logging.getLogger(f"{__name__}.errors")
_errors_logger.addFilter(_Throttle())

#: librdkafka errors that say "not now" (broker down or restarting) rather than "never".
_TRANSIENT = {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT, KafkaError._MSG_TIMED_OUT,
              KafkaError._RESOLVE, KafkaError._WAIT_COORD, KafkaError.REQUEST_TIMED_OUT, KafkaError.NOT_CONTROLLER,
              KafkaError.BROKER_NOT_AVAILABLE, KafkaError.LEADER_NOT_AVAILABLE,
              KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.COORDINATOR_NOT_AVAILABLE,
              KafkaError.NETWORK_EXCEPTION}


def transient(err: KafkaError) -> bool:
    """Whether ``err`` may go away by itself (the broker is unreachable, restarting or electing)."""
    if err.code() in _TRANSIENT or err.retriable():
        return True
    # A restarted KRaft broker refuses topic creation until it is unfenced.
    return err.code() == KafkaError.INVALID_REPLICATION_FACTOR and "fenced" in err.str()


def consume_ready(consumer: Consumer, max_messages: int, timeout: float) -> list[Any]:
    """Wait at most ``timeout`` seconds for a record, then take what else is already there (``max_messages`` in all).

    ``Consumer.consume(n, timeout)`` returns only when it has ``n`` records or the
    timeout expired, so a lone request waited out the whole timeout.
    """
    first = consumer.poll(timeout)
    if first is None:
        return []
    return [first, *consumer.consume(max_messages - 1, timeout=0)] if max_messages > 1 else [first]


def _error_logger(err: KafkaError) -> None:
    # librdkafka reports transient trouble (broker down, retrying) through this callback.
    _errors_logger.warning("kafka: %s", err)


class Clients:
    """A producer and an admin client for one process, plus topic helpers."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._producer: Producer | None = None
        self._admin: AdminClient | None = None
        self._known_topics: dict[str, float] = {}
        self._pool: ReturnTopicPool | None = None
        self._unawaited: list[Any] = []  # futures of admin requests nobody waits for (see close)
        self._touched: dict[str, set[str]] = {"producer": set(), "admin": set()}
        self._retired: list[tuple[float, str, Any]] = []  # (when, kind, client) replaced, closed after a grace

    @property
    def retry_timeout(self) -> float:
        return float(setting(self.app, "fusion_kafka_retry_timeout"))

    def retrying(self, what: str, fn: Any) -> Any:
        """``fn()``, tried again while it fails with a transient Kafka error, for ``fusion_kafka_retry_timeout``.

        Raises :class:`FusionError` starting with ``what`` when the error is not
        transient or the broker stayed away too long: never a raw ``KafkaException``
        (which, among other things, cannot be pickled into a task's result).
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
                if not transient(err) or time.monotonic() + delay > deadline:
                    hint = (f" (Kafka at {setting(self.app, 'fusion_kafka_bootstrap_servers')} unreachable for "
                            f"{self.retry_timeout:.0f}s, setting fusion_kafka_retry_timeout)") if transient(err) else ""
                    raise FusionError(f"{what}: {err.str()}{hint}") from None
                _errors_logger.warning("kafka: %s: %s; retrying", what, err.str())
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _touch(self, kind: str, topics: Iterable[str]) -> None:
        """Count the distinct topics the shared ``kind`` client touched; past the limit, replace it.

        librdkafka keeps an object for every topic a client produced to or looked up, for the
        client's lifetime (deleted topics included), and walks them all every second and on every
        metadata answer.  With a new return topic per request, a worker's CPU per request would
        grow with the requests it served.  After ``fusion_kafka_client_recycle_topics`` distinct
        topics the client is retired: the next call makes a fresh one, and the old one is closed
        once no call can still be using it.
        """
        limit = int(setting(self.app, "fusion_kafka_client_recycle_topics"))
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
        with self._lock:
            if self._producer is None:
                self._producer = Producer(client_config(
                    self.app, "producer",
                    # librdkafka gives up on a record when we do: a record reported as failed is never
                    # delivered later, so sending it again (a retried reply) cannot duplicate it.
                    # log_level 5: no INFO line per deleted return topic it once produced to (PARTCNT)
                    defaults={"message.timeout.ms": int(self.retry_timeout * 1000), "log_level": 5},
                    **{"linger.ms": 0, "acks": "all", "enable.idempotence": True, "error_cb": _error_logger},
                ))
            return self._producer

    @property
    def admin(self) -> AdminClient:
        with self._lock:
            if self._admin is None:
                self._admin = AdminClient(client_config(self.app, "admin", {"log_level": 5},
                                                        error_cb=_error_logger))
            return self._admin

    def consumer(self, defaults: dict[str, Any] | None = None, **extra: Any) -> Consumer:
        """A new consumer (the caller owns and closes it); the user's settings override ``defaults``."""
        extra.setdefault("error_cb", _error_logger)
        return Consumer(client_config(self.app, "consumer", defaults, **extra))

    def produce(self, topic: str, value: bytes | None, *, key: bytes | str | None = None,
                headers: list[tuple[str, bytes]] | None = None, timeout: float | None = None) -> Any:
        """Produce one record and wait until Kafka acknowledged it; return its delivery record.

        librdkafka keeps trying while the broker is away, for ``fusion_kafka_retry_timeout``
        seconds (its ``message.timeout.ms``); ``timeout`` defaults to a little more, so the
        outcome is known: a record reported as failed was not written.
        Raises :class:`FusionError` naming the topic when delivery fails.
        """
        if timeout is None:
            timeout = self.retry_timeout + 10
        done = threading.Event()
        outcome: dict[str, Any] = {}

        def on_delivery(err: KafkaError | None, msg: Any) -> None:
            outcome["err"], outcome["msg"] = err, msg
            done.set()

        producer = self.producer
        try:
            producer.produce(topic, value, key=key, headers=headers, on_delivery=on_delivery)
        except BufferError:
            producer.poll(1.0)
            producer.produce(topic, value, key=key, headers=headers, on_delivery=on_delivery)
        except KafkaException as exc:
            raise FusionError(f"cannot send to Kafka topic {topic!r}: {exc.args[0]}") from None
        deadline = time.monotonic() + timeout
        while not done.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FusionError(f"no delivery report for Kafka topic {topic!r} within {timeout:.0f}s "
                                  f"(is Kafka at {setting(self.app, 'fusion_kafka_bootstrap_servers')} up?)")
            producer.poll(min(remaining, 0.5))
        if outcome["err"] is not None:
            raise FusionError(f"cannot send to Kafka topic {topic!r}: {outcome['err'].str()}")
        self._touch("producer", (topic,))
        return outcome["msg"]

    def topic_exists(self, topic: str, ttl: float = 60.0, wait: float = 2.0) -> bool:
        """Whether ``topic`` exists (positive answers are cached for ``ttl`` seconds).

        A topic created a moment ago may not be in the broker's metadata yet, so a
        negative answer is only given after looking again for ``wait`` seconds.
        """
        now = time.monotonic()
        if self._known_topics.get(topic, 0) > now:
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

    def create_topics(self, names: Iterable[str], partitions: int = 1, config: dict[str, str] | None = None,
                      timeout: float = 30.0, exist_ok: bool = True, visible: bool = False) -> None:
        """Create topics and wait for the controller's answer.

        With ``visible``, also wait until the broker's metadata lists every
        partition with a leader: a consumer that *subscribes* to a topic it does
        not see yet only looks again at its next metadata refresh (minutes).
        """
        names = list(dict.fromkeys(names))  # a name twice in one request crashes librdkafka's result handling
        if not names:
            return
        pending = list(names)

        def create() -> None:
            new = [NewTopic(n, num_partitions=partitions, replication_factor=-1, config=config or {})
                   for n in pending]
            futures = self.admin.create_topics(new, operation_timeout=timeout, request_timeout=timeout)
            for name, fut in futures.items():
                try:
                    fut.result(timeout=timeout + 5)
                except KafkaException as exc:
                    if not (exist_ok and exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS):
                        raise
                pending.remove(name)  # created (or there already): not again on a retry

        self.retrying(f"cannot create Kafka topic(s) {', '.join(map(repr, pending))}", create)
        if visible:
            self.wait_visible(names, timeout)

    def wait_visible(self, names: Iterable[str], timeout: float = 30.0) -> None:
        """Wait until the metadata shows every partition of ``names`` with a leader."""
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

    def delete_topics(self, names: Iterable[str], wait: bool = False, timeout: float = 30.0) -> None:
        """Delete topics; missing ones are fine.  With ``wait`` block until the controller answered."""
        names = list(dict.fromkeys(names))  # a name twice in one request crashes librdkafka's result handling
        if not names:
            return
        futures = self.admin.delete_topics(names, operation_timeout=timeout, request_timeout=timeout)
        if not wait:
            with self._lock:
                self._unawaited = [f for f in self._unawaited if not f.done()] + list(futures.values())
            return
        for name, fut in futures.items():
            try:
                fut.result(timeout=timeout + 5)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                    logger.warning("cannot delete topic %s: %s", name, exc.args[0].str())

    @property
    def pool(self) -> ReturnTopicPool | None:
        """This process's pool of ready return topics (``fusion_return_topic_pool``; None when 0)."""
        size = int(setting(self.app, "fusion_return_topic_pool"))
        if size <= 0:
            return None
        with self._lock:
            if self._pool is None:
                self._pool = ReturnTopicPool(self.app, self, size)
            return self._pool

    def return_topic(self, deadline_ms: int | None = None, *, registered: bool = False) -> str:
        """A new, existing return topic for one wait that ends at ``deadline_ms`` (epoch ms).

        A topic made here carries ``deadline_ms`` in its name, so the reaper leaves it
        alone until that deadline plus ``fusion_reaper_grace`` even though no registered
        wait names it.  A pooled topic was named before its wait existed and carries no
        deadline: only a caller that names its topic in a registered wait at once
        (``registered``) gets one, ready in the pool when there is one.
        """
        pool = self.pool if registered else None
        name = pool.take() if pool is not None else None
        if name is None:
            name = new_return_topic(self.app, deadline_ms=deadline_ms)
            self.create_topics([name], partitions=1, config=topic_config(self.app), visible=True)
        return name

    def check_reachable(self, timeout: float) -> None:
        """Raise :class:`ConfigurationError` unless a Kafka broker answers within ``timeout`` seconds."""
        servers = setting(self.app, "fusion_kafka_bootstrap_servers")
        try:
            self.admin.list_topics(timeout=timeout)
        except KafkaException as exc:
            raise ConfigurationError(
                f"Kafka at {servers} did not answer within {timeout:.0f}s ({exc.args[0].str()}); "
                f"check fusion_kafka_bootstrap_servers / FUSION_KAFKA_BOOTSTRAP_SERVERS") from None

    def close(self) -> None:
        """Delete the pool's unused return topics, flush the producer, and destroy the clients.

        Destroyed here, not left to the garbage collector: the cyclic collector may run on a
        librdkafka thread (it runs Python callbacks of admin requests), and a client destroyed
        from one of librdkafka's own threads aborts the process.
        """
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
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
    """This process's :class:`Clients` for ``app`` (new ones after a fork)."""
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
    """Flush and drop this process's clients for ``app`` (warm shutdown)."""
    with _clients_lock:
        found = _clients.pop((id(app), os.getpid()), None)
    if found is not None:
        found.close()


def close_all_clients() -> None:
    """Flush and drop every client this process made (a pool child on its way out)."""
    with _clients_lock:
        mine = [k for k in _clients if k[1] == os.getpid()]
        found = [_clients.pop(k) for k in mine]
    for c in found:
        c.close()
