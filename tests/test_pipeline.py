"""Pipelines from any Celery client, fire-and-forget, timeouts and canvas composition."""

import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest
from celery import chain, chord, group
from support.kafka import topic_name
from support.stack import BACKEND, BROKER

from fusion_celery import DependencyFailed, DependencyTimeout, Pipeline

pytestmark = pytest.mark.integration


@pytest.mark.broker
def test_client_with_only_broker_and_backend_urls_gets_the_math_answer(services_worker, tmp_path):
    script = textwrap.dedent(f"""
        from celery import Celery
        app = Celery(broker={BROKER!r}, backend={BACKEND!r})
        print(app.send_task("fusion.pipeline", args=[{topic_name("math")!r}, [1, 2, 3]]).get(timeout=60))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FUSION_", "CELERY_"))}
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "4"


def test_pipeline_delay(services_worker):
    assert Pipeline(topic_name("math")).delay([1, 2, 3]).get(timeout=60) == 4


def test_fan_out_pipeline_combines(services_worker, app):
    result = app.send_task(f"fusion.pipeline.{topic_name('fanout')}", kwargs={"data": [10, 3]})
    assert result.get(timeout=60) == {"input": [10, 3], "sum": 13, "diff": 7}


def test_fire_and_forget_returns_the_delivery_record(services_worker, kit):
    topic = kit.topic()
    record = Pipeline(topic).delay({"x": 1}, wait=False).get(timeout=60)
    assert record["topic"] == topic and record["partition"] == 0 and record["offset"] == 0
    [msg] = kit.read(topic, 1)
    body = json.loads(msg.value())
    assert body["data"] == {"x": 1} and "return-topic" not in body


def test_fire_and_forget_record_names_the_reactor_run(services_worker, app):
    from celery.result import AsyncResult

    from fusion_celery import run_id
    record = Pipeline(topic_name("add")).delay([1, 2], wait=False).get(timeout=60)
    run = AsyncResult(run_id(record["topic"], record["partition"], record["offset"], record["timestamp"]), app=app)
    assert run.get(timeout=60) == 3


def test_timeout_raises_from_get(services_worker, kit):
    silent = kit.topic()
    with pytest.raises(DependencyTimeout, match=f"request to topic '{silent}' did not reply within 2s"):
        Pipeline(silent).delay(1, timeout=2).get(timeout=60)


def test_failing_reactor_raises_from_get(services_worker):
    with pytest.raises(DependencyFailed, match="replied with an error: ValueError: boom: 7"):
        Pipeline(topic_name("boom")).delay(7).get(timeout=60)


def test_unknown_topic_raises_from_get(services_worker):
    with pytest.raises(DependencyFailed, match="does not exist"):
        Pipeline(f"nowhere.{uuid.uuid4().hex}").delay(1).get(timeout=60)


@pytest.mark.broker
def test_pipelines_compose_with_chain_group_and_chord(services_worker, app):
    math = Pipeline(topic_name("math"))
    add = Pipeline(topic_name("add"))
    ping = app.signature("tests.ping")
    assert chain(math.s([1, 2, 3]), ping).delay().get(timeout=60)["pong"] == 4
    echo = Pipeline(topic_name("one-arg"))
    assert chain(math.s([1, 2, 3]), echo.s()).delay().get(timeout=60)["data"] == 4  # previous result = data
    assert group(add.s([i, 1]) for i in range(4)).delay().get(timeout=60) == [1, 2, 3, 4]
    assert chord([add.s([i, i]) for i in range(3)], add.s()).delay().get(timeout=60) == 0 + 2 + 4


def test_a_pipeline_shows_progress_while_its_reactors_deps_are_pending(services_worker, gates, app):
    """The reactor run's deps wait on two gates the test opens one by one: the pipeline's result shows
    PROGRESS 0 of 2, then 1 of 2, then the answer."""
    from celery.result import AsyncResult
    from support.waiting import wait_for

    from fusion_celery.taskstate import PROGRESS

    first, second = gates(), gates()
    result = Pipeline(topic_name("generic")).delay({"deps": {"a": {"topic": first.topic, "args": [1]},
                                                             "b": {"topic": second.topic, "args": [2]}}})

    def progress(done):
        return lambda: result.state == PROGRESS and result.info["done"] == done and result.info

    shown = wait_for(progress(0), 60, "PROGRESS with 0 of 2 deps done")
    assert shown["total"] == 2 and shown["topic"] == topic_name("generic")
    run = AsyncResult(shown["run"], app=app)
    assert run.state == PROGRESS and run.info == shown
    wait_for(lambda: first.held and second.held, 60, "both dependency requests")
    assert first.release() == 1
    assert wait_for(progress(1), 60, "PROGRESS with 1 of 2 deps done")["total"] == 2
    assert second.release() == 1
    assert result.get(timeout=60) == {"results": {"a": {"echo": [1]}, "b": {"echo": [2]}}, "echo": None}
    assert result.state == "SUCCESS"
    # The run's processing step replies, then Celery stores its result: the pipeline may have it first.
    wait_for(lambda: run.state == "SUCCESS", 60, "the reactor run's SUCCESS")
    assert run.result == result.result
