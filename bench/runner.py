"""The benchmark run: start the processes, measure every section side by side, clean up, report.

Sections (see docs/benchmarks.md for what each figure means):

1. latency -- round trips of the four shapes in each reply channel (leased, shared,
   ephemeral, ephemeral with a return-topic pool), over Kafka and through ``Pipeline``, next
   to the baselines (ephemeral-topic floor, long-lived reply topic, consumer-per-wait design,
   plain Celery), in interleaved rounds;
2. throughput -- completions per second with N requests in flight: fusion-celery in each
   reply channel, leased on two workers, the consumer-per-wait design and plain Celery, with
   the return topics created per request;
3. waiting -- memory and CPU of one worker holding N pending waits, vs the consumer-per-wait
   design;
4. churn -- return topics created and deleted per second, peak alive (sampled throughout);
5. leftovers -- return topics left after every section (must be zero);
6. brokers -- onedep latency and throughput at 100 in flight with Redis and with RabbitMQ as the Celery
   broker (:mod:`bench.brokers`).
"""

from __future__ import annotations

import gc
import os
import platform
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .brokers import section_brokers
from .common import (
    CHANNELS,
    DATA,
    POOL_PREFIX,
    POOL_SIZE,
    RETURN_PREFIX,
    SERVICE_NAMES,
    SHAPES,
    clj_topic,
    expected_result,
    reactor_topic,
    servers,
    svc,
)
from .procs import ROOT, Proc, Usage, stack_pid, wait_until
from .stats import summary

__all__ = ["FULL", "SMOKE", "Profile", "run"]


@dataclass
class Profile:
    """How much to measure."""

    name: str = "full"
    rounds: int = 3                 # interleaved repetitions of the latency scenarios
    samples: int = 7                # timed calls per scenario per round
    warmup: int = 3                 # untimed calls per scenario before the first round
    scenario_budget_s: float = 8.0  # per scenario per round; slower ones take fewer samples (at least 3)
    levels: tuple[int, ...] = (1, 10, 100, 1000)
    window_s: float = 5.0
    warmup_completions_max: int = 50
    waiting_levels: tuple[int, ...] = (100, 1000, 5000)
    cpu_window_s: float = 5.0
    waiting_warmup: int = 400       # calls a fresh worker serves before its baseline is measured
    park_timeout_s: float = 300.0   # to park one level's waits
    clj_park_timeout_s: float = 150.0
    waiting_concurrency: int = 4    # pool of the worker that parks the waits (parking is bound by topic creation)
    waiting_topic_pool: int = 64    # and its lease pool's batch, so that 5,000 waits park within the time budget
    pool: str = "prefork"
    concurrency: int = 2
    sections: tuple[str, ...] = ("latency", "throughput", "waiting", "brokers")
    brokers: tuple[str, ...] = ("redis", "rabbitmq")  # section brokers: the Celery brokers compared


FULL = Profile()
SMOKE = Profile(name="smoke", rounds=1, samples=2, warmup=1, scenario_budget_s=10.0, levels=(1, 4), window_s=1.5,
                warmup_completions_max=2, waiting_levels=(5,), cpu_window_s=0.5, waiting_warmup=5, park_timeout_s=60.0,
                clj_park_timeout_s=60.0, waiting_topic_pool=4, sections=("latency", "throughput", "waiting"))


@dataclass
class Ctx:
    profile: Profile
    run: str
    logdir: Path
    env: dict[str, str]
    procs: dict[str, Proc] = field(default_factory=dict)
    leftovers: list[dict[str, Any]] = field(default_factory=list)
    before: set[str] = field(default_factory=set)  # return topics that existed before the run (not ours)
    log: Callable[[str], None] = print


def _say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- processes ---------------------------------------------------------------------------------------
def start_services(ctx: Ctx) -> Proc:
    p = Proc.python("services", "bench.service", [], ctx.env, ctx.logdir)
    p.cmd += ["--status", p.status_path]
    p.start()
    from .common import read_status
    wait_until(lambda: (p.check(), read_status(p.status_path).get("assigned", 0) >= len(SERVICE_NAMES) + 1)[1],
               60, "the dependency services to get their partitions")
    ctx.procs["services"] = p
    return p


def start_fusion_worker(ctx: Ctx, app: Any, tag: str = "fusion", concurrency: int | None = None,
                        env: dict[str, str] | None = None) -> Proc:
    """Start a fusion-celery worker serving ``bench.apps``; wait until it answers remote control.

    With ``env`` (another variant on its own Redis databases, which the bench's own app cannot reach),
    wait instead until its ``nodeps`` reactor answers a call over Kafka.
    """
    name = f"bench-{tag}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
    prof = ctx.profile
    p = Proc(tag, [os.sys.executable, "-m", "celery", "-A", "fusion_celery", "worker", "-n", name, "-P", prof.pool,
                   "-c", str(concurrency or prof.concurrency), "-l", os.environ.get("BENCH_WORKER_LOG", "warning"),
                   "--without-mingle", "--without-gossip"],
             env or ctx.env, ctx.logdir)
    p.worker_name = name  # type: ignore[attr-defined]
    p.start()

    def ready() -> bool:
        p.check()
        if env is None:
            return bool(_fusion_status(app, name, 1.0).get("running"))
        from .clients import EphemeralCaller
        caller = EphemeralCaller(servers(), tag="bench")
        try:
            caller.call(reactor_topic("nodeps", variant=env["BENCH_VARIANT"]), DATA, timeout=5)
            return True
        except Exception:
            return False
        finally:
            caller.close()

    wait_until(ready, 90, f"fusion worker {name} to serve", interval=0.5)
    ctx.procs[tag] = p
    return p


