"""What every process of a benchmark run shares: the run's names, the DAG shapes, Kafka settings.

A run is identified by ``BENCH_RUN`` (set by the orchestrator in the environment
of every process it starts).  All topics of a run start with ``bench.<run>.``,
except the ephemeral return topics, which use fusion's prefix ``fusion.rt.`` so
that reactors accept them and the leftover check sees them all.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

__all__ = [
    "DATA",
    "POOL_PREFIX",
    "POOL_SIZE",
    "RETURN_PREFIX",
    "SERVICE_NAMES",
    "SHAPES",
    "CHANNELS",
    "clj_topic",
    "deps_map",
    "expected_result",
    "reactor_topic",
    "read_status",
    "return_topic_name",
    "run_id",
    "servers",
    "svc",
    "write_status",
]



def run_id() -> str:
    """This run's id (``BENCH_RUN``, set by the orchestrator for every process it starts)."""
    return os.environ.get("BENCH_RUN", "local")
RETURN_PREFIX = "fusion.rt."

#: The return-topic prefix of the fusion-celery worker with a return-topic pool (variant ``pool``), so that the
#: topics its pool holds ready can be told apart while it runs (they must be gone once it stopped).
POOL_PREFIX = "fusion.rt.pool."

#: ``fusion_return_topic_pool`` of that worker.
POOL_SIZE = 16

#: The four DAG shapes measured, each as (name, deps names in fusion-clj's order).
SHAPES = ("nodeps", "onedep", "math", "diamond")

#: Every dependency service the shapes (and the waiting test) use.
SERVICE_NAMES = ("echo", "add", "subtract", "a", "b", "c", "d", "hold")

#: The request data of every call.
DATA = [1, 2, 3]


def servers() -> str:
    """The Kafka bootstrap servers of the local stack."""
    return os.environ.get("FUSION_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")


def svc(name: str, run: str | None = None) -> str:
    """The topic of dependency service ``name``."""
    return f"bench.{run or run_id()}.svc.{name}"


#: The reply channels a worker's reactors use, each on reactor topics of its own (None: the app's default).
CHANNELS = (None, "leased", "shared", "ephemeral")


def reactor_topic(shape: str, run: str | None = None, variant: str | None = None, channel: str | None = None) -> str:
    """The topic of the fusion-celery reactor of ``shape`` whose deps use reply channel ``channel``.

    ``variant`` (default: ``BENCH_VARIANT`` of this process) names a second fusion-celery worker with
    other settings, e.g. ``pool`` (``fusion_return_topic_pool``), serving its own reactor topics.
    ``channel`` None: the worker's ``fusion_reply_channel``.
    """
    variant = os.environ.get("BENCH_VARIANT", "") if variant is None else variant
    return f"bench.{run or run_id()}.r{variant}{'-' + channel if channel else ''}.{shape}"


def clj_topic(shape: str, run: str | None = None) -> str:
    """The topic of the consumer-per-wait (fusion-clj design) reactor of ``shape``."""
    return f"bench.{run or run_id()}.clj.{shape}"


def return_topic_name(tag: str) -> str:
    """A fresh return topic: fusion's prefix, creation time in ms (the reaper reads it), ``tag``, random part."""
    return f"{RETURN_PREFIX}{int(time.time() * 1000)}.{tag}-{uuid.uuid4().hex[:16]}"


def deps_map(shape: str, data: Any, topic: Callable[[str], str] = svc) -> dict[str, Any] | None:
    """The deps-map of ``shape`` for request ``data`` (the same for fusion-celery and the consumer-per-wait design).

    - ``nodeps``: none;
    - ``onedep``: one call to the echo service;
    - ``math``: fusion-clj's README example, add then subtract (two chained deps);
    - ``diamond``: a, then b and c (both on a), then d (on b and c).
    """
    if shape == "nodeps":
        return None
    if shape == "onedep":
        return {"one": {"topic": topic("echo"), "args": data}}
    if shape == "math":
        return {"one": {"topic": topic("add"), "args": data},
                "two": {"topic": topic("subtract"), "args": [2], "arg_in_fn": "cons", "deps": ["one"]}}
    if shape == "diamond":
        return {"a": {"topic": topic("a"), "args": data},
                "b": {"topic": topic("b"), "args": ["b"], "deps": ["a"]},
                "c": {"topic": topic("c"), "args": ["c"], "arg_in_fn": "cons", "deps": ["a"]},
                "d": {"topic": topic("d"), "args": [], "deps": ["b", "c"]}}
    if shape == "hold":
        return {"one": {"topic": topic("hold"), "args": data}}
    raise ValueError(f"unknown shape {shape!r}")


def process(shape: str, data: Any, results: dict[str, Any]) -> Any:
    """The processing step of a reactor of ``shape``: its answer given its deps' results."""
    if shape == "nodeps":
        return data
    if shape in ("onedep", "hold"):
        return results["one"]
    if shape == "math":
        return results["two"]
    return results["d"]


def service_answer(name: str, data: Any) -> Any:
    """What dependency service ``name`` answers to ``data`` (small values, so payloads do not grow)."""
    if name == "add":
        return sum(data)
    if name == "subtract":
        first, *rest = data
        return first - sum(rest)
    if name in ("echo", "hold"):
        return data
    return len(json.dumps(data))


def expected_result(shape: str, data: Any = DATA) -> Any:
    """The answer a correct run of ``shape`` gives (checked on warm-up calls)."""
    if shape == "nodeps" or shape in ("onedep", "hold"):
        return data
    if shape == "math":
        return service_answer("subtract", [service_answer("add", data), 2])
    a = service_answer("a", data)
    b = service_answer("b", ["b", a])
    c = service_answer("c", [a, "c"])
    return service_answer("d", [b, c])


def write_status(path: str | None, status: dict[str, Any]) -> None:
    """Atomically replace the JSON status file of a helper process (read by the orchestrator)."""
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({**status, "t": time.time()}, f)
    os.replace(tmp, path)


def read_status(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def consume_ready(consumer: Any, max_messages: int, timeout: float) -> list[Any]:
    """Wait up to ``timeout`` for one record, then take what else is there (``consume(n, t)`` waits out ``t``)."""
    first = consumer.poll(timeout)
    if first is None:
        return []
    return [first, *consumer.consume(max_messages - 1, timeout=0)]
