"""The fusion-clj README's example: ``add``, ``subtract``, and ``math`` whose deps-map chains them.

Serve them with a worker::

    FUSION_IMPORTS=examples.math.reactors celery -A fusion_celery worker -l info

``math`` asks ``add`` for the sum of ``[1, 2, 3]`` (or of the numbers it was
sent), then ``subtract`` for ``[sum, 2]`` (the sum is put first: ``cons``), and
answers with that difference: ``[1, 2, 3] -> 6``, then ``[6, 2] -> 4``.

``FUSION_EXAMPLES_MATH_SUBTRACT`` names another topic for the ``subtract`` dep: for example
``go-subtract``, served by the Go service of ``examples/other_languages/go-service``.
``FUSION_EXAMPLES_MATH_SUBTRACT_DIALECT`` names the dialect that service speaks (``spring`` for
``examples/other_languages/spring``, ``faust`` for ``examples/other_languages/faust/service.py``;
default fusion's) and ``FUSION_EXAMPLES_MATH_SUBTRACT_REPLY`` the dep's reply channel.
"""

from __future__ import annotations

import os
from typing import Any

from examples import topic
from fusion_celery import Message, reactor


@reactor(topic("add"))
def add(message: Message) -> Any:
    """The sum of the numbers in the request's data."""
    return sum(message.data)


@reactor(topic("subtract"))
def subtract(message: Message) -> Any:
    """The first number minus all the others."""
    first, *rest = message.data
    return first - sum(rest)


def math_deps(message: Message) -> dict[str, Any]:
    """The deps-map of the fusion-clj README, for the numbers in the request (default ``[1, 2, 3]``)."""
    numbers = message.data if message.data is not None else [1, 2, 3]
    two: dict[str, Any] = {"topic": topic(os.environ.get("FUSION_EXAMPLES_MATH_SUBTRACT", "subtract")), "args": [2],
                           "arg_in_fn": "cons", "deps": ["one"]}
    for key in ("dialect", "reply"):
        if os.environ.get(f"FUSION_EXAMPLES_MATH_SUBTRACT_{key.upper()}"):
            two[key] = os.environ[f"FUSION_EXAMPLES_MATH_SUBTRACT_{key.upper()}"]
    return {"one": {"topic": topic("add"), "args": numbers}, "two": two}


@reactor(topic("math"), deps=math_deps)
def math(message: Message, results: dict[str, Any]) -> Any:
    """The answer of ``two``: ``subtract([add(numbers), 2])``."""
    return results["two"]