def _fusion_status(app: Any, name: str, timeout: float) -> dict[str, Any]:
    """The ``fusion_status`` remote-control answer of worker ``name`` (empty if it did not answer)."""
    for reply in app.control.broadcast("fusion_status", destination=[name], reply=True, timeout=timeout) or []:
        if name in reply:
            return reply[name]
    return {}


def fusion_pending(app: Any, p: Proc) -> int:
    return int(_fusion_status(app, p.worker_name, 2.0).get("pending", -1))  # type: ignore[attr-defined]


def start_plain_worker(ctx: Ctx, plain_app: Any) -> Proc:
    from .plain import QUEUE
    name = f"bench-plain-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
    prof = ctx.profile
    p = Proc("plain", [os.sys.executable, "-m", "celery", "-A", "bench.plain", "worker", "-n", name, "-Q", QUEUE,
                       "-P", prof.pool, "-c", str(prof.concurrency), "-l", "warning", "--without-mingle",
                       "--without-gossip"], ctx.env, ctx.logdir)
    p.start()
    wait_until(lambda: (p.check(), plain_app.control.ping(destination=[name], timeout=1.0))[1], 90,
               f"plain Celery worker {name}", interval=0.5)
    ctx.procs["plain"] = p
    return p


def start_clj(ctx: Ctx, threads: int) -> Proc:
    p = Proc.python("clj", "bench.clj", ["--threads", str(threads)], ctx.env, ctx.logdir)
    p.cmd += ["--status", p.status_path]
    p.start()
    from .common import read_status
    wait_until(lambda: (p.check(), "received" in read_status(p.status_path))[1], 60,
               "the consumer-per-wait reactor to start")
    ctx.procs["clj"] = p
    return p


def stop(ctx: Ctx, name: str) -> None:
    p = ctx.procs.pop(name, None)
    if p is not None:
        p.stop(60)


# -- measuring helpers --------------------------------------------------------------------------------
#: Return topics a running worker keeps (its return-topic pool, its lease pool, the shared reply topics): not
#: leftovers while it runs; the lease pools' and return-topic pools' must be gone once the workers stopped.
HELD = (POOL_PREFIX, f"{RETURN_PREFIX}lease.", f"{RETURN_PREFIX}shared.")

def leftovers(ctx: Ctx, topics: Any, section: str, timeout: float = 60.0) -> dict[str, Any]:
    # The pooled worker's ready topics are not leftovers while it runs (they must be gone once it stopped).
    found = {"section": section, **topics.wait_no_return_topics(timeout, ignore=ctx.before, ignore_prefix=HELD)}
    ctx.leftovers.append(found)
    _say(f"return topics left after {section}: {found['left']}"
         + (f" (zero after {found['seconds_to_zero']}s)" if found["left"] == 0 else ""))
    return found


def cpu_and_memory(usage: Usage, window_s: float, broker: Usage | None) -> dict[str, Any]:
    """Memory now, and CPU (percent of one core) of the process tree and of the broker over ``window_s``."""
    mem = usage.memory()
    c0, b0, t0 = usage.cpu_seconds(), broker.cpu_seconds() if broker else 0.0, time.monotonic()
    time.sleep(window_s)
    c1, b1, t1 = usage.cpu_seconds(), broker.cpu_seconds() if broker else 0.0, time.monotonic()
    out = {**{k: round(v, 1) for k, v in mem.items()}, "cpu_pct": round(100 * (c1 - c0) / (t1 - t0), 1)}
    if broker is not None:
        out["broker_cpu_pct"] = round(100 * (b1 - b0) / (t1 - t0), 1)
        out["broker_rss_mib"] = round(broker.memory()["main_mib"], 1)
    return out


def machine_info() -> dict[str, Any]:
    import celery
    import confluent_kafka
    import psutil
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    kafka_version = "unknown"
    cache = Path(os.environ.get("FUSION_STACK_CACHE", Path.home() / ".cache" / "fusion-celery"))
    pom = ROOT / "stack" / "kafka-pom.xml"
    try:
        import re
        m = re.search(r"<kafka.version>\s*([^<\s]+)\s*</kafka.version>", pom.read_text())
        kafka_version = m.group(1) if m else kafka_version
    except OSError:
        pass
    redis_version = "unknown"
    try:
        import redis
        redis_version = redis.Redis.from_url(os.environ["CELERY_BROKER_URL"]).info()["redis_version"]
    except Exception:
        pass
    return {"hostname": socket.gethostname(), "nproc": os.cpu_count(), "cpu_model": cpu,
            "memory_gib": round(psutil.virtual_memory().total / 2 ** 30, 1), "kernel": platform.release(),
            "python": platform.python_version(), "celery": celery.__version__,
            "confluent_kafka": confluent_kafka.version()[0], "librdkafka": confluent_kafka.libversion()[0],
            "kafka": kafka_version, "redis": redis_version, "stack_cache": str(cache)}


