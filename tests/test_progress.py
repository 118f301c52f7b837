"""A run's progress as its Celery task state (``PROGRESS``), in one process: no service needed.

The reactor ``pair`` waits on two requests to the topic ``plain``, which the test answers itself,
one at a time, so that each step of the progress can be seen before the next one happens.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, states
from celery.events.state import State
from celery.result import AsyncResult
from support.waiting import wait_for

from fusion_celery import Message, Pipeline, reactor
from fusion_celery.taskstate import PROGRESS, Progress, store
from fusion_celery.testing import in_process_app, worker
from fusion_celery.testing.app import kafka_broker
from fusion_celery.testing.kafka import Consumer, Producer

TIMEOUT = 15.0



@pytest.fixture(scope="module")
def fusion() -> Iterator[Celery]:
    app = in_process_app("progress", fusion_default_timeout=TIMEOUT)

    @reactor("pair", app=app, deps={"a": {"topic": "plain", "args": ["a"]}, "b": {"topic": "plain", "args": ["b"]}})
    def pair(message: Message, results: dict[str, Any]) -> Any:
        return sorted(results.values())

    Pipeline(deps={"a": {"topic": "plain", "args": ["a"]}, "b": {"topic": "plain", "args": ["b"]}},
             name="pair", app=app)
    kafka_broker(app).create_topic("plain")
    with worker(app):
        yield app


class PlainService:
    """The test plays the service on topic ``plain``: it reads the requests and answers them when told."""

    def __init__(self, app: Celery) -> None:
        servers = app.conf.fusion_kafka_bootstrap_servers
        self.requests = Consumer({"bootstrap.servers": servers, "group.id": "plain-service",
                                  "auto.offset.reset": "earliest"})
        self.requests.subscribe(["plain"])
        self.producer = Producer({"bootstrap.servers": servers})
        self.seen: list[dict[str, Any]] = []

    def read(self, n: int) -> list[dict[str, Any]]:
        def more() -> bool:
            self.seen += [json.loads(m.value()) for m in self.requests.consume(10, 0.05) if m.error() is None]
            return len(self.seen) >= n
        wait_for(more, TIMEOUT, f"{n} requests on topic plain")
        return self.seen

    def answer(self, request: dict[str, Any]) -> None:
        self.producer.produce(request["return-topic"], json.dumps(request["data"][0].upper()),
                              headers=[("fusion-status", b"ok"), ("fusion-id", request["id"].encode())])
        self.producer.flush(1)

    def close(self) -> None:
        self.requests.close()
        self.producer.close()


@pytest.fixture
def plain(fusion) -> Iterator[PlainService]:
    service = PlainService(fusion)
    yield service
    service.close()


def progress_of(result: AsyncResult) -> dict[str, Any] | None:
    """``result``'s meta while its state is PROGRESS, else None."""
    return result.info if result.state == PROGRESS else None


def test_a_pipeline_call_shows_the_reactor_runs_progress_then_its_answer(fusion, plain):
    result = Pipeline("pair", app=fusion).delay(None)
    first, second = plain.read(2)
    shown = wait_for(lambda: progress_of(result), TIMEOUT, "the pipeline's PROGRESS state")
    assert shown["done"] == 0 and shown["total"] == 2 and shown["topic"] == "pair"
    run = AsyncResult(shown["run"], app=fusion)
    assert run.state == PROGRESS and run.info["done"] == 0 and run.info["total"] == 2
    plain.answer(first)
    wait_for(lambda: (progress_of(result) or {}).get("done") == 1, TIMEOUT, "1 of 2 deps done on the pipeline")
    assert run.state == PROGRESS and run.info == {"done": 1, "total": 2, "run": run.id, "topic": "pair"}
    plain.answer(second)
    assert result.get(timeout=TIMEOUT) == ["A", "B"]
    assert result.state == states.SUCCESS
    assert run.get(timeout=TIMEOUT) == ["A", "B"] and run.state == states.SUCCESS


