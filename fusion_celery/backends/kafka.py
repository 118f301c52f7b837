"""The default registry: a compacted Kafka topic divided among waiters by a consumer group.

Each wait is one record keyed by its task id; its removal is a tombstone.  A
waiter joins the consumer group ``fusion.waiters.<topic>`` on the registry topic; for
each partition it is given it reads the partition from the beginning (the topic
is compacted, so that is the set of pending waits) and keeps following it.  When
a worker dies, the group gives its partitions, and so its waits, to the others.
"""

from __future__ import annotations

import logging
from urllib.parse import urlparse

from celery import Celery
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from ..clients import clients
from ..config import settings
from ..errors import FusionError
from ..intake import group_defaults
from ..registry import Change, Registry, Wait, Watcher
from ..transport import consume_ready

__all__ = ["KafkaRegistry", "KafkaWatcher"]

logger = logging.getLogger(__name__)

GROUP_PREFIX = "fusion.waiters."


class KafkaRegistry(Registry):
    """Pending waits in a compacted topic (``kafka://<topic>``).

    Parameters:
        app: the app (its Kafka settings, ``fusion_registry_partitions``).
        url: ``kafka://<topic>``; without a topic, ``fusion.waits``.
    """

    def __init__(self, app: Celery, url: str) -> None:
        parsed = urlparse(url)
        self.app = app
        self.topic = parsed.netloc or parsed.path.strip("/") or "fusion.waits"
        self.partitions = settings(app).registry_partitions
        self._ready = False

    def ensure_topic(self) -> None:
        """Create the registry topic if it is missing (compacted, tombstones kept for a day)."""
        if self._ready:
            return
        clients(self.app).create_topics([self.topic], partitions=self.partitions, config={
            "cleanup.policy": "compact",
            "segment.ms": str(3600 * 1000),
            "min.cleanable.dirty.ratio": "0.1",
            "delete.retention.ms": str(24 * 3600 * 1000),
        }, visible=True)
        self._ready = True

    def register(self, wait: Wait) -> None:
        self.ensure_topic()
        try:
            clients(self.app).produce(self.topic, wait.to_json(), key=wait.id)
        except FusionError as exc:
            raise FusionError(f"cannot register the wait for {wait.label}: {exc}") from None

    def remove(self, wait: Wait) -> None:
        producer = clients(self.app).producer
        try:
            producer.produce(self.topic, None, key=wait.id)
        except BufferError:
            producer.poll(1.0)
            producer.produce(self.topic, None, key=wait.id)
        producer.poll(0)

    def watch(self, name: str) -> KafkaWatcher:
        self.ensure_topic()
        return KafkaWatcher(self, name)

    def pending(self) -> list[Wait]:
        self.ensure_topic()
        consumer = clients(self.app).consumer(**{"group.id": "fusion.registry-reader",
                                                 "enable.auto.commit": False})
        try:
            md = consumer.list_topics(self.topic, timeout=10).topics[self.topic]
            parts, ends = [], {}
            for p in md.partitions:
                low, high = consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10)
                if high > low:
                    parts.append(TopicPartition(self.topic, p, OFFSET_BEGINNING))
                    ends[p] = high
            waits: dict[str, Wait] = {}
            if not parts:
                return []
            consumer.assign(parts)
            while ends:
                for msg in consumer.consume(500, timeout=1.0):
                    if msg.error():
                        continue
                    key = msg.key().decode()
                    if msg.value() is None:
                        waits.pop(key, None)
                    else:
                        waits[key] = Wait.from_json(msg.value())
                    if msg.offset() >= ends.get(msg.partition(), 0) - 1:
                        ends.pop(msg.partition(), None)
            return list(waits.values())
        finally:
            consumer.close()


class KafkaWatcher(Watcher):
    """Follows the registry partitions the consumer group gives this worker."""

    def __init__(self, registry: KafkaRegistry, name: str) -> None:
        self.registry = registry
        self._changes: list[Change] = []
        self._owned: dict[int, set[str]] = {}
        # The same group membership as the intakes' (6-s session under the classic protocol, so a
        # killed worker's waits move within seconds); the user's consumer settings override it.
        group, self.incremental = group_defaults(registry.app, assignor="roundrobin")
        self.consumer: Consumer = clients(registry.app).consumer(
            defaults={"topic.metadata.refresh.interval.ms": 10000, **group},
            **{"group.id": f"{GROUP_PREFIX}{registry.topic}",
               "client.id": f"fusion-waiter-{name}",
               "enable.auto.commit": False})
        self.consumer.subscribe([registry.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_revoke)

    def owned(self) -> list[int]:
        return sorted(list(self._owned))  # list() copies the keys under the GIL, in one step

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Read the partitions given (all of this member's under eager assignment, the added ones under
        incremental) from the beginning: the compacted topic holds their pending waits."""
        for p in partitions:
            p.offset = OFFSET_BEGINNING
            self._owned.setdefault(p.partition, set())
        if partitions or not self.incremental:  # incremental assignment also reports "nothing added"
            logger.info("waiter: owns registry partitions %s", sorted(p.partition for p in partitions))
        if self.incremental:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Drop the waits of the partitions taken away (or lost with the session); their next owner
        takes them up.  Partitions kept under incremental assignment keep their waits."""
        ids: list[str] = []
        for p in partitions:
            ids.extend(self._owned.pop(p.partition, ()))
        if ids:
            self._changes.append(Change("drop", ids=tuple(ids)))
        if partitions or not self.incremental:
            logger.info("waiter: released registry partitions %s", sorted(p.partition for p in partitions))
        if self.incremental:
            consumer.incremental_unassign(partitions)
        else:
            consumer.unassign()

    def poll(self, timeout: float) -> list[Change]:
        msgs = consume_ready(self.consumer, 1000, timeout)
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    logger.warning("waiter: registry read error: %s", err.str())
                continue
            key = msg.key().decode() if msg.key() else ""
            owned = self._owned.setdefault(msg.partition(), set())
            if msg.value() is None:
                if key in owned:
                    owned.discard(key)
                    self._changes.append(Change("remove", ids=(key,)))
                continue
            try:
                wait = Wait.from_json(msg.value())
            except (ValueError, TypeError) as exc:
                logger.error("waiter: unreadable registry record %s at %s[%d]@%d: %s",
                             key, msg.topic(), msg.partition(), msg.offset(), exc)
                continue
            owned.add(wait.id)
            self._changes.append(Change("add", wait=wait))
        changes, self._changes = self._changes, []
        return changes

    def close(self) -> None:
        try:
            self.consumer.close()
        except (RuntimeError, KafkaError) as exc:  # already closed
            logger.debug("waiter: closing the registry consumer: %s", exc)


