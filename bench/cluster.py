"""``python -m bench.cluster`` (``make bench-cluster``): one Kafka node and a cluster of three, side by side.

For each topology in turn the local stack is started (``stack/stack.sh up`` with ``FUSION_KAFKA_NODES``),
then a child process measures, against one fusion-celery worker (prefork x2) and the bench's dependency
services, with a caller that keeps one reply topic (correlation ids):

1. onedep latency, one request at a time (p50, p99);
2. onedep throughput with 100 requests in flight;
3. failover: one request at a time while the broker that leads the most partitions on the request path
   (the reactor's topic, the registry, the caller's reply topic) is killed with SIGKILL.  On one node it is
   started again at once; on the cluster, after the first answer (it rejoins before the stack stops).
   Reported: seconds from the kill to the first answer after it, to the first answer of a request sent
   after it, the longest gap between two answers, and the requests that failed.

The stack is stopped between the topologies (each keeps its own data) and at the end.  The result goes to
``bench/results/cluster-<run>.json`` and a Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .procs import ROOT

STACK = ["bash", str(ROOT / "stack" / "stack.sh")]


def _say(msg: str) -> None:
    print(f"[bench-cluster {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stack(*args: str, nodes: int | None = None) -> None:
    env = dict(os.environ)
    env.pop("FUSION_KAFKA_BOOTSTRAP_SERVERS", None)
    if nodes is not None:
        env["FUSION_KAFKA_NODES"] = str(nodes)
    subprocess.run([*STACK, *args], env=env, cwd=ROOT, check=True)


def stack_env() -> dict[str, str]:
    from fusion_celery.config import stack_env as read
    return read(ROOT / ".stack" / "env")


# -- the child: measures one topology ----------------------------------------------------------------
def _leaders(servers: str, topics: list[str]) -> dict[int, int]:
    from confluent_kafka.admin import AdminClient
    md = AdminClient({"bootstrap.servers": servers}).list_topics(timeout=10)
    led: dict[int, int] = {}
    for t in topics:
        for p in md.topics[t].partitions.values():
            led[p.leader] = led.get(p.leader, 0) + 1
    return led


def _whole(servers: str, nodes: int) -> bool:
    from confluent_kafka.admin import AdminClient
    try:
        md = AdminClient({"bootstrap.servers": servers}).list_topics(timeout=10)
    except Exception:
        return False
    return len(md.brokers) == nodes and all(len(p.isrs) == len(p.replicas) for t in md.topics.values()
                                            for p in t.partitions.values())


def measure(nodes: int, out: Path, samples: int, window_s: float) -> dict[str, Any]:
    """Everything measured on the running stack of ``nodes`` Kafka nodes."""
    from .common import DATA, SERVICE_NAMES, expected_result, reactor_topic, servers, svc
    from .procs import stack_pid, wait_until
    from .runner import Ctx, Profile, _delete_groups, _flush_redis, start_fusion_worker, start_services
    from .stats import summary

    rid = f"{time.strftime('%m%d%H%M%S')}{uuid.uuid4().hex[:4]}"
    logdir = out / "logs" / f"cluster-{rid}"
    logdir.mkdir(parents=True, exist_ok=True)
    base = os.environ["CELERY_BROKER_URL"].rsplit("/", 1)[0]
    registry = f"fusion.waits.bench-{rid}"
    env = {"BENCH_RUN": rid, "FUSION_IMPORTS": "bench.apps", "CELERY_BROKER_URL": f"{base}/6",
           "CELERY_RESULT_BACKEND": f"{base}/7", "FUSION_REGISTRY_URL": f"kafka://{registry}",
           "FUSION_REPLY_ALLOWLIST": r"bench\..*", "FUSION_KAFKA_BOOTSTRAP_SERVERS": servers(),
           "FUSION_KAFKA_RETRY_TIMEOUT": "180"}
    os.environ.update(env)
    _flush_redis(base)
    from fusion_celery import app

    from .clients import CorrelationCaller, closed_loop
    from .topics import Topics

    topics = Topics(servers())
    reactor = reactor_topic("onedep")
    topics.create([svc(n) for n in SERVICE_NAMES] + [f"bench.{rid}.ctl"], 1)
    topics.create([reactor, f"{reactor}.dlq"], 3)
    ctx = Ctx(Profile(), rid, logdir, env)
    result: dict[str, Any] = {"nodes": nodes, "run": rid}
    corr = None
    try:
        start_services(ctx)
        start_fusion_worker(ctx, app)
        corr = CorrelationCaller(servers(), f"bench.{rid}.replies")
        expected = expected_result("onedep")
        for _ in range(20):
            value, _t = corr.call(reactor, DATA, timeout=60)
            assert value == expected, value
        _say(f"{nodes} node(s): latency, {samples} calls")
        lat = [corr.call(reactor, DATA, timeout=60)[1] for _ in range(samples)]
        result["latency"] = summary(lat)
        _say(f"{nodes} node(s): throughput, 100 in flight for {window_s:.0f}s")
        res = closed_loop(corr, reactor, DATA, 100, window_s=window_s, warmup_completions=100, warmup_timeout=120,
                          drain_timeout=120)
        result["throughput"] = {"rps": round(res.rps, 1), "completed": res.completed, "failed": res.failed,
                                "lost": res.lost, **summary(res.latencies)}
        result["failover"] = failover(nodes, corr, reactor, [reactor, registry, corr.reply_topic], stack_pid,
                                      wait_until)
    finally:
        if corr is not None:
            corr.close()
        for name in list(ctx.procs):
            try:
                ctx.procs.pop(name).stop()
            except Exception as exc:
                _say(f"note: stopping {name}: {exc}")
        try:
            topics.delete(topics.names(f"bench.{rid}.") | {registry})
        except Exception as exc:
            _say(f"note: deleting the run's topics: {exc}")
        _delete_groups(rid)
        _flush_redis(base)
    return result


def failover(nodes: int, corr: Any, reactor: str, path_topics: list[str], stack_pid: Any,
             wait_until: Any) -> dict[str, Any]:
    """One request at a time while the busiest leader of ``path_topics`` is killed; see the module docstring."""
    from .common import DATA, servers
    led = _leaders(servers(), path_topics)
    victim = max(led, key=lambda n: led[n])
    service = "kafka" if victim == 1 else f"kafka-{victim}"
    done: list[tuple[float, float, bool]] = []  # (sent, answered, ok), epoch seconds
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            sent = time.time()
            try:
                corr.call(reactor, DATA, timeout=180)
                done.append((sent, time.time(), True))
            except Exception:
                done.append((sent, time.time(), False))

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    time.sleep(5)  # answers flowing before the kill: a fixed lead-in, not a wait for a condition
    pid = stack_pid(service)
    _say(f"{nodes} node(s): kill -9 {service} (pid {pid}, leads {led[victim]} of the path's partitions)")
    os.kill(pid, 9)
    killed = time.time()
    import psutil

    def gone() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_until(gone, 30, f"{service} (pid {pid}) to die", interval=0.05)
    restart_s = None
    if nodes == 1:
        t0 = time.monotonic()
        stack("start", service, nodes=nodes)
        restart_s = round(time.monotonic() - t0, 1)
    wait_until(lambda: any(s > killed and ok for s, _a, ok in done), 300, "an answer to a request sent after the kill",
               interval=0.2)
    time.sleep(5)
    stop.set()
    t.join(200)
    if nodes > 1:
        t0 = time.monotonic()
        stack("start", service, nodes=nodes)
        wait_until(lambda: _whole(servers(), nodes), 180, "the cluster to be whole again", interval=0.5)
        restart_s = round(time.monotonic() - t0, 1)
    answers = sorted(a for _s, a, ok in done if ok)
    gaps = [b - a for a, b in zip(answers, answers[1:], strict=False)]
    return {"victim": service, "partitions_led": led[victim],
            "first_answer_after_kill_s": round(min(a for a in answers if a > killed) - killed, 2),
            "first_new_request_answered_s": round(min(a for s, a, ok in done if ok and s > killed) - killed, 2),
            "longest_gap_s": round(max(gaps), 2), "failed": sum(1 for *_x, ok in done if not ok),
            "answered": len(answers), "restart_s": restart_s}


# -- the parent: one topology after the other ----------------------------------------------------------
def table(rows: list[dict[str, Any]]) -> str:
    out = ["| Kafka | onedep p50 | onedep p99 | req/s at 100 in flight | kill -9 of the busiest leader: first answer "
           "after | first answer to a new request | longest gap | failed |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lat, thr, f = r["latency"], r["throughput"], r["failover"]
        out.append(f"| {r['nodes']} node(s) | {lat['p50_ms']:.1f} ms | {lat['p99_ms']:.1f} ms | {thr['rps']:.1f} | "
                   f"{f['first_answer_after_kill_s']:.1f} s | {f['first_new_request_answered_s']:.1f} s | "
                   f"{f['longest_gap_s']:.1f} s | {f['failed']} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--samples", type=int, default=300, help="latency: sequential calls")
    ap.add_argument("--window", type=float, default=15.0, help="throughput: seconds measured")
    ap.add_argument("--measure", type=int, help=argparse.SUPPRESS)  # the child: measure this topology
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.measure:
        res = measure(args.measure, args.out, args.samples, args.window)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    run = f"{time.strftime('%m%d%H%M%S')}{uuid.uuid4().hex[:4]}"
    rows, started = [], time.time()
    stack("down")
    try:
        for nodes in (1, 3):
            _say(f"starting the stack with {nodes} Kafka node(s)")
            stack("up", nodes=nodes)
            env = {**os.environ, **stack_env(), "PYTHONPATH": str(ROOT)}
            proc = subprocess.Popen([sys.executable, "-m", "bench.cluster", "--measure", str(nodes), "--out",
                                     str(args.out), "--samples", str(args.samples), "--window", str(args.window)],
                                    env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
            found = []
            for line in proc.stdout:  # the child's progress as it goes; its result is the line RESULT <json>
                if line.startswith("RESULT "):
                    found.append(line[7:])
                else:
                    sys.stdout.write(line)
                    sys.stdout.flush()
            if proc.wait() != 0 or not found:
                raise SystemExit(f"measuring {nodes} node(s) failed ({proc.returncode})")
            rows.append(json.loads(found[0]))
            stack("down")
    finally:
        stack("down")
    result = {"run": run, "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
              "duration_s": round(time.time() - started, 1), "topologies": rows}
    path = args.out / f"cluster-{run}.json"
    path.write_text(json.dumps(result, indent=1))
    print()
    print(table(rows))
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
