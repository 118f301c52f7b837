"""fusion-clj's design re-created in Python: a new consumer per wait, deps one after another.

This is the baseline fusion-celery replaces.  For each request on a reactor topic
``bench.<run>.clj.<shape>`` it walks the deps-map in topological order, and for
each dep: creates a return topic, sends the request, *then* creates a new
consumer subscribed to the return topic (as fusion-clj did), polls it until the
reply, closes it and deletes the topic; then it runs the processing step and
replies.  Two departures from the 2016 original, both in its favour: the consumer
reads from the earliest offset (the original used the default ``latest`` and
could miss a fast reply), and topics are made with the AdminClient instead of
ZooKeeper's AdminUtils.

The original served one request at a time on its consumer thread; here each
request gets a thread of its own (up to ``--threads``), so that it can hold as
many waits in flight as fusion-celery (and show what that costs).

Run: ``python -m bench.clj --status FILE --threads N``.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from graphlib import TopologicalSorter
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from .common import (
    SHAPES,
    clj_topic,
    consume_ready,
    deps_map,
    process,
    return_topic_name,
    run_id,
    servers,
    write_status,
)

__all__ = ["CljReactor", "main"]


class CljReactor:
    """Serves the clj topics with a consumer per wait."""

    def __init__(self, threads: int, wait_timeout: float = 600.0, stop: threading.Event | None = None) -> None:
        self.stop = stop or threading.Event()
        self.servers = servers()
        self.admin = AdminClient({"bootstrap.servers": self.servers})
        self.producer = Producer({"bootstrap.servers": self.servers, "linger.ms": 0, "client.id": "bench-clj"})
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="clj")
        self.wait_timeout = wait_timeout
        self.lock = threading.Lock()
        self.counts = {"received": 0, "done": 0, "failed": 0, "waiting": 0, "consumers_made": 0,
                       "topics_created": 0, "topics_deleted": 0}
        self.last_error = ""
        self.by_topic = {clj_topic(s): s for s in [*SHAPES, "hold"]}

    def _count(self, key: str, delta: int = 1) -> None:
        with self.lock:
            self.counts[key] += delta

    def _send(self, topic: str, value: bytes) -> None:
        done = threading.Event()
        out: dict[str, Any] = {}

        def on_delivery(err: Any, msg: Any) -> None:
            out["err"] = err
            done.set()

        while True:
            try:
                self.producer.produce(topic, value, key=uuid.uuid4().hex, on_delivery=on_delivery)
                break
            except BufferError:
                self.producer.poll(0.1)
        while not done.wait(0.005):
            self.producer.poll(0)
        if out.get("err") is not None:
            raise RuntimeError(f"send to {topic}: {out['err']}")

    def call_dep(self, topic: str, data: Any) -> Any:
        """One dependency call, the fusion-clj way."""
        rt = return_topic_name("clj")
        self.admin.create_topics([NewTopic(rt, 1, -1)])[rt].result(60)
        self._count("topics_created")
        try:
            self._send(topic, json.dumps({"data": data, "return-topic": rt}).encode())
            # fusion-clj made the consumer after sending the request.
            consumer = Consumer({"bootstrap.servers": self.servers, "group.id": f"bench.clj.{uuid.uuid4().hex}",
                                 "auto.offset.reset": "earliest", "enable.auto.commit": False,
                                 "client.id": "bench-clj-wait"})
            self._count("consumers_made")
            self._count("waiting")
            try:
                consumer.subscribe([rt])
                deadline = time.monotonic() + self.wait_timeout
                while time.monotonic() < deadline and not self.stop.is_set():
                    msg = consumer.poll(0.5)
                    if msg is None:
                        continue
                    if msg.error():
                        if msg.error().code() not in (KafkaError._PARTITION_EOF,
                                                      KafkaError.UNKNOWN_TOPIC_OR_PART):
                            raise RuntimeError(msg.error().str())
                        continue
                    return json.loads(msg.value())
                raise TimeoutError(f"no reply on {rt} within {self.wait_timeout}s")
            finally:
                self._count("waiting", -1)
                consumer.close()
        finally:
            try:  # synchronous, as fusion-clj's AdminUtils.deleteTopic was
                self.admin.delete_topics([rt], operation_timeout=60)[rt].result(90)
            except KafkaException as exc:
                self.last_error = f"delete {rt}: {exc}"
            self._count("topics_deleted")

    def handle(self, shape: str, body: dict[str, Any]) -> None:
        rt = body.get("return-topic") or body.get("return_topic") or body.get("response-topic")
        corr = body.get("id")
        headers = [("fusion-id", str(corr).encode())] if corr is not None else []
        try:
            data = body.get("data")
            dm = deps_map(shape, data) or {}
            order = list(TopologicalSorter({n: d.get("deps", []) for n, d in dm.items()}).static_order())
            results: dict[str, Any] = {}
            for name in order:  # one after another, as fusion-clj's reduce did
                dep = dm[name]
                args = dep.get("args", [])
                for prior in dep.get("deps", []):
                    args = [results[prior], *args] if dep.get("arg_in_fn") == "cons" else [*args, results[prior]]
                results[name] = self.call_dep(dep["topic"], args)
            value, status = json.dumps(process(shape, data, results)).encode(), b"ok"
            self._count("done")
        except Exception as exc:  # the benchmark counts failures instead of dying
            self.last_error = f"{type(exc).__name__}: {exc}"
            value = json.dumps({"error": {"type": type(exc).__name__, "message": str(exc)}}).encode()
            status = b"error"
            self._count("failed")
        if rt:
            try:
                self.producer.produce(rt, value, headers=[("fusion-status", status), *headers])
                self.producer.poll(0)
            except (BufferError, KafkaException) as exc:
                self.last_error = f"reply: {exc}"

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {**self.counts, "threads": threading.active_count(), "last_error": self.last_error}

    def serve(self, stop: threading.Event, status_path: str | None) -> None:
        consumer = Consumer({"bootstrap.servers": self.servers, "group.id": f"bench.{run_id()}.clj",
                             "auto.offset.reset": "earliest", "enable.auto.commit": True,
                             "client.id": "bench-clj"})
        consumer.subscribe(list(self.by_topic))
        last = 0.0
        try:
            while not stop.is_set():
                for msg in consume_ready(consumer, 500, 0.1):
                    if msg.error():
                        continue
                    self._count("received")
                    self.pool.submit(self.handle, self.by_topic[msg.topic()], json.loads(msg.value()))
                self.producer.poll(0)
                now = time.monotonic()
                if now - last > 0.2:
                    last = now
                    write_status(status_path, self.status())
        finally:
            consumer.close()
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.producer.flush(10)
            write_status(status_path, {**self.status(), "stopped": True})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--status", help="JSON status file to keep up to date")
    ap.add_argument("--threads", type=int, default=1000, help="requests handled at once")
    ap.add_argument("--wait-timeout", type=float, default=600.0)
    args = ap.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    CljReactor(args.threads, args.wait_timeout, stop).serve(stop, args.status)


if __name__ == "__main__":
    main()
