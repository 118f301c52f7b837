"""Section 6 of the benchmark: the Celery broker, Redis or RabbitMQ, under the same onedep load.

One fusion-celery worker per broker, each on reactor topics of its own (variant ``broker-<name>``) and
the same Redis result backend, answers the onedep reactor (one dependency, a chord) over Kafka: its
round-trip latency one call at a time, in rounds that alternate the brokers, and its throughput with
100 requests in flight.  Everything else (Kafka, the dependency service, the caller) is shared, so the
difference is the broker's.  RabbitMQ's URL comes from the stack (``FUSION_BROKER=rabbitmq``: ``make
bench`` starts it); a broker that does not answer is reported as skipped.
"""

from __future__ import annotations

import os
import time
from typing import Any

from .common import DATA, SHAPES, expected_result, reactor_topic
from .stats import summary

__all__ = ["BROKERS", "broker_urls", "section_brokers", "variant", "worker_env"]

#: The brokers the section compares, in this order.
BROKERS = ("redis", "rabbitmq")

#: The in-flight level of the throughput figure.
IN_FLIGHT = 100


def variant(broker: str) -> str:
    """The reactor-topic variant of the worker on ``broker``."""
    return f"broker-{broker}"


def broker_urls(redis_base: str) -> dict[str, str]:
    """The broker URL of each broker: a Redis database of the benchmark's (10), RabbitMQ's default vhost
    on the stack's port (``CELERY_BROKER_URL`` when it is an AMQP URL, else ``FUSION_RABBITMQ_PORT``)."""
    amqp = os.environ.get("CELERY_BROKER_URL", "")
    if not amqp.startswith("amqp"):
        amqp = f"amqp://guest:guest@127.0.0.1:{os.environ.get('FUSION_RABBITMQ_PORT', '5672')}//"
    return {"redis": f"{redis_base}/10", "rabbitmq": amqp}


def reachable(url: str) -> str | None:
    """None when the broker at ``url`` accepts a connection, else why not."""
    import kombu
    try:
        with kombu.Connection(url, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1)
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def worker_env(env: dict[str, str], broker: str, url: str, redis_base: str, rid: str) -> dict[str, str]:
    """The environment of the worker on ``broker``: its broker, the benchmark's result backend database (11),
    its own reactor topics and registry."""
    return {**env, "BENCH_VARIANT": variant(broker), "CELERY_BROKER_URL": url,
            "CELERY_RESULT_BACKEND": f"{redis_base}/11",
            "FUSION_REGISTRY_URL": f"kafka://fusion.waits.bench-{rid}-{variant(broker)}"}


def reactor_topics(brokers: tuple[str, ...]) -> list[str]:
    """Every reactor topic the workers of ``brokers`` serve (bench.apps makes every shape and channel)."""
    from .common import CHANNELS
    return [reactor_topic(s, variant=variant(b), channel=c) for b in brokers for c in CHANNELS for s in SHAPES]


def section_brokers(ctx: Any, redis_base: str, brokers: tuple[str, ...] = BROKERS) -> dict[str, Any]:
    """Latency (one call at a time) and throughput (:data:`IN_FLIGHT` in flight) of onedep on each broker."""
    from .clients import CorrelationCaller, closed_loop
    from .common import servers
    from .runner import _say, start_fusion_worker, stop

    prof = ctx.profile
    urls = broker_urls(redis_base)
    skipped = {b: why for b in brokers if (why := reachable(urls[b])) is not None}
    live = tuple(b for b in brokers if b not in skipped)
    for b, why in skipped.items():
        _say(f"brokers: {b} skipped ({why})")
    for b in live:
        _say(f"brokers: starting the worker on {b}")
        start_fusion_worker(ctx, None, tag=variant(b), env=worker_env(ctx.env, b, urls[b], redis_base, ctx.run))
    corr = CorrelationCaller(servers(), f"bench.{ctx.run}.replies.brokers")
    topic = {b: reactor_topic("onedep", variant=variant(b)) for b in live}
    expected = expected_result("onedep")
    samples: dict[str, list[float]] = {b: [] for b in live}
    round_p50: dict[str, list[float]] = {b: [] for b in live}
    try:
        for b in live:  # warm-up, answers checked
            for _ in range(prof.warmup):
                value, _t = corr.call(topic[b], DATA, timeout=60)
                if value != expected:
                    raise AssertionError(f"onedep on {b}: wrong answer {value!r}, expected {expected!r}")
        for r in range(prof.rounds):
            _say(f"brokers: latency round {r + 1} of {prof.rounds}")
            for b in live if r % 2 == 0 else reversed(live):
                got = [corr.call(topic[b], DATA, timeout=60)[1] for _ in range(prof.samples)]
                samples[b] += got
                round_p50[b].append(round(summary(got)["p50_ms"], 2))
        throughput: dict[str, dict[str, Any]] = {}
        for b in live:
            _say(f"brokers: throughput on {b}, {IN_FLIGHT} in flight")
            res = closed_loop(corr, topic[b], DATA, IN_FLIGHT, window_s=prof.window_s,
                              warmup_completions=min(IN_FLIGHT, prof.warmup_completions_max),
                              warmup_timeout=max(60.0, 4 * prof.window_s), drain_timeout=max(60.0, IN_FLIGHT * 0.3))
            throughput[b] = {"rps": round(res.rps, 1), "completed": res.completed, "failed": res.failed,
                             "window_s": round(res.window_s, 1), "drained": res.drained, "lost": res.lost,
                             **summary(res.latencies)}
            _say(f"  {res.rps:.1f} req/s, {res.failed} failed, drained={res.drained}")
    finally:
        corr.close()
        for b in live:
            stop(ctx, variant(b))
    rows = [{"broker": b, "url": _sanitized(urls[b]), "latency": {**summary(samples[b]), "round_p50_ms": round_p50[b]},
             "throughput": throughput.get(b, {})} for b in live]
    return {"rows": rows, "skipped": skipped, "in_flight": IN_FLIGHT,
            "request": "onedep reactor over Kafka (one dependency: a chord), caller with one reply topic "
                       "(correlation ids); result backend Redis for both", "measured_at": time.strftime("%H:%M:%S")}


def _sanitized(url: str) -> str:
    from kombu.utils.url import maybe_sanitize_url
    return maybe_sanitize_url(url)


def table_rows(section: dict[str, Any]) -> list[list[Any]]:
    """The section as rows of the report's table."""
    out = []
    for r in section.get("rows", []):
        lat, tp = r["latency"], r["throughput"]
        out.append([r["broker"], lat.get("n", 0), lat.get("p50_ms"), lat.get("p90_ms"), lat.get("p99_ms"),
                    tp.get("rps"), tp.get("p50_ms"), tp.get("p99_ms"), tp.get("failed")])
    for b, why in section.get("skipped", {}).items():
        out.append([b, "skipped", why, "", "", "", "", "", ""])
    return out
