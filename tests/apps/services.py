"""Reactors the integration tests run in real workers (topics are prefixed with the test run id)."""

from __future__ import annotations

import os
import time

import redis

from fusion_celery import Reactor, reactor, register_arg_in_fn

RUN = os.environ["FUSION_TEST_RUN"]
r = redis.Redis.from_url(os.environ.get("FUSION_TEST_REDIS") or os.environ["CELERY_RESULT_BACKEND"])


def t(name: str) -> str:
    return f"{RUN}.{name}"


def asked(message) -> None:
    """Note which records brought a dependency request (its id is the asking subtask's) to this service.

    A set of record coordinates, not a counter: a body cut short by a killed worker runs again for the
    same record (at least once, as documented), which is the request received once; a second record
    with the request is the request received twice.
    """
    if message.id:
        r.sadd(f"asked:{RUN}:{message.id}",
               f"{message.topic}[{message.partition}]@{message.offset} -> {message.return_topic}")


@reactor(t("add"))
def add(message):
    asked(message)
    return sum(message.data)


@reactor(t("subtract"))
def subtract(message):
    asked(message)
    first, *rest = message.data
    return first - sum(rest)


def math_deps(message):
    args = message.data or [1, 2, 3]
    return {"one": {"topic": t("add"), "args": args},
            "two": {"topic": t("subtract"), "args": [2], "arg_in_fn": "cons", "deps": ["one"]}}


@reactor(t("math"), deps=math_deps)
def math(message, results):
    r.incr(f"bodyruns:{RUN}:{message.id}")
    return results["two"]


@reactor(t("counted"))
def counted(message):
    """Counts how often its processing step ran for each request id (for the run-once tests)."""
    r.incr(f"procruns:{RUN}:{message.id}")
    return message.data


@reactor(t("boom"))
def boom(message):
    raise ValueError(f"boom: {message.data}")


@reactor(t("record"))
def record(message):
    """Counts what it processed (for the at-least-once test)."""
    r.sadd(f"record:{RUN}", str(message.data))
    return message.data


register_arg_in_fn("merge", lambda args, result: {**args, **result})


class Generic(Reactor):
    """deps-map comes inside the request: {"deps": {...}, "echo": ...}; answers with the results."""

    topic = t("generic")

    def deps(self, message):
        return (message.data or {}).get("deps")

    def process(self, message, results):
        if message.id:
            r.incr(f"bodyruns:{RUN}:{message.id}")
        return {"results": results, "echo": (message.data or {}).get("echo")}


@reactor(t("one-arg"))
def one_arg(message):
    return {"topic": message.topic, "key": message.key, "partition": message.partition,
            "offset": message.offset, "data": message.data, "id": message.id}


@reactor(t("slow"))
def slow(message):
    if message.id:
        r.incr(f"slowruns:{RUN}:{message.id}")
    time.sleep(float(message.data))
    return message.data


from fusion_celery import app as _app  # noqa: E402

if os.environ.get("FUSION_TEST_RESULT_EXPIRES"):
    # The soak test keeps results (and with them claims, progress and chord counters) briefly.
    _app.conf.result_expires = _app.conf.result_chord_expires = int(os.environ["FUSION_TEST_RESULT_EXPIRES"])

if os.environ.get("FUSION_TEST_QUEUE"):
    # A Celery queue of its own: workers of a test that talk to them through Kafka only share nothing with
    # other workers on the same broker database (nor with a task a test left behind there).
    _app.conf.task_default_queue = os.environ["FUSION_TEST_QUEUE"]

if os.environ.get("FUSION_TEST_VISIBILITY_TIMEOUT"):
    # Messages a killed worker had prefetched come back after this many seconds, found by a sweep every
    # 5 s (kombu's default sweep: every unacked_restore_interval x unacked_restore_throttle = 100 s).
    _app.conf.broker_transport_options = {"visibility_timeout": int(os.environ["FUSION_TEST_VISIBILITY_TIMEOUT"]),
                                          "unacked_restore_interval": 5, "unacked_restore_throttle": 1}

