"""The state of an in-memory Kafka cluster: topics, partitions, records, ACLs and its reachability.

One :class:`Broker` stands for a whole single-broker cluster.  Clients find it by
the name in their ``bootstrap.servers`` (``memory://<name>``): the same name is
the same broker everywhere in the process.  Everything a broker holds is guarded
by one condition variable, :attr:`Broker.cond`, that clients also wait on: it is
notified whenever a record is written, a topic comes or goes, a consumer group
changes or the broker goes down or comes back, so a waiting client wakes at once
and never polls.
"""

from __future__ import annotations

import random
import re
import threading
import time
import weakref
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from confluent_kafka import TIMESTAMP_CREATE_TIME, TIMESTAMP_LOG_APPEND_TIME, KafkaError, KafkaException
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    BrokerMetadata,
    ClusterMetadata,
    PartitionMetadata,
    ResourcePatternType,
    ResourceType,
    TopicMetadata,
)

if TYPE_CHECKING:
    from .groups import Group

__all__ = ["SCHEME", "Broker", "Record", "Topic", "is_memory", "kafka_error", "partition_for"]

#: The ``bootstrap.servers`` prefix that selects an in-memory broker.
SCHEME = "memory://"
#: The broker id of every in-memory broker (each is a cluster of one).
NODE_ID = 0
#: Partitions of a topic created without a count (the broker's ``num.partitions``).
DEFAULT_PARTITIONS = 1
#: Largest record batch a topic accepts (the broker's ``message.max.bytes``; a topic's ``max.message.bytes``).
DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")

Headers = tuple[tuple[str, bytes | None], ...]


def is_memory(servers: Any) -> bool:
    """Whether a ``bootstrap.servers`` value names an in-memory broker.

    Parameters:
        servers: a ``bootstrap.servers`` value.

    Returns:
        True for ``memory://<name>``.
    """
    return isinstance(servers, str) and servers.strip().startswith(SCHEME)


def kafka_error(code: int, reason: str | None = None, *, retriable: bool = False) -> KafkaError:
    """A :class:`confluent_kafka.KafkaError` as librdkafka would report it (``reason`` defaults to the code's)."""
    return KafkaError(code, reason, retriable=retriable) if reason else KafkaError(code, retriable=retriable)


def _raise(code: int, reason: str | None = None) -> KafkaException:
    return KafkaException(kafka_error(code, reason))


# -- partitioners (librdkafka's ``partitioner`` setting) ----------------------------------------------------
def _murmur2(data: bytes) -> int:
    """Kafka's murmur2 (the Java client's default partitioner), as an unsigned 32-bit number."""
    m, length = 0x5BD1E995, len(data)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail, rest = length & ~3, length % 4
    if rest == 3:
        h ^= data[tail + 2] << 16
    if rest >= 2:
        h ^= data[tail + 1] << 8
    if rest >= 1:
        h ^= data[tail]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    return h ^ (h >> 15)


def _fnv1a(data: bytes) -> int:
    h = 0x811C9DC5
    for byte in data:
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


def partition_for(key: bytes | None, partitions: int, partitioner: str = "consistent_random") -> int:
    """The partition librdkafka's ``partitioner`` picks for ``key`` among ``partitions``.

    ``consistent`` hashes the key with CRC-32, ``murmur2`` as the Java client does,
    ``fnv1a`` with 32-bit FNV-1a; their ``_random`` forms (``consistent_random`` is
    librdkafka's default) spread records without a key at random, and ``random``
    spreads every record at random.

    Parameters:
        key: the record's key.
        partitions: the topic's partition count.
        partitioner: librdkafka's ``partitioner`` setting.

    Returns:
        The partition.

    Raises:
        ValueError: an unknown partitioner.
    """
    name = partitioner.strip().lower()
    if name == "random" or (name.endswith("_random") and not key):
        return random.randrange(partitions)
    data = key or b""
    if name.startswith("murmur2"):
        return (_murmur2(data) & 0x7FFFFFFF) % partitions
    if name.startswith("fnv1a"):
        return _fnv1a(data) % partitions
    if name.startswith("consistent"):
        return zlib.crc32(data) % partitions
    raise ValueError(f"unknown partitioner {partitioner!r}")


# -- the log --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    """One record of a partition's log."""

    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers | None
    timestamp: tuple[int, int]  # (TIMESTAMP_CREATE_TIME or TIMESTAMP_LOG_APPEND_TIME, epoch ms)


@dataclass
class Topic:
    """A topic: its partitions' logs (every log starts at offset 0 and is never truncated) and its config."""

    name: str
    partitions: list[list[Record]]
    config: dict[str, str] = field(default_factory=dict)

    def max_message_bytes(self) -> int:
        return int(self.config.get("max.message.bytes", DEFAULT_MAX_MESSAGE_BYTES))

    def log_append_time(self) -> bool:
        return self.config.get("message.timestamp.type", "CreateTime") == "LogAppendTime"


