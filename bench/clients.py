"""The callers the benchmark measures with: raw confluent-kafka request/reply, and a closed-loop load driver.

- :class:`EphemeralCaller`: a return topic per request (create, send, wait, delete)
  -- how a fusion-clj pipeline calls a reactor, and with the echo service as the
  target, the floor of the ephemeral-topic design;
- :class:`CorrelationCaller`: one long-lived reply topic, replies matched by
  correlation id (the ``fusion-id`` header) -- the floor of Kafka request/reply here,
  and the load generator of the throughput test (it costs the broker no topic per
  request, so it measures the server side);
- :func:`closed_loop`: keeps N requests in flight and counts completions per second.

Both callers read their replies with one consumer by explicit assignment.  Before
assigning a new topic they fetch its metadata: librdkafka otherwise learns of a
topic assigned by name only on its once-a-second topic scan, which adds 0.5 s on
average to every call (see docs/benchmarks.md).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from fusion_celery.protocol import decode_reply

from .common import consume_ready, return_topic_name

__all__ = ["CorrelationCaller", "EphemeralCaller", "LoopResult", "closed_loop", "warm_metadata"]


def warm_metadata(consumer: Consumer, topic: str, tries: int = 20) -> bool:
    """Ask the broker for ``topic``'s metadata until it has a leader (so an assignment starts at once)."""
    for _ in range(tries):
        md = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if md is not None and md.error is None and md.partitions and all(
                p.leader >= 0 for p in md.partitions.values()):
            return True
        time.sleep(0.005)
    return False


class EphemeralCaller:
    """One call at a time, each on a return topic of its own."""

    def __init__(self, servers: str, tag: str = "bench", metadata_warmup: bool = True) -> None:
        self.tag, self.warmup = tag, metadata_warmup
        self.admin = AdminClient({"bootstrap.servers": servers})
        self.producer = Producer({"bootstrap.servers": servers, "linger.ms": 0, "client.id": f"{tag}-caller"})
        self.consumer = Consumer({"bootstrap.servers": servers, "group.id": "bench.callers",
                                  "enable.auto.commit": False, "fetch.wait.max.ms": 100,
                                  "auto.offset.reset": "earliest", "client.id": f"{tag}-caller"})
        self._deletes: list[Any] = []

    def call(self, topic: str, data: Any, timeout: float = 60.0) -> tuple[Any, dict[str, float]]:
        """Send ``data`` to ``topic`` and return (reply value, timings in seconds)."""
        rt = return_topic_name(self.tag)
        t0 = time.perf_counter()
        self.admin.create_topics([NewTopic(rt, 1, -1)], operation_timeout=30)[rt].result(timeout)
        t1 = time.perf_counter()
        if self.warmup:
            warm_metadata(self.consumer, rt)
        tp = TopicPartition(rt, 0, OFFSET_BEGINNING)
        self.consumer.incremental_assign([tp])
        try:
            corr = uuid.uuid4().hex
            self.producer.produce(topic, json.dumps({"data": data, "return-topic": rt, "id": corr}).encode(),
                                  key=corr)  # keyed by the request's id: requests spread over partitions
            self.producer.poll(0)
            deadline = time.monotonic() + timeout
            while True:
                for msg in consume_ready(self.consumer, 10, 0.005):
                    if msg.error() is None and msg.topic() == rt:
                        t2 = time.perf_counter()
                        value = decode_reply(msg.value(), msg.headers())
                        return value, {"total": t2 - t0, "create": t1 - t0, "after_create": t2 - t1}
                self.producer.poll(0)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no reply from {topic} on {rt} within {timeout}s")
        finally:
            self.consumer.incremental_unassign([TopicPartition(rt, 0)])
            # Deleted without waiting, as fusion's waiter does; close() collects the answers.
            self._deletes.append(self.admin.delete_topics([rt], operation_timeout=30)[rt])

    def close(self) -> None:
        for fut in self._deletes:
            try:
                fut.result(60)
            except Exception:  # already gone
                pass
        self._deletes.clear()
        self.consumer.close()
        self.producer.flush(10)


@dataclass
class _Pending:
    t0: float
    event: threading.Event | None = None
    callback: Callable[[bool, float, Any], None] | None = None
    value: Any = None
    ok: bool = False


