"""A Faust agent that serves a dependency of a fusion reactor: ``subtract`` (the first number minus the others).

    python service.py SERVERS TOPIC

A deps-map entry with ``"dialect": "faust"`` sends it the numbers as they are, with
the headers ``Faust-Ag-ReplyTo`` (the return topic) and ``Faust-Ag-CorrelationId``
(the wait's id); Faust answers each with a ``ReqRepResponse`` record on that topic,
which the fusion waiter reads.  Nothing here knows of fusion-celery: this is a
plain Faust agent that ``yield``s its answers.  Stops on SIGTERM.
"""

from __future__ import annotations

import sys
import tempfile

import faust


def make_app(servers: str, topic: str) -> faust.App:
    app = faust.App(f"fusion-faust-{topic}", broker=f"kafka://{servers}", value_serializer="json",
                    web_enabled=False, datadir=tempfile.mkdtemp(prefix="faust-service-"))

    @app.agent(app.topic(topic, value_serializer="json"))
    async def subtract(stream):
        async for numbers in stream:
            if not isinstance(numbers, list) or not numbers or not all(
                    isinstance(n, (int, float)) and not isinstance(n, bool) for n in numbers):
                yield {"error": {"type": "ValueError", "message": "expected a non-empty list of numbers"}}
                continue
            yield numbers[0] - sum(numbers[1:])

    @app.task
    async def serving() -> None:
        print(f"faust service: serving {topic}", flush=True)

    return app


if __name__ == "__main__":
    servers, topic = sys.argv[1:3]
    sys.argv[1:] = ["worker", "-l", "info"]
    make_app(servers, topic).main()