# -- section 1: latency ------------------------------------------------------------------------------
def section_latency(ctx: Ctx, app: Any, plain_app: Any) -> dict[str, Any]:
    from fusion_celery import Pipeline

    from .clients import CorrelationCaller, EphemeralCaller
    from .plain import canvas

    prof = ctx.profile
    floor = EphemeralCaller(servers(), tag="floor")
    caller = EphemeralCaller(servers(), tag="bench")
    corr = CorrelationCaller(servers(), f"bench.{ctx.run}.replies.latency")
    creates: list[float] = []

    def eph(c: EphemeralCaller, topic: str, keep_create: bool = False) -> Callable[[], tuple[Any, float]]:
        def call() -> tuple[Any, float]:
            value, t = c.call(topic, DATA, timeout=60)
            if keep_create:
                creates.append(t["create"])
            return value, t["total"]
        return call

    def pipe(topic: str) -> Callable[[], tuple[Any, float]]:
        p = Pipeline(topic, app=app)

        def call() -> tuple[Any, float]:
            t0 = time.perf_counter()
            value = p.delay(DATA, timeout=60).get(timeout=90)
            return value, time.perf_counter() - t0
        return call

    def plain(shape: str) -> Callable[[], tuple[Any, float]]:
        def call() -> tuple[Any, float]:
            t0 = time.perf_counter()
            canvas(shape).apply_async().get(timeout=60)
            return None, time.perf_counter() - t0
        return call

    def corr_call(topic: str | None = None) -> Callable[[], tuple[Any, float]]:
        return lambda: corr.call(topic or svc("echo"), DATA, timeout=60)

    # (key, group, shape, path, call, expected or None)
    scenarios: list[tuple[str, str, str, str, Callable[[], tuple[Any, float]], Any]] = [
        ("floor.ephemeral", "baseline", "one request", "raw Kafka, return topic per request",
         eph(floor, svc("echo"), keep_create=True), DATA),
        ("floor.correlation", "baseline", "one request", "raw Kafka, one reply topic + correlation ids",
         corr_call(), DATA),
    ]
    for shape in SHAPES:
        exp = expected_result(shape)
        scenarios += [
            (f"fusion.kafka.{shape}", "fusion-celery", shape, "over Kafka, leased reply channel (default)",
             eph(caller, reactor_topic(shape)), exp),
            (f"fusion-shared.kafka.{shape}", "fusion-celery", shape, "over Kafka, shared reply channel",
             eph(caller, reactor_topic(shape, channel="shared")), exp),
            (f"fusion-eph.kafka.{shape}", "fusion-celery", shape, "over Kafka, ephemeral (topic per request)",
             eph(caller, reactor_topic(shape, channel="ephemeral")), exp),
            (f"fusion.pipeline.{shape}", "fusion-celery", shape, "Pipeline.delay().get(), leased",
             pipe(reactor_topic(shape)), exp),
            (f"fusion.corr.{shape}", "fusion-celery", shape,
             "over Kafka, leased; the caller keeps one reply topic (correlation ids)", corr_call(reactor_topic(shape)),
             exp),
            (f"fusion-shared.corr.{shape}", "fusion-celery", shape,
             "over Kafka, shared; the caller keeps one reply topic (correlation ids)",
             corr_call(reactor_topic(shape, channel="shared")), exp),
            (f"clj.{shape}", "baseline", shape, "consumer per wait (fusion-clj design)",
             eph(caller, clj_topic(shape)), exp),
            (f"celery.{shape}", "baseline", shape, "plain Celery chord, no Kafka", plain(shape), None),
        ]
        if shape != "nodeps" and "fusion-pool" in ctx.procs:  # nodeps creates no return topic
            scenarios.append((f"fusion-pool.kafka.{shape}", "fusion-celery + pool", shape,
                              f"over Kafka, ephemeral with a return-topic pool of {POOL_SIZE}",
                              eph(caller, reactor_topic(shape, variant="pool")), exp))

    samples: dict[str, list[float]] = {s[0]: [] for s in scenarios}
    round_p50: dict[str, list[float]] = {s[0]: [] for s in scenarios}
    errors: dict[str, str] = {}
    _say(f"latency: warm-up ({prof.warmup} calls per scenario, answers checked)")
    for key, _g, _shape, _path, call, exp in scenarios:
        for _ in range(prof.warmup):
            try:
                value, _t = call()
            except Exception as exc:
                errors[key] = f"{type(exc).__name__}: {exc}"
                break
            if exp is not None and value != exp:
                raise AssertionError(f"{key}: wrong answer {value!r}, expected {exp!r}")
    creates.clear()
    for r in range(prof.rounds):
        _say(f"latency: round {r + 1} of {prof.rounds}")
        for key, _g, _shape, _path, call, _exp in scenarios:
            if key in errors:
                continue
            t_start, got = time.monotonic(), []
            for i in range(prof.samples):
                try:
                    _v, t = call()
                except Exception as exc:
                    errors[key] = f"{type(exc).__name__}: {exc}"
                    break
                got.append(t)
                if i >= 2 and time.monotonic() - t_start > prof.scenario_budget_s:
                    break
            samples[key] += got
            if got:
                round_p50[key].append(round(summary(got)["p50_ms"], 2))
    floor.close()
    caller.close()
    corr.close()
    rows = []
    for key, group, shape, path, _call, _exp in scenarios:
        rows.append({"key": key, "group": group, "shape": shape, "path": path, **summary(samples[key]),
                     "round_p50_ms": round_p50[key], **({"error": errors[key]} if key in errors else {})})
    return {"rows": rows, "floor_create_topic": summary(creates)}