class CorrelationCaller:
    """Many calls at once over one long-lived reply topic; replies matched by their ``fusion-id`` header."""

    def __init__(self, servers: str, reply_topic: str, tag: str = "bench") -> None:
        self.reply_topic = reply_topic
        admin = AdminClient({"bootstrap.servers": servers})
        fut = admin.create_topics([NewTopic(reply_topic, 1, -1)], operation_timeout=30)[reply_topic]
        try:
            fut.result(60)
        except Exception as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
        self.producer = Producer({"bootstrap.servers": servers, "linger.ms": 0, "client.id": f"{tag}-corr"})
        self.consumer = Consumer({"bootstrap.servers": servers, "group.id": "bench.callers",
                                  "enable.auto.commit": False, "fetch.wait.max.ms": 100,
                                  "auto.offset.reset": "earliest", "client.id": f"{tag}-corr"})
        warm_metadata(self.consumer, reply_topic)
        deadline = time.monotonic() + 60
        while True:  # a busy broker may answer the creation before its metadata lists the partition
            try:
                _, high = self.consumer.get_watermark_offsets(TopicPartition(reply_topic, 0), timeout=10)
                break
            except KafkaException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
                warm_metadata(self.consumer, reply_topic)
        self.consumer.assign([TopicPartition(reply_topic, 0, high)])
        self.pending: dict[str, _Pending] = {}
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.unmatched = 0
        self.reader = threading.Thread(target=self._read, name="bench-corr-reader", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while not self.stop_event.is_set():
            for msg in consume_ready(self.consumer, 1000, 0.05):
                if msg.error() is not None:
                    continue
                t = time.perf_counter()
                corr = dict(msg.headers() or []).get("fusion-id")
                with self.lock:
                    p = self.pending.pop(corr.decode(), None) if corr else None
                if p is None:
                    self.unmatched += 1
                    continue
                try:
                    p.value, p.ok = decode_reply(msg.value(), msg.headers()), True
                except Exception as exc:
                    p.value, p.ok = exc, False
                if p.callback is not None:
                    p.callback(p.ok, t - p.t0, p.value)
                if p.event is not None:
                    p.event.set()
            self.producer.poll(0)

    def submit(self, topic: str, data: Any, callback: Callable[[bool, float, Any], None] | None = None,
               event: threading.Event | None = None) -> _Pending:
        corr = uuid.uuid4().hex
        p = _Pending(time.perf_counter(), event, callback)
        with self.lock:
            self.pending[corr] = p
        body = json.dumps({"data": data, "return-topic": self.reply_topic, "id": corr}).encode()
        while True:
            try:
                self.producer.produce(topic, body, key=corr)
                break
            except BufferError:
                self.producer.poll(0.05)
        self.producer.poll(0)
        return p

    def call(self, topic: str, data: Any, timeout: float = 60.0) -> tuple[Any, float]:
        """One synchronous call: (reply value, seconds)."""
        ev = threading.Event()
        p = self.submit(topic, data, event=ev)
        if not ev.wait(timeout):
            raise TimeoutError(f"no reply from {topic} on {self.reply_topic} within {timeout}s")
        if not p.ok:
            raise p.value
        return p.value, time.perf_counter() - p.t0

    def outstanding(self) -> int:
        with self.lock:
            return len(self.pending)

    def forget_all(self) -> int:
        with self.lock:
            n = len(self.pending)
            self.pending.clear()
            return n

    def close(self) -> None:
        self.stop_event.set()
        self.reader.join(10)
        self.consumer.close()
        self.producer.flush(10)


@dataclass
class LoopResult:
    in_flight: int
    window_s: float = 0.0
    completed: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    drained: bool = True
    lost: int = 0
    warmup_s: float = 0.0
    note: str = ""
    total: int = 0  # every completion of the loop: warm-up, window and drain

    @property
    def rps(self) -> float:
        return self.completed / self.window_s if self.window_s else 0.0


def closed_loop(caller: CorrelationCaller, topic: str, data: Any, in_flight: int, *, window_s: float,
                warmup_completions: int, warmup_timeout: float, drain_timeout: float,
                on_window: tuple[Callable[[], Any], Callable[[], Any]] | None = None) -> LoopResult:
    """Keep ``in_flight`` requests outstanding; count completions per second over a window after warm-up.

    A request that completes starts the next one.  The window opens after
    ``warmup_completions`` completions (so queues are full), lasts ``window_s``,
    then no new request is sent and the ones in flight are drained.  ``on_window`` is called as the
    window opens and as it closes.
    """
    res = LoopResult(in_flight)
    lock = threading.Lock()
    state = {"running": True, "measuring": False, "done": 0}
    warm = threading.Event()

    def on_done(ok: bool, latency: float, value: Any) -> None:
        with lock:
            state["done"] += 1
            if state["measuring"]:
                if ok:
                    res.completed += 1
                    res.latencies.append(latency)
                else:
                    res.failed += 1
            if state["done"] >= warmup_completions:
                warm.set()
            again = state["running"]
        if again:
            caller.submit(topic, data, callback=on_done)

    t_start = time.perf_counter()
    for _ in range(in_flight):
        caller.submit(topic, data, callback=on_done)
    if not warm.wait(warmup_timeout):
        res.note = f"warm-up: {state['done']} of {warmup_completions} completions within {warmup_timeout:.0f}s"
    res.warmup_s = time.perf_counter() - t_start
    if on_window:
        on_window[0]()
    with lock:
        state["measuring"] = True
    t0 = time.perf_counter()
    time.sleep(window_s)
    with lock:
        state["measuring"] = False
        state["running"] = False
    res.window_s = time.perf_counter() - t0
    if on_window:
        on_window[1]()
    deadline = time.monotonic() + drain_timeout
    while caller.outstanding() and time.monotonic() < deadline:
        time.sleep(0.05)
    if caller.outstanding():
        res.drained = False
        res.lost = caller.forget_all()
    res.total = state["done"]
    return res