class Listener(Protocol):
    """What a broker tells the clients attached to it."""

    def _broker_changed(self, went_down: bool) -> None:
        """Called with :attr:`Broker.cond` held whenever topics appear or the broker goes down or up."""


class Broker:
    """One in-memory Kafka cluster (a single broker), shared by every client that names it.

    Get the process's broker of a name with :meth:`named` (clients do, from their
    ``bootstrap.servers``); make one directly only to configure it differently.

    Parameters:
        name: the name clients use in ``memory://<name>``.
        auto_create_topics: the broker's ``auto.create.topics.enable`` (off, like the project's
            stack): producing to a missing topic then creates it.
        default_partitions: partitions of a topic created without a count (``num.partitions``).
    """

    _named: ClassVar[dict[str, Broker]] = {}
    _named_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, name: str, *, auto_create_topics: bool = False,
                 default_partitions: int = DEFAULT_PARTITIONS) -> None:
        self.name = name
        self.auto_create_topics = auto_create_topics
        self.default_partitions = default_partitions
        self.cond = threading.Condition(threading.RLock())
        self.topics: dict[str, Topic] = {}
        self.groups: dict[str, Group] = {}
        self.acls: dict[AclBinding, None] = {}
        self._up = True
        self._clients: weakref.WeakSet[Any] = weakref.WeakSet()

    def __repr__(self) -> str:
        return f"<Broker {SCHEME}{self.name} ({'up' if self._up else 'down'}, {len(self.topics)} topics)>"

    # -- the process's brokers -------------------------------------------------------------------------------
    @classmethod
    def named(cls, name: str) -> Broker:
        """The broker called ``name`` in this process (made on first use).

        Parameters:
            name: the name after ``memory://``.

        Returns:
            The broker.
        """
        with cls._named_lock:
            found = cls._named.get(name)
            if found is None:
                found = cls._named[name] = cls(name)
            return found

    @classmethod
    def for_servers(cls, servers: Any) -> Broker:
        """The broker a ``bootstrap.servers`` value names.

        Parameters:
            servers: ``memory://<name>`` (a comma-separated list must name one broker).

        Returns:
            The broker (see :meth:`named`).

        Raises:
            KafkaException: ``_INVALID_ARG`` when the value names no in-memory broker, or several.
        """
        names = {s.strip()[len(SCHEME):] for s in str(servers or "").split(",") if s.strip()}
        if not names or not all(is_memory(s) for s in str(servers).split(",") if s.strip()) or len(names) > 1:
            raise _raise(KafkaError._INVALID_ARG,
                         f"bootstrap.servers={servers!r}: the in-memory Kafka client needs {SCHEME}<name>")
        return cls.named(names.pop())

    @classmethod
    def forget(cls, name: str) -> None:
        """Drop the broker called ``name`` from this process (clients still holding it keep it).

        Parameters:
            name: the name after ``memory://``.
        """
        with cls._named_lock:
            cls._named.pop(name, None)

    # -- reachability ------------------------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        """Whether clients can reach the broker (see :meth:`down`)."""
        return self._up

    def down(self) -> None:
        """Make the broker unreachable, as if it stopped: nothing is written, read, created or looked up.

        Producers keep their records and deliver them if the broker is back within their
        ``message.timeout.ms``; consumers read nothing; metadata and offset look-ups fail
        once their timeout passed; admin requests fail at once with ``_TRANSPORT``.
        Every client with an ``error_cb`` gets ``_ALL_BROKERS_DOWN`` at its next poll.
        """
        with self.cond:
            if not self._up:
                return
            self._up = False
            self._notify(went_down=True)

    def up(self) -> None:
        """Make the broker reachable again; producers send what they kept at once."""
        with self.cond:
            if self._up:
                return
            self._up = True
            self._notify(went_down=False)

    def attach(self, client: Listener) -> None:
        """Tell ``client`` (weakly held) about topic creations and outages from now on."""
        with self.cond:
            self._clients.add(client)

    def detach(self, client: Listener) -> None:
        with self.cond:
            self._clients.discard(client)

    def _notify(self, went_down: bool = False) -> None:
        for client in list(self._clients):
            client._broker_changed(went_down)
        self.cond.notify_all()

    def wait_until_up(self, timeout: float | None) -> bool:
        """Wait for the broker to be reachable.

        Parameters:
            timeout: seconds to wait at most (None or negative: for ever).

        Returns:
            Whether it is.
        """
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        with self.cond:
            while not self._up:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self.cond.wait(remaining)
            return True

    def check_up(self, what: str, code: int = KafkaError._TRANSPORT) -> None:
        """Raise ``KafkaException(code)`` naming ``what`` unless the broker is reachable now."""
        if not self._up:
            raise _raise(code, f"{what}: Local: Broker transport failure ({SCHEME}{self.name} is down)")

    # -- topics ------------------------------------------------------------------------------------------------
    def create_topic(self, name: str, partitions: int = -1, config: Mapping[str, Any] | None = None,
                     replication_factor: int = -1, validate_only: bool = False) -> None:
        """Create a topic.

        Parameters:
            name: its name (1-249 of ``[A-Za-z0-9._-]``).
            partitions: its partition count (-1: ``default_partitions``).
            config: its topic configuration (``max.message.bytes`` and ``message.timestamp.type`` are
                honoured, the rest kept).
            replication_factor: -1 or 1.
            validate_only: check, create nothing.

        Raises:
            KafkaException: ``TOPIC_ALREADY_EXISTS``, ``TOPIC_EXCEPTION``, ``INVALID_PARTITIONS``,
                ``INVALID_REPLICATION_FACTOR`` (this broker is a cluster of one), or ``_TRANSPORT`` when down.
        """
        with self.cond:
            self.check_up("CreateTopics failed")
            if not isinstance(name, str) or not _TOPIC_NAME.fullmatch(name) or name in {".", ".."}:
                raise _raise(KafkaError.TOPIC_EXCEPTION, f"Topic name {name!r} is illegal")
            if name in self.topics:
                raise _raise(KafkaError.TOPIC_ALREADY_EXISTS, f"Topic '{name}' already exists.")
            count = self.default_partitions if partitions in (-1, None) else int(partitions)
            if count < 1:
                raise _raise(KafkaError.INVALID_PARTITIONS, f"Number of partitions must be larger than 0, got {count}")
            if replication_factor not in (-1, None, 1):
                raise _raise(KafkaError.INVALID_REPLICATION_FACTOR,
                             f"Replication factor: {replication_factor} larger than available brokers: 1.")
            if validate_only:
                return
            self.topics[name] = Topic(name, [[] for _ in range(count)], {k: str(v) for k, v in (config or {}).items()})
            self._topics_changed()

    def delete_topic(self, name: str) -> None:
        """Delete a topic and its records.

        Parameters:
            name: its name.

        Raises:
            KafkaException: ``UNKNOWN_TOPIC_OR_PART``, or ``_TRANSPORT`` when down.
        """
        with self.cond:
            self.check_up("DeleteTopics failed")
            if self.topics.pop(name, None) is None:
                raise _raise(KafkaError.UNKNOWN_TOPIC_OR_PART, "Broker: Unknown topic or partition")
            self._topics_changed()

    def _topics_changed(self) -> None:
        for group in self.groups.values():
            group.topics_changed()
        self._notify()

    def watermarks(self, topic: str, partition: int) -> tuple[int, int]:
        """The low and high watermark of a partition (the low one is always 0: logs are never truncated).

        Parameters:
            topic: the topic.
            partition: the partition.

        Returns:
            ``(low, high)``.

        Raises:
            KafkaException: ``UNKNOWN_TOPIC_OR_PART``, or ``_TRANSPORT`` when down.
        """
        with self.cond:
            return 0, len(self._existing_log(topic, partition, "Failed to get watermark offsets"))

    def offset_for_time(self, topic: str, partition: int, ms: int) -> int:
        """The offset of the partition's first record stamped at or after ``ms``, or -1 when there is none.

        Raises:
            KafkaException: ``UNKNOWN_TOPIC_OR_PART``, or ``_TRANSPORT`` when down.
        """
        with self.cond:
            log = self._existing_log(topic, partition, "Failed to get offsets by times")
            return next((r.offset for r in log if r.timestamp[1] >= ms), -1)

    def _existing_log(self, topic: str, partition: int, what: str) -> list[Record]:
        """The log of a partition that must exist, for a request described by ``what`` (call with :attr:`cond`
        held); raises what the broker answers when it is down or the partition does not exist."""
        self.check_up(what)
        log = self.log(topic, partition)
        if log is None:
            raise _raise(KafkaError.UNKNOWN_TOPIC_OR_PART, f"{what}: Broker: Unknown topic or partition")
        return log

    def log(self, topic: str, partition: int) -> list[Record] | None:
        """The log of a partition, or None when there is no such partition (call with :attr:`cond` held)."""
        t = self.topics.get(topic)
        if t is None or not 0 <= partition < len(t.partitions):
            return None
        return t.partitions[partition]

    def append(self, topic: str, partition: int, key: bytes | None, value: bytes | None,
               headers: Headers | None, timestamp_ms: int) -> Record:
        """Write one record (call with :attr:`cond` held, the broker up and the partition existing)."""
        t = self.topics[topic]
        log = t.partitions[partition]
        stamp = (TIMESTAMP_LOG_APPEND_TIME, int(time.time() * 1000)) if t.log_append_time() else (
            TIMESTAMP_CREATE_TIME, timestamp_ms)
        record = Record(len(log), key, value, headers, stamp)
        log.append(record)
        self.cond.notify_all()
        return record

    def metadata(self, topic: str | None = None) -> ClusterMetadata:
        """The cluster's metadata as ``list_topics`` returns it.

        Parameters:
            topic: the one topic to list (None: all); one that does not exist is listed with the
                error ``UNKNOWN_TOPIC_OR_PART`` and no partitions, as the real broker answers.

        Returns:
            confluent-kafka's ``ClusterMetadata``.

        Raises:
            KafkaException: ``_TRANSPORT`` when down.
        """
        with self.cond:
            self.check_up("Failed to get metadata")
            md = ClusterMetadata()
            md.cluster_id = f"memory-{self.name}"
            md.controller_id = md.orig_broker_id = NODE_ID
            md.orig_broker_name = f"{SCHEME}{self.name}/{NODE_ID}"
            node = BrokerMetadata()
            node.id, node.host, node.port = NODE_ID, f"{SCHEME}{self.name}", 0
            md.brokers = {NODE_ID: node}
            for name in [topic] if topic is not None else sorted(self.topics):
                tmd = TopicMetadata()
                tmd.topic = name
                found = self.topics.get(name)
                if found is None:
                    tmd.error = kafka_error(KafkaError.UNKNOWN_TOPIC_OR_PART, "Broker: Unknown topic or partition")
                else:
                    for p in range(len(found.partitions)):
                        pmd = PartitionMetadata()
                        pmd.id, pmd.leader, pmd.replicas, pmd.isrs = p, NODE_ID, [NODE_ID], [NODE_ID]
                        tmd.partitions[p] = pmd
                md.topics[name] = tmd
            return md

    # -- consumer groups -------------------------------------------------------------------------------------
    def group(self, group_id: str) -> Group:
        """A consumer group (made on first use; it keeps its committed offsets for ever).

        Parameters:
            group_id: the ``group.id``.

        Returns:
            The group.
        """
        from .groups import Group
        with self.cond:
            found = self.groups.get(group_id)
            if found is None:
                found = self.groups[group_id] = Group(self, group_id)
            return found

    def matching(self, subscription: Iterable[str]) -> list[str]:
        """The topics a subscription names: names, and regular expressions starting with ``^``."""
        out = []
        for name in self.topics:
            for pattern in subscription:
                if name == pattern or (pattern.startswith("^") and re.match(pattern, name)):
                    out.append(name)
                    break
        return sorted(out)

    # -- ACLs (stored and listed, never enforced) -------------------------------------------------------------
    def add_acl(self, binding: AclBinding) -> None:
        with self.cond:
            self.check_up("CreateAcls failed")
            self.acls[binding] = None

    def find_acls(self, flt: AclBindingFilter) -> list[AclBinding]:
        with self.cond:
            self.check_up("DescribeAcls failed")
            return [b for b in self.acls if acl_matches(flt, b)]

    def remove_acls(self, flt: AclBindingFilter) -> list[AclBinding]:
        with self.cond:
            self.check_up("DeleteAcls failed")
            gone = [b for b in self.acls if acl_matches(flt, b)]
            for b in gone:
                del self.acls[b]
            return gone


def acl_matches(flt: AclBindingFilter, binding: AclBinding) -> bool:
    """Whether ``flt`` selects ``binding``, with Kafka's rules (``ANY``, None for any, and ``MATCH``, which
    also finds the literal ``*`` and the prefixed bindings that cover the filter's name)."""
    if flt.restype not in (ResourceType.ANY, binding.restype):
        return False
    if flt.resource_pattern_type == ResourcePatternType.MATCH:
        if flt.name is not None and not (
                (binding.resource_pattern_type == ResourcePatternType.LITERAL and binding.name in (flt.name, "*"))
                or (binding.resource_pattern_type == ResourcePatternType.PREFIXED
                    and flt.name.startswith(binding.name))):
            return False
    else:
        if flt.resource_pattern_type not in (ResourcePatternType.ANY, binding.resource_pattern_type):
            return False
        if flt.name is not None and flt.name != binding.name:
            return False
    return ((flt.principal is None or flt.principal == binding.principal)
            and (flt.host is None or flt.host == binding.host)
            and flt.operation in (AclOperation.ANY, binding.operation)
            and flt.permission_type in (AclPermissionType.ANY, binding.permission_type))