def test_a_deps_map_pipeline_shows_its_own_progress(fusion, plain):
    result = fusion.signature("fusion.pipeline.pair", kwargs={"data": None}).apply_async()
    first, second = plain.read(2)
    assert wait_for(lambda: progress_of(result), TIMEOUT, "the pipeline's PROGRESS state")["total"] == 2
    plain.answer(second)
    shown = wait_for(lambda: (progress_of(result) or {}).get("done") == 1 and result.info, TIMEOUT, "1 of 2 deps done")
    assert shown == {"done": 1, "total": 2, "run": result.id, "topic": None}
    plain.answer(first)
    assert result.get(timeout=TIMEOUT) == {"a": "A", "b": "B"}


def test_progress_never_replaces_a_final_state_and_never_goes_back(fusion):
    backend = fusion.backend
    backend.store_result("t-success", 4, states.SUCCESS)
    assert not store(fusion, "t-success", Progress("t-success", 1, 2))
    assert AsyncResult("t-success", app=fusion).state == states.SUCCESS
    backend.mark_as_failure("t-failure", ValueError("no"))
    assert not store(fusion, "t-failure", Progress("t-failure", 1, 2))
    assert AsyncResult("t-failure", app=fusion).state == states.FAILURE

    assert store(fusion, "t-run", Progress("t-run", 2, 3))
    assert not store(fusion, "t-run", Progress("t-run", 1, 3))  # a slower completion, stored late
    assert AsyncResult("t-run", app=fusion).info["done"] == 2
    assert store(fusion, "t-run", Progress("t-run", 3, 3))
    backend.store_result("t-run", "answer", states.SUCCESS)  # the finish step's result replaces it
    assert AsyncResult("t-run", app=fusion).get(timeout=1) == "answer"


def test_flowers_event_state_shows_progress_until_the_task_succeeds():
    """Flower keeps task states with Celery's event ``State``: a ``task-progress`` event is a custom state."""
    state = State()
    now = time.time()
    state.event({"type": "task-received", "uuid": "r1", "name": "fusion.reactor.pair", "timestamp": now,
                 "local_received": now, "clock": 1, "hostname": "w@h"})
    state.event({"type": "task-progress", "uuid": "r1", "done": 1, "total": 2, "timestamp": now + 1,
                 "local_received": now + 1, "clock": 2, "hostname": "w@h"})
    assert state.tasks["r1"].state == PROGRESS
    state.event({"type": "task-succeeded", "uuid": "r1", "result": "4", "timestamp": now + 2,
                 "local_received": now + 2, "clock": 3, "hostname": "w@h"})
    assert state.tasks["r1"].state == states.SUCCESS


def test_the_cli_progress_bar_fills_with_the_deps_done():
    from fusion_celery.cli import progress_bar
    assert progress_bar(0, 2) == "[--------------------] 0/2 deps done"
    assert progress_bar(1, 2) == "[##########----------] 1/2 deps done"
    assert progress_bar(3, 2, width=4) == "[####] 2/2 deps done"


@pytest.mark.parametrize("serializer", ["json", "pickle"])
def test_both_ways_of_storing_progress_keep_final_states(serializer):
    """JSON results are checked and written by one Lua script, others by a WATCH/MULTI transaction."""
    app = in_process_app(f"progress-{serializer}", result_serializer=serializer,
                         accept_content=["json", "pickle"], result_accept_content=["json", "pickle"])
    backend = app.backend
    assert backend.serializer == serializer
    backend.store_result("s", 4, states.SUCCESS)
    backend.store_result("f", ValueError("no"), states.FAILURE)
    assert not store(app, "s", Progress("s", 1, 2)) and not store(app, "f", Progress("f", 1, 2))
    assert AsyncResult("s", app=app).state == states.SUCCESS and AsyncResult("f", app=app).state == states.FAILURE
    assert store(app, "p", Progress("p", 1, 3)) and not store(app, "p", Progress("p", 0, 3))
    assert store(app, "p", Progress("p", 2, 3))
    assert AsyncResult("p", app=app).info == {"done": 2, "total": 3, "run": "p", "topic": None}
