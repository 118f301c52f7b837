"""Helpers of the reliability suite: stack faults, a load of requests with waits pending, and their check.

The suite's scale comes from its marker: the short version runs in ``make test``, the long one
(``-m soak``) in ``make soak``.  ``scale(short, long)`` picks the number; the environment variable
``FUSION_RELIABILITY_SCALE=long`` forces the long numbers in a normal run.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from fusion_celery.config import stack_env
from support.brokers import task_counts
from support.kafka import Service, committed_total, high_watermark, return_topic_name
from support.stack import ROOT
from support.waiting import wait_for


def long_run(request: pytest.FixtureRequest) -> bool:
    """True for the soak version of a test (its ``soak`` marker) or when the environment asks for it."""
    return request.node.get_closest_marker("soak") is not None or \
        os.environ.get("FUSION_RELIABILITY_SCALE") == "long"


# -- the stack --------------------------------------------------------------------------------------
def stack_ports() -> dict[str, str]:
    """The FUSION_*_PORT variables and the Kafka node count of the running stack (from .stack/env), for
    stack/stack.sh."""
    env = stack_env(ROOT / ".stack" / "env")
    return {k: v for k, v in env.items()
            if k.startswith("FUSION_") and (k.endswith("_PORT") or k == "FUSION_KAFKA_NODES")}


def stack(*args: str, persist_redis: bool = True, timeout: float = 300) -> str:
    """Run ``stack/stack.sh ARGS`` on this run's ports; fail the test with its output if it fails."""
    env = {**os.environ, **stack_ports()}
    if persist_redis:
        env["FUSION_REDIS_PERSIST"] = "1"
    proc = subprocess.run(["bash", str(ROOT / "stack" / "stack.sh"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"stack.sh {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def make_redis_durable(client, every_write: bool = False) -> None:
    """Turn on Redis's append-only file (if it is off) and wait until it holds the whole dataset,
    so that a stop and start keeps the Celery queues, results and claims.  ``every_write``: sync the
    file before answering each write (``appendfsync always``), so that a kill keeps them too."""
    if client.config_get("appendonly").get("appendonly") != "yes":
        client.config_set("appendonly", "yes")
    client.config_set("appendfsync", "always" if every_write else "everysec")

    def rewritten():
        info = client.info("persistence")
        return info["aof_enabled"] and not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]

    wait_for(rewritten, 60, "Redis to write its append-only file", interval=0.1)


def kill_service(service: str) -> None:
    """``kill -9`` a stack service (by its pidfile) and wait until it is gone; ``stack start`` brings it back."""
    import signal
    pid = int((ROOT / ".stack" / "pids" / f"{service}.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"

    wait_for(gone, 30, f"{service} (pid {pid}) to die")


@dataclass
class Outage:
    """When a service was stopped and started again (monotonic seconds), for the report."""

    service: str
    stopped_at: float = 0.0
    down_s: float = 0.0
    restart_s: float = 0.0


def outage(service: str, seconds: float, during: Any = None, redis_client: Any = None,
           hard: bool = False) -> Outage:
    """Stop ``service`` (kafka, kafka-N | redis | rabbitmq), keep it down ``seconds``, start it again on its data.

    ``during()`` runs right after the stop.  Redis is made durable first (see
    :func:`make_redis_durable`; ``hard`` also has it sync every write) and restarted with
    persistence; RabbitMQ keeps Celery's durable queues and persistent messages as it is.
    ``hard`` kills the service (SIGKILL) instead of stopping it.
    """
    if service == "redis":
        make_redis_durable(redis_client, every_write=hard)
    out = Outage(service)
    if hard:
        kill_service(service)
    else:
        stack("stop", service)
    out.stopped_at = time.monotonic()
    if during is not None:
        during()
    remaining = seconds - (time.monotonic() - out.stopped_at)
    if remaining > 0:
        time.sleep(remaining)  # the outage itself: a fixed length, not a wait for a condition
    t0 = time.monotonic()
    stack("start", service)
    out.restart_s = time.monotonic() - t0
    out.down_s = time.monotonic() - out.stopped_at
    return out


# -- a gate: a dependency that answers when told ----------------------------------------------------
class Gate(Service):
    """A plain confluent-kafka dependency that holds its replies until released (all, or some)."""

    def release(self, count: int | None = None) -> int:
        held = self.held
        n = len(held) if count is None else min(count, len(held))
        self.held = held[n:]
        for return_topic, result, headers in held[:n]:
            self.producer.produce(return_topic, json.dumps(result), headers=headers)
            self.producer.poll(0)
        self.producer.flush(60)
        return n


def start_gate(kit, topic: str | None = None) -> Gate:
    g = Gate(kit.servers, topic or kit.topic(), lambda data: {"echo": data})
    g.hold = True
    g.start()
    return g


# -- requests and their answers ---------------------------------------------------------------------
@dataclass
class Load:
    """Requests sent over Kafka to the reactors of one isolated deployment, answered on one return topic."""

    kit: Any
    run: str
    back: str = field(default_factory=return_topic_name)
    expected: dict[str, Any] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    sent_at: dict[str, float] = field(default_factory=dict)
    counted: set[str] = field(default_factory=set)  # requests whose reactor counts its body runs

    def __post_init__(self) -> None:
        self.kit.topic(self.back)
        self.tag = uuid.uuid4().hex[:6]

    def _send(self, topic: str, rid: str, data: Any, expect: Any, kind: str) -> None:
        self.kit.producer.produce(topic, json.dumps({"data": data, "return-topic": self.back, "id": rid}))
        self.kit.producer.poll(0)
        self.expected[rid], self.kinds[rid], self.sent_at[rid] = expect, kind, time.monotonic()
        self.counted.add(rid)  # the generic and math reactors count their body runs

    def parked(self, gate: Gate, n: int) -> list[str]:
        """``n`` requests to the generic reactor whose one dependency is ``gate`` (their waits park)."""
        ids = []
        for i in range(n):
            rid = f"p{self.tag}-{i}"
            self._send(f"{self.run}.generic", rid, {"deps": {"g": {"topic": gate.topic, "args": [i]}}, "echo": i},
                       {"results": {"g": {"echo": [i]}}, "echo": i}, "parked")
            ids.append(rid)
        self.kit.producer.flush(60)
        return ids

    def flowing(self, n: int) -> list[str]:
        """``n`` requests to the math reactor (two chained fusion deps): work in flight during a fault."""
        ids = []
        for i in range(n):
            rid = f"f{self.tag}-{i}"
            self._send(f"{self.run}.math", rid, [i, 1], i - 1, "flowing")
            ids.append(rid)
        self.kit.producer.flush(60)
        return ids


@dataclass
class Outcome:
    """What came back for a :class:`Load`: per request id its replies (status, body)."""

    replies: dict[str, list[tuple[str, Any]]]
    correct: list[str]
    errors: dict[str, Any]
    wrong: dict[str, Any]
    missing: list[str]
    duplicates: list[str]
    body_runs: dict[str, int]
    asked: dict[str, int] = field(default_factory=dict)  # dependency request id -> records that brought it
    records: dict[str, set[str]] = field(default_factory=dict)  # ... and which: "topic[partition]@offset -> return"

    def summary(self) -> dict[str, Any]:
        kinds: dict[str, int] = defaultdict(int)
        for body in self.errors.values():
            kinds[(body.get("error") or {}).get("type", "?") if isinstance(body, dict) else "?"] += 1
        return {"answered": len(self.replies), "correct": len(self.correct), "errors": dict(kinds),
                "wrong": len(self.wrong), "missing": len(self.missing), "duplicates": len(self.duplicates),
                "max_body_runs": max(self.body_runs.values(), default=0),
                "max_asked": max(self.asked.values(), default=0)}


#: Seconds to go on reading a load's return topic for duplicates once every request was answered: longer
#: than the fault workers' ``fusion_run_restart_after`` (10 s), after which a copy of a run could answer.
DUPLICATE_WATCH_S = 15.0
#: Error types a caller may receive after a fault: each names what failed.
CLEAR_ERRORS = {"DependencyFailed", "DependencyTimeout", "WorkerLostError", "RequestExpired"}


def nothing_left(env: dict[str, str], servers: str,
                 reactors: tuple[str, ...] = ("generic", "math", "add", "subtract")) -> Callable[[], bool]:
    """A check that no work of a test's workers is left that could still answer: the Celery broker (Redis or
    RabbitMQ) holds no task (none queued, none delivered and unacknowledged: on Redis a killed worker's
    prefetched tasks stay there until restored), and each reactor's consumer group has committed every
    record of its topic (a killed worker's uncommitted records are read again by the group's next member)."""
    topics = [f"{env['FUSION_TEST_RUN']}.{name}" for name in reactors]

    def lag(topic: str) -> int:  # reactor topics have fusion_reactor_partitions (3) partitions
        return high_watermark(servers, topic) - committed_total(servers, f"fusion.reactor.{topic}", topic, 3)

    def idle() -> bool:
        try:
            return not any(task_counts(env["CELERY_BROKER_URL"])) and not any(lag(t) for t in topics)
        except Exception:  # the broker or Kafka unreachable: not known to be idle
            return False

    return idle


def collect(load: Load, redis_client, timeout: float = 300.0, settle: float | None = None,
            quiet: Callable[[], bool] | None = None) -> Outcome:
    """Read the answers of every request of ``load`` (until all came or ``timeout``), then classify them.

    With ``settle``, stop early once no new answer came for ``settle`` seconds (for a test that
    expects some requests to stay unanswered); with ``quiet`` too, only seconds during which
    ``quiet()`` held count (checked every 3 s; e.g. :func:`nothing_left`)."""
    c = Consumer({"bootstrap.servers": load.kit.servers, "group.id": f"rel-{uuid.uuid4().hex}",
                  "enable.auto.commit": False})
    c.assign([TopicPartition(load.back, 0, OFFSET_BEGINNING)])
    replies: dict[str, list[tuple[str, Any]]] = defaultdict(list)
    deadline = time.monotonic() + timeout
    last_new = last_quiet_check = time.monotonic()
    try:
        while time.monotonic() < deadline and not set(load.expected) <= set(replies):
            if settle is not None and quiet is not None and time.monotonic() - last_quiet_check >= 3:
                last_quiet_check = time.monotonic()
                if not quiet():
                    last_new = time.monotonic()
            if settle is not None and time.monotonic() - last_new > settle:
                break
            for m in c.consume(500, timeout=0.5):
                last_new = time.monotonic()
                if m.error() is None:
                    h = {k: v.decode() for k, v in (m.headers() or [])}
                    replies[h.get("fusion-id", "?")].append((h.get("fusion-status", "?"), json.loads(m.value())))
        # Go on reading for a second reply to anything (a duplicate): for DUPLICATE_WATCH_S seconds, and,
        # with ``quiet``, until nothing is left that could answer (up to a minute more).
        watch_end = time.monotonic() + DUPLICATE_WATCH_S
        while time.monotonic() < watch_end or (quiet is not None and time.monotonic() < watch_end + 60
                                               and not quiet()):
            for m in c.consume(500, timeout=0.5):
                if m.error() is None:
                    h = {k: v.decode() for k, v in (m.headers() or [])}
                    replies[h.get("fusion-id", "?")].append((h.get("fusion-status", "?"),
                                                             json.loads(m.value())))
    finally:
        c.close()
    correct, errors, wrong = [], {}, {}
    for rid, expect in load.expected.items():
        got = replies.get(rid)
        if not got:
            continue
        status, body = got[0]
        if status == "ok" and body == expect:
            correct.append(rid)
        elif status == "error" and isinstance(body, dict) and (body.get("error") or {}).get("type") in CLEAR_ERRORS:
            errors[rid] = body
        else:
            wrong[rid] = (status, body)
    runs = {rid: int(redis_client.get(f"bodyruns:{load.run}:{rid}") or 0) for rid in load.counted}
    records = {k.decode(): {m.decode() for m in redis_client.smembers(k)}
               for k in redis_client.scan_iter(f"asked:{load.run}:*")}
    asked = {k: len(v) for k, v in records.items()}
    return Outcome(dict(replies), correct, errors, wrong, sorted(set(load.expected) - set(replies)),
                   sorted(r for r, v in replies.items() if len(v) > 1), runs, asked, records)


def check(outcome: Outcome, gate: Any = None) -> None:
    """Nothing lost, nothing twice, no error: every request answered once and correctly, every chord body
    run once, every dependency request (to the fusion reactors, and to ``gate`` if given) received once."""
    s = outcome.summary()
    assert not outcome.missing, \
        f"{len(outcome.missing)} requests were never answered (e.g. {outcome.missing[:5]}): {s}"
    assert not outcome.wrong, f"wrong answers: {list(outcome.wrong.items())[:5]}: {s}"
    assert not outcome.errors, f"requests failed: {list(outcome.errors.items())[:5]}: {s}"
    assert not outcome.duplicates, f"requests answered twice: {outcome.duplicates[:5]}: {s}"
    over = {r: n for r, n in outcome.body_runs.items() if n != 1}
    assert not over, f"chord bodies did not run exactly once: {list(over.items())[:5]}: {s}"
    twice = {k: sorted(outcome.records[k]) for k, n in outcome.asked.items() if n > 1}
    assert not twice, f"dependency requests received more than once (the records): {list(twice.items())[:5]}: {s}"
    if gate is not None:
        # The records on the gate's topic, not what its consumer received: a plain consumer re-reads what
        # it had not committed when Kafka went away.
        again = {i: n for i, n in requests_on(gate.servers, gate.topic).items() if n > 1}
        assert not again, f"dependency requests were sent more than once: {list(again.items())[:5]}"


def requests_on(servers: str, topic: str) -> Counter:
    """How many requests of each id a one-partition topic holds."""
    c = Consumer({"bootstrap.servers": servers, "group.id": f"count-{uuid.uuid4().hex}",
                  "enable.auto.commit": False})
    try:
        end = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1]
        c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        ids: Counter = Counter()
        seen, deadline = 0, time.monotonic() + 60
        while seen < end and time.monotonic() < deadline:
            for m in c.consume(500, timeout=0.5):
                if m.error() is None:
                    seen = max(seen, m.offset() + 1)
                    ids[json.loads(m.value()).get("id")] += 1
        assert seen >= end, f"read {seen} of the {end} records of {topic}"
        return ids
    finally:
        c.close()


_INTAKE_STOPPED = re.compile(r"reactor (\S+): intake stopped \((\{[^{}]*\})\)")


def intake_counts(log: str, keys: tuple[str, ...] = ("received", "dead_lettered", "started")
                  ) -> dict[str, tuple[int, ...]]:
    """Each reactor's intake counts at a worker's shutdown, as ``keys`` (by default: received, dead-lettered,
    started); a count missing from the line (``dropped``, in a log of a worker that did not count it) is 0."""
    out = {}
    for m in _INTAKE_STOPPED.finditer(log):
        counts = ast.literal_eval(m[2])
        out[m[1]] = tuple(int(counts.get(k, 0)) for k in keys)
    return out


def check_all_handed(worker) -> None:
    """Stop ``worker`` and check that each of its intakes handed every record it read to Celery or to the
    dead-letter topic, or dropped it (the dead-letter topic refused it): none was kept back, unhanded and
    uncommitted, when the worker stopped."""
    assert worker.stop() == 0, f"worker {worker.name} did not stop cleanly:\n{worker.log()[-3000:]}"
    counts = intake_counts(worker.log(), ("received", "dead_lettered", "started", "dropped"))
    assert counts, f"worker {worker.name} logged no intake counts"
    kept = {topic: c for topic, c in counts.items() if c[0] != c[1] + c[2] + c[3]}
    assert not kept, \
        f"intakes of {worker.name} read records they never handed over (received, dlq, started, dropped): {kept}"


def recovered(workers: Any) -> dict[str, int]:
    """What the workers' logs say was lost on the way and made good: runs whose Celery message never
    started (sent again by the intake: a task message the broker lost), runs that stalled (their deps
    compiled again: a step's message lost), and copies of a step delivered again after it ran (ignored
    by its run-once claim: a message the broker delivered twice)."""
    logs = [w.log() for w in workers]
    return {"resent_not_started": sum(log.count("has not started; sent it again") for log in logs),
            "redriven_stalled": sum(log.count("has stalled (no reply awaited") for log in logs),
            "duplicate_deliveries": sum(log.count("already done; duplicate delivery ignored") for log in logs)}


def report(name: str, figures: dict[str, Any]) -> None:
    """Print the figures (pytest -s, or the captured output of a failure) and keep them in .stack/reliability/."""
    text = json.dumps({"test": name, **figures}, default=str)
    print(f"[reliability] {text}")
    out = ROOT / ".stack" / "reliability"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "figures.jsonl", "a") as f:
        f.write(text + "\n")


class Sampler(threading.Thread):
    """Samples a worker main process's RSS and open files, and the CPU time of the worker and its pool
    children, every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 1.0, extra: Any = None) -> None:
        super().__init__(daemon=True)
        import psutil
        self.proc = psutil.Process(pid)
        self.interval, self.extra = interval, extra
        self.samples: list[dict[str, Any]] = []
        self.stop_event = threading.Event()

    def sample(self) -> dict[str, Any]:
        s = {"t": time.monotonic(), "rss_mb": self.proc.memory_info().rss / 2**20, "fds": self.proc.num_fds(),
             "threads": self.proc.num_threads(), "cpu_s": 0.0, "children_rss_mb": 0.0}
        for i, proc in enumerate([self.proc, *self.proc.children()]):
            try:
                t = proc.cpu_times()
                s["cpu_s"] += t.user + t.system
                if i:
                    s["children_rss_mb"] += proc.memory_info().rss / 2**20
            except Exception:  # a pool child that just went away
                continue
        if self.extra is not None:
            s.update(self.extra())
        return s

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            try:
                self.samples.append(self.sample())
            except Exception:  # the process went away
                return

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)