# -- section 2: throughput ---------------------------------------------------------------------------
def _per_request(window: dict[str, Any], requests: int) -> float | None:
    """Return topics fusion-celery created per request during a churn window (all its owners): in the
    measuring window (steady state), or over warm-up, window and drain (``..._all``: pools growing too)."""
    created = sum(o["created"] for name, o in window["by_owner"].items() if name.startswith("fusion"))
    return round(created / requests, 4) if requests else None


def _steady_window(churn: Any, into: dict[str, Any], label: str) -> tuple[Callable[[], None], Callable[[], None]]:
    """Callbacks that open and close a churn window over a loop's measuring window (``into["c"]``: its counts)."""
    return (lambda: into.update(w=churn.open(label)), lambda: into.update(c=churn.close_window(into["w"])))


def section_throughput(ctx: Ctx, app: Any, plain_app: Any, topics: Any, churn: Any) -> dict[str, Any]:
    from .clients import CorrelationCaller, closed_loop
    from .plain import closed_loop as plain_loop

    prof = ctx.profile
    corr = CorrelationCaller(servers(), f"bench.{ctx.run}.replies.load")
    rows = []
    few = tuple(k for k in prof.levels if k <= 100)
    designs: list[tuple[str, str | None, tuple[int, ...]]] = [
        ("fusion-celery leased", reactor_topic("onedep"), prof.levels),
        ("fusion-celery shared", reactor_topic("onedep", channel="shared"), prof.levels),
        ("fusion-celery ephemeral", reactor_topic("onedep", channel="ephemeral"), few),
        ("consumer-per-wait", clj_topic("onedep"), few),
        ("plain Celery", None, prof.levels),
        ("fusion-celery leased, two workers", reactor_topic("onedep"), prof.levels),
    ]
    for design, topic, levels in designs:
        if design.endswith("two workers"):
            start_fusion_worker(ctx, app, tag="fusion-2")
        survived = True
        for k in levels:
            if not survived:
                rows.append({"design": design, "in_flight": k, "skipped": "did not survive a lower level"})
                continue
            _say(f"throughput: {design}, {k} in flight")
            window = churn.open(f"throughput {design} {k}")
            steady: dict[str, Any] = {}
            kw = {"window_s": prof.window_s, "warmup_completions": min(k, prof.warmup_completions_max),
                  "warmup_timeout": max(60.0, 4 * prof.window_s), "drain_timeout": max(60.0, k * 0.3),
                  "on_window": _steady_window(churn, steady, f"window {design} {k}")}
            res = plain_loop(plain_app, "onedep", k, **kw) if topic is None else closed_loop(corr, topic, DATA, k, **kw)
            w = churn.close_window(window)
            left = leftovers(ctx, topics, f"throughput {design} {k}")
            row = {"design": design, "in_flight": k, "rps": round(res.rps, 1), "completed": res.completed,
                   "failed": res.failed, "window_s": round(res.window_s, 1), "warmup_s": round(res.warmup_s, 1),
                   "drained": res.drained, "lost": res.lost, **summary(res.latencies), "churn": w,
                   "requests": res.total, "topics_created_per_request_all": _per_request(w, res.total),
                   "topics_created_per_request": _per_request(steady["c"], res.completed) if "c" in steady else None,
                   "return_topics_left": left["left"]}
            if res.note:
                row["note"] = res.note
            rows.append(row)
            _say(f"  {res.rps:.1f} req/s, {res.failed} failed, drained={res.drained}, "
                 f"{row['topics_created_per_request']} topics created per request")
            if res.failed > max(1, res.completed // 10) or not res.drained or res.completed == 0:
                survived = False
        if design.endswith("two workers"):
            stop(ctx, "fusion-2")
    corr.close()
    return {"rows": rows, "request": "onedep reactor over Kafka (reply topic with correlation ids); plain Celery: "
                                     "the same chain of no-op tasks over Redis, each completion pushed to a list"}


# -- section 3: the cost of waiting -----------------------------------------------------------------------
_releaser: Any = None


def _release(ctx: Ctx) -> None:
    """Tell the holding service to answer every request it holds (one producer for the whole run)."""
    global _releaser
    from confluent_kafka import Producer

    from .service import control_topic
    if _releaser is None:
        _releaser = Producer({"bootstrap.servers": servers(), "linger.ms": 0})
    _releaser.produce(control_topic(ctx.run), b"release")
    _releaser.flush(5)


def section_waiting(ctx: Ctx, app: Any, topics: Any, churn: Any) -> dict[str, Any]:
    from fusion_celery import Pipeline

    from .clients import CorrelationCaller
    from .common import read_status

    prof = ctx.profile
    broker_pid = stack_pid("kafka")
    broker = Usage(broker_pid) if broker_pid else None
    services = ctx.procs["services"]
    out: dict[str, Any] = {"fusion-celery": [], "consumer-per-wait": [], "notes": []}

    def held() -> int:
        return int(read_status(services.status_path).get("held", 0))

    # fusion-celery: a fresh worker, so its memory is not what earlier sections left behind.
    stop(ctx, "fusion")
    worker = start_fusion_worker(ctx, app, "fusion", concurrency=prof.waiting_concurrency,
                                 env={**ctx.env, "BENCH_VARIANT": "",
                                      "FUSION_LEASE_POOL_MAX": str(max(prof.waiting_levels) + 100),
                                      "FUSION_LEASE_BATCH": str(prof.waiting_topic_pool)})
    hold = Pipeline(svc("hold"), app=app)
    echo = Pipeline(svc("echo"), app=app)
    # Warm up past the pool children's working-set plateau (they grow ~100 MiB over their first few hundred
    # tasks, whether or not anything waits), so the deltas below are what the waits cost.
    for _ in range(prof.waiting_warmup // 100 or 1):
        for r in [echo.delay(DATA, timeout=60) for _ in range(min(100, prof.waiting_warmup) or 1)]:
            r.get(timeout=120)
    gc.collect()
    time.sleep(1.0)
    churn.paused.set()
    base = cpu_and_memory(worker.usage(), prof.cpu_window_s, broker)
    churn.paused.clear()
    out["fusion-celery"].append({"pending": 0, **base})
    results = []
    window = churn.open("waiting fusion-celery")
    for n in prof.waiting_levels:
        _say(f"waiting: fusion-celery, parking {n} waits")
        t0 = time.monotonic()
        for _ in range(n - len(results)):
            results.append(hold.delay(DATA, timeout=1800))
        try:
            wait_until(lambda n=n: held() >= n, prof.park_timeout_s, f"{n} requests at the holding service", 0.25)
            wait_until(lambda n=n: fusion_pending(app, worker) >= n, 60, f"{n} pending waits in the worker", 0.5)
        except TimeoutError as exc:
            out["notes"].append(f"fusion-celery at {n}: {exc}")
            break
        park_s = time.monotonic() - t0
        time.sleep(1.0)
        churn.paused.set()
        m = cpu_and_memory(worker.usage(), prof.cpu_window_s, broker)
        churn.paused.clear()
        row = {"pending": n, **m, "park_s": round(park_s, 1),
               "per_wait_kib": round((m["total_mib"] - base["total_mib"]) * 1024 / n, 1),
               "per_wait_main_kib": round((m["main_mib"] - base["main_mib"]) * 1024 / n, 1)}
        out["fusion-celery"].append(row)
        _say(f"  {m['total_mib']:.0f} MiB ({row['per_wait_kib']} KiB per wait), cpu {m['cpu_pct']}%, "
             f"broker cpu {m.get('broker_cpu_pct')}%")
    t0 = time.monotonic()
    total = len(results)

    def all_done() -> bool:
        _release(ctx)  # again and again: requests still on their way when a level timed out are held later
        return all(r.ready() for r in results)

    try:
        wait_until(all_done, max(120.0, total * 0.1), "every held pipeline to finish", 1.0)
        bad = sum(1 for r in results if r.failed())
        secs = time.monotonic() - t0
        out["fusion_release"] = {"waits": total, "seconds": round(secs, 1), "per_s": round(total / max(1e-9, secs), 1),
                                 "failed": bad, "memory_after": {k: round(v, 1) for k, v in
                                                                 worker.usage().memory().items()}}
    except TimeoutError as exc:
        out["notes"].append(str(exc))
    results.clear()
    gc.collect()
    out["churn_fusion"] = churn.close_window(window)
    leftovers(ctx, topics, "waiting fusion-celery", timeout=max(60.0, total * 0.05))

    # consumer per wait: a fresh process too, as many threads as waits.
    stop(ctx, "clj")
    clj = start_clj(ctx, threads=max(prof.waiting_levels) + 10)
    corr = CorrelationCaller(servers(), f"bench.{ctx.run}.replies.hold")
    echo_v, _ = corr.call(clj_topic("onedep"), DATA, timeout=60)
    time.sleep(1.0)
    churn.paused.set()
    cbase = cpu_and_memory(clj.usage(), prof.cpu_window_s, broker)
    churn.paused.clear()
    out["consumer-per-wait"].append({"pending": 0, **cbase, "tcp_connections": clj.usage().connections()})
    sent = 0
    window = churn.open("waiting consumer-per-wait")
    per_conn = None
    import psutil
    for n in prof.waiting_levels:
        if per_conn is not None and broker_pid:
            limit = psutil.Process(broker_pid).rlimit(psutil.RLIMIT_NOFILE)[0]
            need = psutil.Process(broker_pid).num_fds() + per_conn * (n - sent)
            # Well below the limit: near it the broker stalls for everyone (seen at 16,000 of 20,000),
            # the consumer-per-wait process dies, and the run's other figures suffer.
            if need > 0.6 * limit:
                out["notes"].append(f"consumer-per-wait at {n}: not attempted: it would need about {int(need)} "
                                    f"open files in the broker (its limit is {limit})")
                break
        _say(f"waiting: consumer-per-wait, parking {n} waits")
        t0 = time.monotonic()
        for _ in range(n - sent):
            corr.submit(clj_topic("hold"), DATA)
        sent = n

        def parked(n: int = n) -> bool:
            clj.check()
            return int(read_status(clj.status_path).get("waiting", 0)) >= n

        try:
            wait_until(parked, prof.clj_park_timeout_s, f"{n} consumer-per-wait waits", 0.25)
        except (TimeoutError, RuntimeError, psutil.Error) as exc:  # stalled, or died (psutil: no such process)
            if clj.alive():  # stalled, not dead: stop it before it takes the machine down with it
                clj.proc.kill()
                clj.proc.wait(30)
            from .topics import owner_of
            leaked = {t for t in topics.return_topics() - ctx.before if owner_of(t) == "clj"}
            out["notes"].append(f"consumer-per-wait: stopped; it left {len(leaked)} return topics, which the "
                                f"harness deleted (a consumer-per-wait process that dies leaks its topics)")
            topics.delete(leaked)
            st = read_status(clj.status_path)
            out["notes"].append(f"consumer-per-wait did not reach {n} waits: {st.get('waiting')} parked within "
                                f"{prof.clj_park_timeout_s:.0f}s ({str(exc)[:300]}); last error: "
                                f"{st.get('last_error')}")
            out["consumer-per-wait"].append({"pending": n, "survived": False, "parked": st.get("waiting"),
                                             "alive": clj.alive(),
                                             **(clj.usage().memory() if clj.alive() else {})})
            break
        park_s = time.monotonic() - t0
        time.sleep(1.0)
        churn.paused.set()
        m = cpu_and_memory(clj.usage(), prof.cpu_window_s, broker)
        churn.paused.clear()
        conns = clj.usage().connections()
        per_conn = max(1.0, conns / n)
        row = {"pending": n, **m, "park_s": round(park_s, 1), "tcp_connections": conns,
               "per_wait_kib": round((m["total_mib"] - cbase["total_mib"]) * 1024 / n, 1), "survived": True}
        out["consumer-per-wait"].append(row)
        _say(f"  {m['total_mib']:.0f} MiB ({row['per_wait_kib']} KiB per wait), {m['threads']} threads, "
             f"cpu {m['cpu_pct']}%, broker cpu {m.get('broker_cpu_pct')}%")
    t0 = time.monotonic()

    def all_replied() -> bool:
        _release(ctx)
        return corr.outstanding() == 0 or not clj.alive()  # a dead process answers no more

    try:
        wait_until(all_replied, max(120.0, sent * 0.1), "every consumer-per-wait reply", 1.0)
        out["clj_release"] = {"waits": sent, "seconds": round(time.monotonic() - t0, 1),
                              "memory_after": {k: round(v, 1) for k, v in clj.usage().memory().items()}}
    except TimeoutError as exc:
        out["notes"].append(f"consumer-per-wait release: {exc}")
        corr.forget_all()
    corr.close()

    def settled() -> bool:
        st = read_status(clj.status_path)
        return not clj.alive() or (st.get("waiting") == 0 and st.get("topics_deleted") == st.get("topics_created"))

    try:  # its threads close their consumers, then delete their topics
        wait_until(settled, max(60.0, sent * 0.1), "the consumer-per-wait reactor to delete its topics", 0.5)
    except TimeoutError as exc:
        out["notes"].append(f"consumer-per-wait: {exc}")
    out["churn_clj"] = churn.close_window(window)
    stop(ctx, "clj")  # its waits are gone with it; its topics are what it leaves
    leftovers(ctx, topics, "waiting consumer-per-wait", timeout=max(60.0, sent * 0.05))
    return out


# -- targets ---------------------------------------------------------------------------------------------
def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    lat = {r["key"]: r for r in result.get("latency", {}).get("rows", [])}
    celery = lat.get("celery.onedep", {}).get("p50_ms")
    # The callers that keep one reply topic: a caller that creates a topic per call adds its own creation.
    for key, label in (("fusion.corr.onedep", "leased"), ("fusion-shared.corr.onedep", "shared")):
        p50 = lat.get(key, {}).get("p50_ms")
        if p50 and celery:
            ratio = p50 / celery
            out.append({"target": f"onedep p50 with {label} within 3x the plain Celery chord of the same DAG",
                        "value": f"{ratio:.2f}x ({p50:.1f} vs {celery:.1f} ms)", "ratio": round(ratio, 2),
                        "met": ratio <= 3.0})
    tp = {(r["design"], r["in_flight"]): r for r in result.get("throughput", {}).get("rows", [])}
    clj, plain = tp.get(("consumer-per-wait", 100), {}), tp.get(("plain Celery", 100), {})
    for design in ("fusion-celery leased", "fusion-celery shared", "fusion-celery leased, two workers"):
        f = tp.get((design, 100), {})
        if not f.get("rps"):
            continue
        if clj.get("rps"):
            ratio = f["rps"] / clj["rps"]
            out.append({"target": f"{design}: at 100 in flight, >= 10x the throughput of consumer-per-wait",
                        "value": f"{ratio:.1f}x ({f['rps']} vs {clj['rps']} req/s)", "ratio": round(ratio, 2),
                        "met": ratio >= 10.0})
        if plain.get("rps"):
            ratio = f["rps"] / plain["rps"]
            out.append({"target": f"{design}: at 100 in flight, >= 0.5x plain Celery's throughput",
                        "value": f"{ratio:.2f}x ({f['rps']} vs {plain['rps']} req/s)", "ratio": round(ratio, 2),
                        "met": ratio >= 0.5})
        per = f.get("topics_created_per_request")
        if per is not None and "two workers" not in design:
            out.append({"target": f"{design}: fewer than 0.01 return topics created per request at 100 in flight",
                        "value": f"{per}", "ratio": per, "met": per < 0.01})
    w = result.get("waiting", {})
    fus = {r["pending"]: r for r in w.get("fusion-celery", []) if r.get("pending")}
    clj = {r["pending"]: r for r in w.get("consumer-per-wait", []) if r.get("pending") and r.get("survived")}
    common = sorted(set(fus) & set(clj))
    if common:
        n = common[-1]
        fm, ft, ck = fus[n]["per_wait_main_kib"], fus[n]["per_wait_kib"], clj[n]["per_wait_kib"]
        ratio = ck / fm if fm > 0 else float("inf")
        total_ratio = ck / ft if ft > 0 else float("inf")
        out.append({"target": ">= 20x less memory per pending wait than consumer-per-wait",
                    "value": f"{ratio:.0f}x at {n} waits in the process that holds them ({fm} vs {ck} KiB); "
                             f"{total_ratio:.0f}x counting the pool children's growth too ({ft} KiB)",
                    "ratio": round(ratio, 1), "ratio_with_children": round(total_ratio, 1), "met": ratio >= 20.0})
    left = result.get("leftovers", [])
    out.append({"target": "zero return topics left after every benchmark run",
                "value": ", ".join(f"{x['section']}: {x['left']}" for x in left) or "not checked",
                "met": bool(left) and all(x["left"] == 0 for x in left)})
    return out


# -- the run ---------------------------------------------------------------------------------------------
def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def run(profile: Profile, out_dir: Path) -> dict[str, Any]:
    """Run every section of ``profile`` against the local stack; return the result (also written as JSON)."""
    started = time.time()
    rid = f"{time.strftime('%m%d%H%M%S')}{uuid.uuid4().hex[:4]}"
    logdir = out_dir / "logs" / rid
    logdir.mkdir(parents=True, exist_ok=True)
    # The Redis of the result backend: the broker of every section but brokers (whatever broker the stack has).
    base = os.environ.get("CELERY_RESULT_BACKEND", "redis://127.0.0.1:6379/1").rsplit("/", 1)[0]
    env = {"BENCH_RUN": rid, "FUSION_IMPORTS": "bench.apps",
           "CELERY_BROKER_URL": f"{base}/6", "CELERY_RESULT_BACKEND": f"{base}/7",
           "FUSION_REGISTRY_URL": f"kafka://fusion.waits.bench-{rid}",
           "FUSION_REPLY_ALLOWLIST": r"bench\..*",
           "FUSION_KAFKA_BOOTSTRAP_SERVERS": servers()}
    os.environ.update(env)  # before fusion_celery reads its settings
    _flush_redis(base)  # databases 6 and 7 belong to the benchmark: start from empty queues
    from fusion_celery import app

    from .plain import app as plain_app
    from .topics import ChurnSampler, Topics

    ctx = Ctx(profile, rid, logdir, env)
    topics = Topics(servers())
    result: dict[str, Any] = {"run": rid, "profile": asdict(profile), "machine": machine_info(),
                              "load_average": {"start": _loadavg()}, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    _say(f"run {rid} ({profile.name}); logs in {logdir}")
    before = ctx.before = topics.return_topics()
    if before:
        result["return_topics_before"] = len(before)
        _say(f"note: {len(before)} return topics existed before this run (not ours; not counted as leftovers)")
    ours = [svc(n) for n in SERVICE_NAMES] + [f"bench.{rid}.ctl"]
    reactors = [reactor_topic(s, variant=v, channel=c) for v in ("", "pool") for c in CHANNELS for s in SHAPES]
    if "brokers" in profile.sections:
        from .brokers import reactor_topics
        reactors += reactor_topics(profile.brokers)
    cljs = [clj_topic(s) for s in [*SHAPES, "hold"]]
    topics.create(ours, 1)
    topics.create(reactors + [f"{t}.dlq" for t in reactors], 3)
    topics.create(cljs, 3)
    churn = ChurnSampler(servers())
    loads: list[list[float]] = []
    try:
        start_services(ctx)
        start_fusion_worker(ctx, app)
        start_fusion_worker(ctx, app, tag="fusion-pool", env=pool_env(env, base, rid))
        start_plain_worker(ctx, plain_app)
        start_clj(ctx, threads=max([*profile.levels, *profile.waiting_levels]) + 10)
        churn.start()
        t_sec = time.monotonic()
        sections = {"latency": lambda: section_latency(ctx, app, plain_app),
                    "throughput": lambda: section_throughput(ctx, app, plain_app, topics, churn),
                    "waiting": lambda: section_waiting(ctx, app, topics, churn),
                    "brokers": lambda: section_brokers(ctx, base, profile.brokers)}
        for name, fn in sections.items():
            if name not in profile.sections:
                continue
            try:
                result[name] = fn()
            except Exception as exc:  # a failed section is reported; the others still run
                import traceback
                _say(f"section {name} FAILED: {type(exc).__name__}: {exc}")
                result.setdefault("errors", {})[name] = traceback.format_exc()[-4000:]
                for pname, proc in list(ctx.procs.items()):
                    if not proc.alive():
                        _say(f"{pname} died; its log: {proc.log_path}")
            loads.append(_loadavg())
            if name == "latency":
                leftovers(ctx, topics, "latency")
        result["section_seconds"] = round(time.monotonic() - t_sec, 1)
    finally:
        for name in list(ctx.procs):  # first of all: no helper process may outlive the run
            try:
                stop(ctx, name)
            except Exception as exc:
                _say(f"note: stopping {name}: {exc}")
        churn.stop()
        try:
            # The shared reply topics are permanent (fusion-celery never deletes them): the run deletes its own.
            shared = {t for t in topics.return_topics() - before if t.startswith(f"{RETURN_PREFIX}shared.")}
            result["shared_reply_topics"] = len(shared)
            topics.delete(shared)
            topics.wait_no_return_topics(30, ignore=before)
            final_ours = topics.return_topics() - before
            ctx.leftovers.append({"section": "end of run", "left": len(final_ours),
                                  "examples": sorted(final_ours)[:5]})
            if final_ours:
                topics.delete(final_ours)
            registries = {f"fusion.waits.bench-{rid}", f"fusion.waits.bench-{rid}-pool",
                          *(f"fusion.waits.bench-{rid}-broker-{b}" for b in profile.brokers)}
            topics.delete(topics.names(f"bench.{rid}.") | registries)
        except Exception as exc:
            _say(f"note: deleting the run's topics: {exc}")
        _delete_groups(rid)
        _flush_redis(base)
    result["leftovers"] = ctx.leftovers
    result["churn"] = {"peak_alive": churn.peak_all, "samples": churn.samples, "sample_errors": churn.errors,
                       "interval_s": churn.interval}
    result["load_average"]["during"] = loads
    result["load_average"]["end"] = _loadavg()
    result["duration_s"] = round(time.time() - started, 1)
    result["targets"] = targets(result)
    return result


def pooled(env: dict[str, str], size: int, variant: str) -> dict[str, str]:
    """``env`` with ephemeral return topics from a pool of ``size``, under the pool's own prefix (its callers'
    topics allowed)."""
    import json
    return {**env, "BENCH_VARIANT": variant, "FUSION_REPLY_CHANNEL": "ephemeral", "FUSION_RETURN_TOPIC_POOL": str(size),
            "FUSION_RETURN_TOPIC_PREFIX": POOL_PREFIX,
            "FUSION_REPLY_ALLOWLIST": json.dumps([r"bench\..*", r"fusion\.rt\..*"])}


def pool_env(env: dict[str, str], base: str, rid: str) -> dict[str, str]:
    """The environment of the second fusion-celery worker: a return-topic pool, its own reactor topics,
    Redis databases and registry."""
    return {**pooled(env, POOL_SIZE, variant="pool"), "CELERY_BROKER_URL": f"{base}/8",
            "CELERY_RESULT_BACKEND": f"{base}/9", "FUSION_REGISTRY_URL": f"kafka://fusion.waits.bench-{rid}-pool"}


def _delete_groups(rid: str) -> None:
    """Drop the consumer groups of the run (the reactors', the services', the consumer-per-wait reactor's)."""
    from confluent_kafka.admin import AdminClient
    admin = AdminClient({"bootstrap.servers": servers()})
    try:
        groups = [g.group_id for g in admin.list_consumer_groups().result(30).valid
                  if rid in g.group_id]
        if groups:
            for fut in admin.delete_consumer_groups(groups, request_timeout=30).values():
                try:
                    fut.result(60)
                except Exception:
                    pass
    except Exception as exc:
        _say(f"note: could not delete the run's consumer groups: {exc}")


def _flush_redis(base: str) -> None:
    """Empty the Redis databases the run used (6 to 9: the broker queues and results of its two fusion workers;
    10 and 11: those of the brokers section)."""
    import redis
    for db in (6, 7, 8, 9, 10, 11):
        try:
            redis.Redis.from_url(f"{base}/{db}").flushdb()
        except Exception as exc:
            _say(f"note: could not flush redis db {db}: {exc}")
