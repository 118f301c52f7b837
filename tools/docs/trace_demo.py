"""The reactor whose trace docs/assets/trace.png shows (tools/docs/screenshot_trace.py runs it).

``report`` has three deps: ``total`` (the math example's ``add``), ``less`` (its ``subtract``, fed
with ``total``) and ``language`` (the plain example service, which joins the trace with a span
of its own).  Served with the math example's reactors::

    FUSION_IMPORTS=examples.math.reactors,tools.docs.trace_demo celery -A fusion_celery worker
"""

from __future__ import annotations

from typing import Any

from examples import topic
from fusion_celery import Message, reactor


def report_deps(message: Message) -> dict[str, Any]:
    """Sum the numbers, take 2 off the sum, and guess the text's language, in one deps-map."""
    data = message.data or {}
    return {"total": {"topic": topic("add"), "args": data.get("numbers", [1, 2, 3])},
            "less": {"topic": topic("subtract"), "args": [2], "arg_in_fn": "cons", "deps": ["total"]},
            "language": {"topic": topic("language"), "args": {"text": data.get("text", "the cat and the dog")}}}


@reactor(topic("report"), deps=report_deps)
def report(message: Message, results: dict[str, Any]) -> Any:
    """The three answers together."""
    return results
