"""A dispatch asks Kafka whether its target topic exists only when its process does not know it; a topic
deleted since ends the call in DependencyFailed naming it (no services: an in-process worker on the stub).

The process's :class:`~fusion_celery.clients.Clients` are shared by the worker's threads and this test, so
the test can fill their cache of known topics (as a first request would) before it deletes a topic.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from fusion_celery import DependencyFailed, Message, Pipeline, reactor
from fusion_celery.clients import clients
from fusion_celery.config import settings
from fusion_celery.runtime import registry
from fusion_celery.testing import in_process_app, worker
from fusion_celery.testing.app import kafka_broker
from fusion_celery.testing.producer import Producer

ANSWER_TIMEOUT = 15.0
#: Longer than a refused send takes, shorter than the 2 s a look-up keeps looking before it answers no.
PROMPT = 1.5


@pytest.fixture(scope="module")
def fusion() -> Iterator[Celery]:
    app = in_process_app("topics", fusion_default_timeout=ANSWER_TIMEOUT)

    @reactor("add", app=app)
    def add(message: Message) -> Any:
        return sum(message.data)

    @reactor("twice", app=app, deps=lambda m: {"sum": {"topic": "add", "args": m.data}})
    def twice(message: Message, results: dict[str, Any]) -> Any:
        return results["sum"] * 2

    @reactor("calls-vanishing", app=app, deps={"v": {"topic": "vanishing-dep", "args": [1]}})
    def calls_vanishing(message: Message, results: dict[str, Any]) -> Any:
        raise AssertionError("never runs: its dependency's topic is gone")

    with worker(app):
        yield app


@pytest.fixture
def lookups(monkeypatch) -> dict[str | None, int]:
    """The metadata requests the stub's producers make, by topic (None: all topics)."""
    counts: dict[str | None, int] = {}
    real = Producer.list_topics

    def counting(self: Producer, topic: str | None = None, timeout: float = -1) -> Any:
        counts[topic] = counts.get(topic, 0) + 1
        return real(self, topic, timeout)

    monkeypatch.setattr(Producer, "list_topics", counting)
    return counts


def known_then_deleted(app: Celery, topic: str) -> None:
    """Make ``topic``, let this process's clients see it (as a request to it would), then delete it."""
    broker = kafka_broker(app)
    broker.create_topic(topic)
    assert clients(app).topic_exists(topic)
    broker.delete_topic(topic)
    assert clients(app).topic_exists(topic, wait=0), "the cache says yes: nobody asked Kafka"


def return_topics(app: Celery) -> set[str]:
    prefix = settings(app).return_topic_prefix
    return {t for t in kafka_broker(app).topics if t.startswith(prefix)}


def test_requests_to_topics_known_to_exist_make_no_metadata_request_for_them(fusion, lookups):
    assert Pipeline("twice", app=fusion).delay([1, 2]).get(timeout=ANSWER_TIMEOUT) == 6  # the process learns both
    lookups.clear()
    results = [Pipeline("twice", app=fusion).delay([i, 1]) for i in range(10)]
    assert [r.get(timeout=ANSWER_TIMEOUT) for r in results] == [(i + 1) * 2 for i in range(10)]
    assert lookups.get("twice", 0) == 0 and lookups.get("add", 0) == 0, lookups


def test_a_call_to_a_known_topic_that_was_deleted_fails_at_once_naming_it(fusion):
    known_then_deleted(fusion, "vanishing")
    before = return_topics(fusion)
    started = time.monotonic()
    with pytest.raises(DependencyFailed, match=r"^topic 'vanishing' does not exist$"):
        Pipeline("vanishing", app=fusion).delay(1, timeout=5).get(timeout=ANSWER_TIMEOUT)
    assert time.monotonic() - started < PROMPT, "the refused send ended it, not a look-up"
    assert not [w for w in registry(fusion).pending() if w.topic == "vanishing"], "its wait was removed"
    assert return_topics(fusion) <= before, "its return topic was deleted"
    assert not clients(fusion).topic_exists("vanishing", wait=0), "the process forgot the topic: the next " \
        "request's look-up asks Kafka, and fails the same way"


def test_fire_and_forget_to_a_known_topic_that_was_deleted_fails_naming_it(fusion):
    known_then_deleted(fusion, "vanishing-ff")
    started = time.monotonic()
    with pytest.raises(DependencyFailed, match=r"^topic 'vanishing-ff' does not exist$"):
        Pipeline("vanishing-ff", app=fusion).delay(1, wait=False).get(timeout=ANSWER_TIMEOUT)
    assert time.monotonic() - started < PROMPT


def test_a_dependency_whose_known_topic_was_deleted_fails_its_reactor_naming_both(fusion):
    known_then_deleted(fusion, "vanishing-dep")
    started = time.monotonic()
    with pytest.raises(DependencyFailed) as failed:
        Pipeline("calls-vanishing", app=fusion).delay(None).get(timeout=ANSWER_TIMEOUT)
    assert time.monotonic() - started < PROMPT
    assert "DependencyFailed: dep 'v': topic 'vanishing-dep' does not exist" in str(failed.value)
    assert not [w for w in registry(fusion).pending() if w.topic == "vanishing-dep"]
