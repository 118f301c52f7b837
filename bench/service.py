"""The dependency services: one process, confluent-kafka only, answering on the request's return topic.

Every service of :data:`bench.common.SERVICE_NAMES` is served by one consumer.
Replies carry fusion's headers (``fusion-status: ok``, ``fusion-id``), so the
raw correlation-id client can match them.  ``hold`` keeps its requests and
answers none until a ``release`` record arrives on the control topic (the
"dependency that never answers until released" of the cost-of-waiting test).

Run: ``python -m bench.service --status FILE`` (topics exist already).
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from typing import Any

from confluent_kafka import Consumer, KafkaError, Producer

from .common import SERVICE_NAMES, consume_ready, run_id, servers, service_answer, svc, write_status

__all__ = ["control_topic", "main"]


def control_topic(run: str | None = None) -> str:
    return f"bench.{run or run_id()}.ctl"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--status", help="JSON status file to keep up to date")
    args = ap.parse_args(argv)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    by_topic = {svc(n): n for n in SERVICE_NAMES}
    consumer = Consumer({"bootstrap.servers": servers(), "group.id": f"bench.{run_id()}.services",
                         "auto.offset.reset": "earliest", "enable.auto.commit": True,
                         "fetch.wait.max.ms": 100, "client.id": "bench-services"})
    producer = Producer({"bootstrap.servers": servers(), "linger.ms": 0, "client.id": "bench-services"})
    assigned: list[str] = []
    consumer.subscribe([*by_topic, control_topic()],
                       on_assign=lambda c, parts: assigned.extend(p.topic for p in parts))
    held: list[tuple[str, Any, bytes | None]] = []
    counts = {"received": 0, "replied": 0, "released": 0, "bad": 0}
    last_status = 0.0

    def reply(return_topic: str, result: Any, corr: bytes | None) -> None:
        headers = [("fusion-status", b"ok")] + ([("fusion-id", corr)] if corr else [])
        while True:
            try:
                producer.produce(return_topic, json.dumps(result).encode(), headers=headers)
                break
            except BufferError:
                producer.poll(0.1)
        counts["replied"] += 1

    while not stop.is_set():
        for msg in consume_ready(consumer, 500, 0.1):
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    print(f"service: consume error {err.str()}", flush=True)
                continue
            if msg.topic() == control_topic():
                if msg.value() == b"release":
                    counts["released"] += len(held)
                    for rt, result, corr in held:
                        reply(rt, result, corr)
                    held.clear()
                continue
            counts["received"] += 1
            try:
                body = json.loads(msg.value())
                name = by_topic[msg.topic()]
                rt = body.get("return-topic") or body.get("return_topic") or body.get("response-topic")
                corr = body.get("id")
                corr_b = str(corr).encode() if corr is not None else None
                result = service_answer(name, body.get("data"))
            except Exception as exc:  # a benchmark service never dies on bad input; it counts it
                counts["bad"] += 1
                print(f"service: bad request on {msg.topic()}: {exc}", flush=True)
                continue
            if not rt:
                continue
            if name == "hold":
                held.append((rt, result, corr_b))
            else:
                reply(rt, result, corr_b)
        producer.poll(0)
        now = time.monotonic()
        if now - last_status > 0.2:
            last_status = now
            write_status(args.status, {**counts, "held": len(held), "assigned": len(assigned)})
    producer.flush(10)
    consumer.close()
    write_status(args.status, {**counts, "held": len(held), "assigned": len(assigned), "stopped": True})


if __name__ == "__main__":
    main()
