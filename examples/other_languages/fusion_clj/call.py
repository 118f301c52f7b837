"""Call a reactor as fusion-clj's own pipeline does: a bare-UUID return topic, ``{"return-topic": ..., "data": ...}``.

    python call.py SERVERS TOPIC DATA [TIMEOUT_SECONDS]

fusion-clj's README: the request is ``{:return-topic "some-uuid" :data [1 2 3]}`` (JSON on the wire),
the return topic is named by a bare UUID, made before the request and read for the one answer.  No
``id``, no ``deadline``, no header.  A fusion-celery deployment answers such a caller only when
``fusion_reply_allowlist`` admits bare UUIDs::

    FUSION_REPLY_ALLOWLIST='[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}'

(see docs/guides/other-languages.md for what that opens).  Prints the answer's JSON; exit status 1
when none came within TIMEOUT_SECONDS (default 60).  confluent-kafka only.
"""

from __future__ import annotations

import json
import sys
import time
import uuid

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def call(servers: str, topic: str, data: object, timeout: float) -> bytes | None:
    return_topic = str(uuid.uuid4())  # "some-uuid"
    admin = AdminClient({"bootstrap.servers": servers})
    admin.create_topics([NewTopic(return_topic, 1)])[return_topic].result(30)
    consumer = Consumer({"bootstrap.servers": servers, "group.id": return_topic, "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(return_topic, 0, OFFSET_BEGINNING)])
        producer = Producer({"bootstrap.servers": servers})
        producer.produce(topic, json.dumps({"return-topic": return_topic, "data": data}))
        producer.flush(30)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                return msg.value()
        return None
    finally:
        consumer.close()
        admin.delete_topics([return_topic])[return_topic].result(30)


def main() -> int:
    servers, topic, data = sys.argv[1:4]
    timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 60.0
    answer = call(servers, topic, json.loads(data), timeout)
    if answer is None:
        print(f"no answer within {timeout:g}s", file=sys.stderr)
        return 1
    print(answer.decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
