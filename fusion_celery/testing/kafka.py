"""An in-process stand-in for confluent-kafka: ``Producer``, ``Consumer`` and ``AdminClient`` on a broker in memory.

Each class takes the same constructor arguments and offers the same methods as
its confluent-kafka namesake, and returns confluent-kafka's own types
(:class:`~confluent_kafka.Message`, :class:`~confluent_kafka.TopicPartition`,
:class:`~confluent_kafka.KafkaError` inside :class:`~confluent_kafka.KafkaException`,
the ``confluent_kafka.admin`` metadata classes, ``concurrent.futures.Future``), so
code written against confluent-kafka runs on it unchanged, error codes included.
A client picks its broker with ``bootstrap.servers = "memory://<name>"``: the same
name is the same :class:`~fusion_celery.testing.broker.Broker` in the whole
process.  Settings it does not model are ignored.

What it keeps from Kafka: offsets per partition from 0; partitioning by key with
librdkafka's ``partitioner`` (CRC-32 by default); keys, headers and timestamps
(``CreateTime``, or ``LogAppendTime`` per topic config); consumer groups that
divide partitions (eager ``range``/``roundrobin`` or ``cooperative-sticky``) with
``on_assign``/``on_revoke``/``on_lost`` run in the consumer's own ``poll``, and
commit offsets per group; ``auto.offset.reset``, ``enable.partition.eof``,
``enable.auto.commit``, ``enable.auto.offset.store``; pause and resume; the errors
librdkafka gives for a missing topic or partition, a record too large, a full
queue, a closed client; and an unreachable broker (:meth:`Broker.down`).

What it leaves out: replication, retention, compaction, transactions, quotas,
and time (a record is written the moment it is produced; an admin request is
answered at once; metadata is never stale).
"""

from __future__ import annotations

from confluent_kafka.admin import NewTopic

from .admin import AdminClient
from .broker import SCHEME, Broker, is_memory
from .consumer import Consumer
from .producer import Producer

__all__ = ["SCHEME", "AdminClient", "Broker", "Consumer", "NewTopic", "Producer", "is_memory"]
