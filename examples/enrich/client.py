"""Enrich documents and print the result as JSON.

    python -m examples.enrich.client harbour            # one document: the enrich reactor's report
    python -m examples.enrich.client harbour outage     # several: the digest pipeline (fan-out + combine)

Needs a worker serving :mod:`examples.enrich.services` and
:mod:`examples.enrich.pipelines`, and the ``language`` service
(``python -m examples.plain_service.language``).  Known ids: harbour, outage,
kafka, marche.
"""

from __future__ import annotations

import argparse
import json
import sys

from celery.exceptions import TimeoutError as CeleryTimeout

from examples import topic
from fusion_celery import FusionError, Pipeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.enrich.client", description=__doc__.splitlines()[0])
    parser.add_argument("ids", nargs="+", metavar="ID", help="document ids (harbour, outage, kafka, marche)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (default 120)")
    args = parser.parse_args(argv)

    if len(args.ids) == 1:
        result = Pipeline(topic("enrich")).delay({"id": args.ids[0]}, timeout=args.timeout)
    else:
        from examples.enrich.pipelines import digest
        result = digest.delay(args.ids, timeout=args.timeout)
    try:
        answer = result.get(timeout=args.timeout + 30)
    except (FusionError, CeleryTimeout, ValueError) as exc:
        print(f"enrichment failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
