"""Load: pipelines with deps at a steady rate; the worker's memory, open files, live return topics and
Redis keys stay within bounds.

About a minute in ``make test``; 30 minutes with ``make soak`` (``-m soak``).  ``FUSION_SOAK_SECONDS``
and ``FUSION_SOAK_RATE`` (pipelines per second) override the duration and the rate.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
import uuid

import pytest
import redis
from support.reliability import Sampler, long_run, report
from support.waiting import wait_for
from support.workers import isolated_env

from fusion_celery import create_app

pytestmark = pytest.mark.integration


@pytest.mark.timeout(3 * 3600)
@pytest.mark.parametrize("scale", ["short", pytest.param("long", marks=pytest.mark.soak)])
def test_steady_rate_of_pipelines_with_deps(scale, request, kit, worker_factory):
    seconds = float(os.environ.get("FUSION_SOAK_SECONDS") or (1800 if long_run(request) else 60))
    rate = float(os.environ.get("FUSION_SOAK_RATE") or 2.0)
    # seconds the soak worker keeps results, claims, progress and chord counters
    result_expires = 120 if long_run(request) else 20
    prefix = f"fusion.rt.soak{uuid.uuid4().hex[:6]}."
    env = {**isolated_env("kafka", db=12), "FUSION_RETURN_TOPIC_PREFIX": prefix,
           "FUSION_TEST_RESULT_EXPIRES": str(result_expires)}
    run = env["FUSION_TEST_RUN"]
    w = worker_factory(name="soak", env=env, concurrency=2)
    # CELERY_BROKER_URL in the environment (the session's broker) would win over broker_url: the
    # write URL is taken first.  Results are read from Redis directly for the same reason.
    client = create_app("soak-client")
    client.conf.broker_write_url = env["CELERY_BROKER_URL"]
    backend_db = redis.Redis.from_url(env["CELERY_RESULT_BACKEND"])
    broker_db = redis.Redis.from_url(env["CELERY_BROKER_URL"])

    def live_return_topics() -> int:
        """Return topics that are not the worker's lease pool (which it keeps while it runs, bounded)."""
        return len({t for t in kit.topics(prefix) if not t.startswith(f"{prefix}lease.")})

    def extra() -> dict:
        return {"return_topics": live_return_topics(), "leased_topics": len(kit.topics(f"{prefix}lease.")),
                "redis_keys": backend_db.dbsize() + broker_db.dbsize()}

    sampler = Sampler(w.proc.pid, interval=5.0, extra=extra)
    sent: list[tuple[float, int, object]] = []
    done: dict[int, float] = {}
    wrong: list = []
    stop = threading.Event()

    def check_results():
        while not stop.is_set() or len(done) < len(sent):
            pending = [(t0, i, res) for t0, i, res in list(sent) if i not in done]
            raw = backend_db.mget([f"celery-task-meta-{res.id}" for _, _, res in pending]) if pending else []
            for (t0, i, _res), value in zip(pending, raw, strict=True):
                if value is None:
                    continue
                meta = json.loads(value)
                if meta["status"] not in ("SUCCESS", "FAILURE"):
                    continue
                done[i] = time.monotonic() - t0
                if meta["status"] != "SUCCESS" or meta["result"] != i - 1:
                    wrong.append((i, meta["status"], meta["result"]))
            if stop.is_set() and time.monotonic() > drain_deadline:
                return
            time.sleep(0.2)

    drain_deadline = float("inf")
    checker = threading.Thread(target=check_results, daemon=True)
    checker.start()
    sampler.start()
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < seconds:
        due = start + i / rate
        if due > time.monotonic():
            time.sleep(due - time.monotonic())
        res = client.send_task("fusion.pipeline", args=[f"{run}.math", [i, 1]], kwargs={"timeout": 120})
        sent.append((time.monotonic(), i, res))
        i += 1
    stop.set()
    drain_deadline = time.monotonic() + 180
    checker.join(200)
    sampler.stop()
    wait_for(lambda: live_return_topics() == 0, 120, "every return topic of the soak to be deleted")
    final = sampler.sample()
    samples = sampler.samples
    warm = [s for s in samples if s["t"] - start >= min(seconds * 0.25, 120)] or samples
    latencies = sorted(done.values())

    def cpu_ms_per_pipeline(first: dict, last: dict) -> float:
        """Worker CPU (main process and pool children) per pipeline sent between two samples."""
        sent_between = rate * (last["t"] - first["t"])
        return round((last["cpu_s"] - first["cpu_s"]) * 1000 / max(sent_between, 1), 1)

    quarter = max(1, len(warm) // 4)
    cpu_early = cpu_ms_per_pipeline(warm[0], warm[quarter])
    cpu_late = cpu_ms_per_pipeline(warm[-1 - quarter], warm[-1])
    figures = {
        "seconds": seconds, "rate_per_s": rate, "pipelines": len(sent), "answered": len(done), "wrong": len(wrong),
        "latency_s_p50": round(statistics.median(latencies), 2) if latencies else None,
        "latency_s_p99": round(latencies[int(len(latencies) * 0.99) - 1], 2) if latencies else None,
        "rss_mb_after_warmup": round(warm[0]["rss_mb"], 1), "rss_mb_end": round(warm[-1]["rss_mb"], 1),
        "rss_mb_peak": round(max(s["rss_mb"] for s in samples), 1),
        "children_rss_mb_after_warmup": round(warm[0]["children_rss_mb"], 1),
        "children_rss_mb_end": round(warm[-1]["children_rss_mb"], 1),
        "cpu_ms_per_pipeline_early": cpu_early, "cpu_ms_per_pipeline_late": cpu_late,
        "fds_after_warmup": warm[0]["fds"], "fds_max": max(s["fds"] for s in warm), "fds_end": warm[-1]["fds"],
        "threads_max": max(s["threads"] for s in warm),
        "return_topics_max": max(s["return_topics"] for s in samples), "return_topics_after_drain":
            final["return_topics"],
        "redis_keys_after_warmup": warm[0]["redis_keys"], "redis_keys_max": max(s["redis_keys"] for s in warm),
        "redis_keys_end": warm[-1]["redis_keys"], "result_expires_s": result_expires,
    }
    report(request.node.name, figures)
    assert not wrong, f"{len(wrong)} pipelines failed or answered wrongly: {wrong[:5]}"
    assert len(done) == len(sent), f"{len(sent) - len(done)} pipelines never finished: {figures}"
    assert warm[-1]["rss_mb"] - warm[0]["rss_mb"] < (40 if long_run(request) else 25), f"memory grew: {figures}"
    assert max(s["fds"] for s in warm) - warm[0]["fds"] < 30, f"open files grew: {figures}"
    if long_run(request):
        # The worker's CPU per pipeline stays flat: a librdkafka client keeps every topic it touched, and
        # the worker replaces its clients (fusion_kafka_client_recycle_topics).
        assert cpu_late < 1.5 * cpu_early, f"CPU per pipeline grew: {figures}"
    # Every pipeline has three return topics (its own and its two deps'), each alive for about one
    # round trip: the live ones are bounded by the rate times the latency, not by the run's length.
    assert figures["return_topics_max"] <= max(30, 3 * rate * (figures["latency_s_p99"] or 10) * 2), figures
    # Redis keeps each pipeline's results, claims and progress for result_expires, then lets them go:
    # the key count is bounded by what the rate produces in that time, not by the run's length.
    per_pipeline = 40
    assert figures["redis_keys_max"] <= 200 + per_pipeline * rate * (result_expires + 30), figures
