"""Reactors of tests/test_keys.py, served by its two workers only (topics are prefixed with their run id).

``spread`` has six partitions and answers with where each request landed and which worker ran it;
``spread-fan`` asks ``spread`` ``n`` times in one deps-map, every dep with the request's ``key`` if it has one.
"""

from __future__ import annotations

import os
from typing import Any

from celery import current_task

from fusion_celery import Message, reactor

RUN = os.environ["FUSION_TEST_RUN"]
#: The partitions of the ``spread`` topic, which its workers create.
PARTITIONS = 6


def t(name: str) -> str:
    return f"{RUN}.{name}"


@reactor(t("spread"), partitions=PARTITIONS)
def spread(message: Message) -> dict[str, Any]:
    """The partition, key and id of the request, and the node name of the worker that ran it."""
    return {"partition": message.partition, "key": message.key, "id": message.id,
            "worker": current_task.request.hostname}


def fan_deps(message: Message) -> dict[str, Any]:
    key = {"key": message.data["key"]} if message.data.get("key") else {}
    return {f"d{i}": {"topic": t("spread"), "args": i, **key} for i in range(int(message.data["n"]))}


@reactor(t("spread-fan"), deps=fan_deps)
def spread_fan(message: Message, results: dict[str, Any]) -> dict[str, Any]:
    return results
