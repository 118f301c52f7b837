"""Call the math pipeline and print its answer.

    python -m examples.math.client              # add([1, 2, 3]) = 6, subtract([6, 2]) = 4: prints 4
    python -m examples.math.client '[10, 20]'   # prints 28

It needs only the Celery broker and result backend (the local stack's, or
``CELERY_BROKER_URL`` / ``CELERY_RESULT_BACKEND``) and a worker serving
:mod:`examples.math.reactors`; the client itself never talks to Kafka.
"""

from __future__ import annotations

import argparse
import json
import sys

from celery.exceptions import TimeoutError as CeleryTimeout

from examples import topic
from fusion_celery import FusionError, Pipeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.math.client", description=__doc__.splitlines()[0])
    parser.add_argument("numbers", nargs="?", help="a JSON list of numbers for add (default: [1, 2, 3])")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the answer (default 60)")
    args = parser.parse_args(argv)
    try:
        numbers = json.loads(args.numbers) if args.numbers is not None else None
    except ValueError as exc:
        parser.error(f"NUMBERS is not JSON: {exc}")

    result = Pipeline(topic("math")).delay(numbers, timeout=args.timeout)
    try:
        answer = result.get(timeout=args.timeout + 30)
    except (FusionError, CeleryTimeout) as exc:
        print(f"math pipeline failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
