"""``python -m bench.profile``: where a worker's CPU goes on the request path, per reply channel (py-spy).

Starts the dependency services and one fusion-celery worker (prefork x2) serving
:mod:`bench.apps`, keeps ``--in-flight`` ``onedep`` requests running through the reply
channel ``--channel`` (intake -> reactor -> dispatch -> waiter -> completion -> body ->
reply), and samples the worker and its pool children with ``py-spy record
--subprocesses`` (idle threads left out) for ``--seconds``.  Prints the functions with
the most samples: by their own time, and fusion-celery's by the time spent in them
and what they call.  ``docs/benchmarks.md`` keeps the figures.

Run with the stack up (``make up``): ``.venv/bin/python -m bench.profile --channel leased``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

from .common import DATA, SERVICE_NAMES, SHAPES, reactor_topic, servers, svc

__all__ = ["main", "top_frames"]


def top_frames(raw: str, n: int = 15) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """From py-spy's ``raw`` output (``frame;frame;... count`` per line): the samples, the ``n`` frames with
    the most samples of their own, and the ``n`` fusion_celery frames with the most samples in them or below."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        total += k
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        own[_short(frames[-1])] += k
        for f in {_short(f) for f in frames if "fusion_celery/" in f}:
            inclusive[f] += k
    return total, own.most_common(n), inclusive.most_common(n)


def _short(frame: str) -> str:
    """``func (path/to/module.py:123)`` as ``func (module.py)``: one entry per function, not per line."""
    name, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0]
    parts = Path(path).parts
    return f"{name} ({'/'.join(parts[-2:]) if 'fusion_celery' in parts else parts[-1] if parts else path})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channel", default="leased", choices=("leased", "shared", "ephemeral"))
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--in-flight", type=int, default=100)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    if shutil.which("py-spy") is None and not (Path(sys.executable).parent / "py-spy").exists():
        print("py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2

    rid = f"p{time.strftime('%m%d%H%M%S')}{uuid.uuid4().hex[:4]}"
    base = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0").rsplit("/", 1)[0]
    env = {"BENCH_RUN": rid, "FUSION_IMPORTS": "bench.apps", "BENCH_VARIANT": "",
           "CELERY_BROKER_URL": f"{base}/6", "CELERY_RESULT_BACKEND": f"{base}/7",
           "FUSION_REGISTRY_URL": f"kafka://fusion.waits.bench-{rid}", "FUSION_REPLY_ALLOWLIST": r"bench\..*",
           "FUSION_KAFKA_BOOTSTRAP_SERVERS": servers()}
    os.environ.update(env)
    from fusion_celery import app

    from .clients import CorrelationCaller, closed_loop
    from .runner import FULL, Ctx, _delete_groups, _flush_redis, start_fusion_worker, start_services
    from .topics import Topics

    _flush_redis(base)
    logdir = Path(tempfile.mkdtemp(prefix="fusion-profile-"))
    ctx = Ctx(FULL, rid, logdir, env)
    topics = Topics(servers())
    topics.create([svc(s) for s in SERVICE_NAMES] + [f"bench.{rid}.ctl"], 1)
    topic = reactor_topic("onedep", channel=args.channel)
    out = logdir / "profile.txt"
    try:
        start_services(ctx)
        worker = start_fusion_worker(ctx, app)
        corr = CorrelationCaller(servers(), f"bench.{rid}.replies.profile")
        loop = threading.Thread(target=closed_loop, args=(corr, topic, DATA, args.in_flight), kwargs={
            "window_s": args.seconds + 10, "warmup_completions": 200, "warmup_timeout": 60, "drain_timeout": 60},
            daemon=True)
        loop.start()
        time.sleep(5)  # past the warm-up: pools grown, clients connected
        spy = str(Path(sys.executable).parent / "py-spy") if not shutil.which("py-spy") else "py-spy"
        subprocess.run([spy, "record", "--pid", str(worker.pid), "--subprocesses", "--nonblocking", "--format",
                        "raw", "--rate", "200", "--duration", str(int(args.seconds)), "-o", str(out)],
                       check=True, capture_output=True)
        loop.join(args.seconds + 120)
        corr.close()
    finally:
        for name in list(ctx.procs):
            ctx.procs.pop(name).stop(60)
        reactors = [reactor_topic(s, channel=c) for c in (None, "leased", "shared", "ephemeral") for s in SHAPES]
        topics.delete(topics.names(f"bench.{rid}.") | {f"fusion.waits.bench-{rid}"} | set(reactors))
        _delete_groups(rid)
        _flush_redis(base)
    total, own, inclusive = top_frames(out.read_text(), args.top)
    print(f"## {args.channel}: {total} samples at 200/s over {args.seconds:g}s "
          f"({args.in_flight} onedep requests in flight)\n")
    print("| function (own samples) | samples | share |\n|---|---|---|")
    for f, k in own:
        print(f"| `{f}` | {k} | {100 * k / total:.1f}% |")
    print("\n| fusion-celery function (with what it calls) | samples | share |\n|---|---|---|")
    for f, k in inclusive:
        print(f"| `{f}` | {k} | {100 * k / total:.1f}% |")
    print(f"\nraw profile: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