if os.environ.get("FUSION_TEST_PUBLISH_RETRIES"):
    # A hand-over to the Celery broker gives up after this many quick tries (the fusion app rides out about a
    # minute), so a test can break it without a minute-long outage.
    _app.conf.task_publish_retry_policy = {"max_retries": int(os.environ["FUSION_TEST_PUBLISH_RETRIES"]),
                                           "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}


@_app.task(name="tests.ping")
def ping(x):
    """A plain Celery task: proves the broker/backend round trip through a real worker."""
    return {"pong": x, "pid": os.getpid()}


from fusion_celery import Pipeline  # noqa: E402

fanout = Pipeline(
    deps=lambda data: {"sum": {"topic": t("add"), "args": data}, "diff": {"topic": t("subtract"), "args": data}},
    combine=lambda data, results: {"input": data, **results},
    name=t("fanout"),
)


import json  # noqa: E402

from fusion_celery.signals import reactor_result  # noqa: E402


@reactor_result.connect
def _observe(sender=None, task_id=None, message=None, result=None, exception=None, **_):
    """The in-process result hook: record what was produced (read by test_reactor)."""
    r.hset(f"seen:{RUN}", task_id, json.dumps({"topic": message.get("topic"), "result": result,
                                                "error": None if exception is None else str(exception)}))
    r.expire(f"seen:{RUN}", 3600)


from fusion_celery import signals  # noqa: E402


def _note(signal_name: str, key: str | None, **fields) -> None:
    """Keep what a fusion signal said, by the request it concerns (read by test_signals)."""
    if key:
        r.hset(f"signal:{RUN}:{signal_name}", key, json.dumps(fields, default=str))
        r.expire(f"signal:{RUN}:{signal_name}", 3600)


@signals.dependency_sent.connect
def _sent(sender=None, task_id=None, topic=None, return_topic=None, dep=None, run_id=None, **_):
    _note("dependency_sent", task_id, topic=topic, return_topic=return_topic, dep=dep, run_id=run_id)


@signals.wait_completed.connect
def _completed(sender=None, task_id=None, topic=None, dep=None, run_id=None, result=None, runtime=None, **_):
    _note("wait_completed", task_id, topic=topic, dep=dep, run_id=run_id, result=result)


@signals.wait_failed.connect
def _failed(sender=None, task_id=None, topic=None, dep=None, run_id=None, exception=None, **_):
    _note("wait_failed", task_id, topic=topic, dep=dep, run_id=run_id, exception=str(exception))


@signals.wait_timed_out.connect
def _timed_out(sender=None, task_id=None, topic=None, dep=None, run_id=None, exception=None, **_):
    _note("wait_timed_out", task_id, topic=topic, dep=dep, run_id=run_id, exception=str(exception))


@signals.dead_lettered.connect
def _dead_lettered(sender=None, topic=None, dlq=None, partition=None, offset=None, reason=None, **_):
    _note("dead_lettered", f"{topic}[{partition}]@{offset}", dlq=dlq, reason=reason)


@reactor(t("big"))
def big(message):
    """Answers with a string of ``message.data`` characters (for the size limits)."""
    return "x" * int(message.data)


if os.environ.get("FUSION_TEST_MEMPROBE"):
    # Diagnosis aid (not used by the suite): every N seconds the worker's main process appends counts of
    # its gc-tracked Python objects by type, and its biggest containers, to a JSON-lines file.
    import threading as _threading

    from celery.signals import worker_ready as _worker_ready

    @_worker_ready.connect
    def _memprobe(**_kw):
        import collections
        import ctypes
        import gc
        import json
        import sys

        every = float(os.environ.get("FUSION_TEST_MEMPROBE_EVERY", "60"))
        path = os.environ["FUSION_TEST_MEMPROBE"]

        def probe():
            while True:
                time.sleep(every)
                counts: collections.Counter = collections.Counter()
                big = []
                for o in gc.get_objects():
                    t = type(o)
                    counts[f"{getattr(t, '__module__', '?')}.{t.__name__}"] += 1
                    if isinstance(o, (dict, list, set, collections.deque)) and len(o) > 200:
                        big.append([len(o), t.__name__, repr(list(o)[:3] if not isinstance(o, dict)
                                                         else list(o.items())[:3])[:300]])
                big.sort(key=lambda b: -b[0])
                sys._debugmallocstats()  # pymalloc's arenas and blocks, on the process's stderr (fd 2)
                ctypes.CDLL(None).malloc_stats()  # glibc's arenas, likewise
                with open(path, "a") as f:
                    f.write(json.dumps({"t": time.time(), "blocks": sys.getallocatedblocks(),
                                        "types": counts.most_common(150), "big": big[:30]}) + "\n")

        _threading.Thread(target=probe, daemon=True, name="memprobe").start()
