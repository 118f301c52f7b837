"""Topics of a run: creating and deleting them, counting return topics, and sampling their churn."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from .common import POOL_PREFIX, RETURN_PREFIX

__all__ = ["ChurnSampler", "Topics", "owner_of"]


def owner_of(name: str) -> str:
    """Who made a return topic: ``clj`` (consumer-per-wait design), ``client`` (the bench callers), ``fusion``
    (ephemeral), ``fusion-pool`` (the worker with a return-topic pool), ``fusion-leased`` (lease pools) or
    ``fusion-shared`` (the shared reply topics)."""
    if name.startswith(POOL_PREFIX):
        return "fusion-pool"
    if name.startswith(f"{RETURN_PREFIX}lease."):
        return "fusion-leased"
    if name.startswith(f"{RETURN_PREFIX}shared."):
        return "fusion-shared"
    rest = name[len(RETURN_PREFIX):].split(".", 1)[-1]
    if rest.startswith("clj-"):
        return "clj"
    if rest.startswith("bench-") or rest.startswith("floor-"):
        return "client"
    return "fusion"


class Topics:
    """Admin helpers over one AdminClient."""

    def __init__(self, servers: str) -> None:
        self.admin = AdminClient({"bootstrap.servers": servers})

    def names(self, prefix: str = "") -> set[str]:
        return {t for t in self.admin.list_topics(timeout=30).topics if t.startswith(prefix)}

    def return_topics(self) -> set[str]:
        return self.names(RETURN_PREFIX)

    def create(self, names: Iterable[str], partitions: int = 1) -> None:
        new = [NewTopic(n, partitions, -1) for n in names]  # the broker's default replication
        if not new:
            return
        for _name, fut in self.admin.create_topics(new, operation_timeout=60).items():
            try:
                fut.result(90)
            except KafkaException as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise

    def delete(self, names: Iterable[str]) -> None:
        names = list(dict.fromkeys(names))  # a name twice in one request crashes librdkafka's result handling
        for i in range(0, len(names), 500):
            for fut in self.admin.delete_topics(names[i:i + 500], operation_timeout=60).values():
                try:
                    fut.result(90)
                except KafkaException:
                    pass  # already gone

    def wait_no_return_topics(self, timeout: float, ignore: set[str] = frozenset(),
                              ignore_prefix: str | tuple[str, ...] | None = None) -> dict[str, Any]:
        """Wait until no return topic (but those in ``ignore`` or starting with ``ignore_prefix``) is left;
        say how many were left, how long it took, and how many were ignored by prefix."""
        t0 = time.monotonic()
        left: set[str] = set()
        held: set[str] = set()
        while True:
            left = self.return_topics() - ignore
            if ignore_prefix:
                held = {t for t in left if t.startswith(ignore_prefix)}
                left -= held
            if not left or time.monotonic() - t0 > timeout:
                break
            time.sleep(0.25)
        out = {"left": len(left), "seconds_to_zero": None if left else round(time.monotonic() - t0, 2),
               "examples": sorted(left)[:5]}
        if ignore_prefix:
            out["held_by_pool"] = len(held)
        return out


@dataclass
class _Window:
    label: str
    t0: float
    t1: float | None = None
    created: dict[str, int] = field(default_factory=dict)
    deleted: dict[str, int] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)
    peak_all: int = 0


class ChurnSampler(threading.Thread):
    """Lists the return topics every ``interval`` seconds; counts creations, deletions and the peak alive.

    Counts are per owner (see :func:`owner_of`) and per labelled window.  A topic
    that lived and died between two samples is not seen; the report compares the
    count with the number of topics the requests must have made.
    """

    def __init__(self, servers: str, interval: float = 0.5) -> None:
        super().__init__(name="bench-churn", daemon=True)
        self.topics = Topics(servers)
        self.interval = interval
        self.stop_event = threading.Event()
        self.paused = threading.Event()
        self.lock = threading.Lock()
        self.alive: set[str] = set()
        self.windows: list[_Window] = []
        self.peak_all = 0
        self.errors = 0
        self.samples = 0

    def open(self, label: str) -> _Window:
        w = _Window(label, time.monotonic())
        with self.lock:
            self.windows.append(w)
        return w

    def close_window(self, w: _Window) -> dict[str, Any]:
        self.sample()
        with self.lock:
            w.t1 = time.monotonic()
        dur = max(1e-9, w.t1 - w.t0)
        owners = sorted(set(w.created) | set(w.deleted) | set(w.peak))
        return {"label": w.label, "seconds": round(dur, 2),
                "by_owner": {o: {"created": w.created.get(o, 0), "deleted": w.deleted.get(o, 0),
                                 "created_per_s": round(w.created.get(o, 0) / dur, 1),
                                 "deleted_per_s": round(w.deleted.get(o, 0) / dur, 1),
                                 "peak_alive": w.peak.get(o, 0)} for o in owners},
                "peak_alive": w.peak_all}

    def sample(self) -> None:
        try:
            now_names = self.topics.return_topics()
        except Exception:
            self.errors += 1
            return
        with self.lock:
            self.samples += 1
            born, gone = now_names - self.alive, self.alive - now_names
            self.alive = now_names
            self.peak_all = max(self.peak_all, len(now_names))
            counts: dict[str, int] = {}
            for n in now_names:
                o = owner_of(n)
                counts[o] = counts.get(o, 0) + 1
            for w in self.windows:
                if w.t1 is not None:
                    continue
                for n in born:
                    w.created[owner_of(n)] = w.created.get(owner_of(n), 0) + 1
                for n in gone:
                    w.deleted[owner_of(n)] = w.deleted.get(owner_of(n), 0) + 1
                for o, c in counts.items():
                    w.peak[o] = max(w.peak.get(o, 0), c)
                w.peak_all = max(w.peak_all, len(now_names))

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            if not self.paused.is_set():
                self.sample()

    def stop(self) -> None:
        self.stop_event.set()
        if self.is_alive():
            self.join(10)
