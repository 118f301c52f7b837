"""``python -m bench``: run the benchmark against the local stack (``make bench`` starts it if needed).

Options: ``--smoke`` (tiny counts: checks the harness, not the numbers), ``--out DIR``
(default ``bench/results``), ``--only latency,throughput,waiting,brokers``, ``--pool``/``--concurrency``
(the Celery pool of the workers; default prefork x2), ``--brokers redis,rabbitmq`` (the Celery brokers the
brokers section compares; RabbitMQ's URL comes from the stack: ``FUSION_BROKER=rabbitmq``).
"""

from __future__ import annotations

import argparse
import resource
import sys
from dataclasses import replace
from pathlib import Path

from .runner import FULL, SMOKE, run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny counts, to check that the harness works")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--only", help="comma-separated sections: latency, throughput, waiting, brokers")
    ap.add_argument("--brokers", help="brokers section: the Celery brokers compared, e.g. redis,rabbitmq")
    ap.add_argument("--pool", help="Celery pool of the workers (prefork, threads, solo, ...)")
    ap.add_argument("--concurrency", type=int, help="Celery concurrency of the workers")
    ap.add_argument("--rounds", type=int, help="latency: interleaved rounds")
    ap.add_argument("--samples", type=int, help="latency: timed calls per scenario per round")
    ap.add_argument("--levels", help="throughput: in-flight levels, e.g. 1,10,100")
    ap.add_argument("--waiting-levels", help="waiting: pending-wait levels, e.g. 100,1000")
    args = ap.parse_args(argv)
    profile = SMOKE if args.smoke else FULL
    if args.only:
        profile = replace(profile, sections=tuple(s.strip() for s in args.only.split(",") if s.strip()))
    if args.brokers:
        profile = replace(profile, brokers=tuple(b.strip() for b in args.brokers.split(",") if b.strip()))
    if args.pool:
        profile = replace(profile, pool=args.pool)
    if args.concurrency:
        profile = replace(profile, concurrency=args.concurrency)
    for key in ("rounds", "samples"):
        if getattr(args, key):
            profile = replace(profile, **{key: getattr(args, key)})
    if args.levels:
        profile = replace(profile, levels=tuple(int(x) for x in args.levels.split(",")))
    if args.waiting_levels:
        profile = replace(profile, waiting_levels=tuple(int(x) for x in args.waiting_levels.split(",")))
    # Many waits need many open files (return topics, sockets): use the hard limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    from .report import save, tables
    result = run(profile, args.out)
    path = save(result, args.out)
    print()
    print(tables(result))
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
