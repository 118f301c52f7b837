"""The typed run, the two steps of reactors and pipelines, and who answers a lost worker's run (no services)."""

from __future__ import annotations

import json

import pytest
from celery.exceptions import WorkerLostError

from fusion_celery import Pipeline, create_app, reactor
from fusion_celery.answer import _worker_lost
from fusion_celery.pipeline import DepsPipeline, TopicPipeline
from fusion_celery.reactor import ProcessTask, ReactorTask
from fusion_celery.registry import Wait
from fusion_celery.run import Caller, Run


def test_run_round_trips_through_its_wire_form():
    run = Run(id="r1", topic="math", caller=Caller(return_topic="fusion.rt.1", id="m1", topic="math"))
    data = json.loads(json.dumps(run.to_dict()))
    assert data == {"id": "r1", "topic": "math", "message": {"return_topic": "fusion.rt.1", "id": "m1",
                                                               "topic": "math"}}
    assert Run.from_dict(data) == run
    assert Run.from_dict(None) is None
    assert Run.from_dict({}) is None


def test_a_pipeline_run_has_no_caller_on_kafka():
    run = Run(id="p1")
    assert run.caller.return_topic is None
    assert Run.from_dict(run.to_dict()) == run


def test_wait_records_carry_the_run_and_read_the_older_reactor_field():
    run = Run(id="r1", topic="math", caller=Caller(return_topic="fusion.rt.1", id="m1"))
    wait = Wait(id="w1", return_topic="fusion.rt.2", topic="add", deadline=10, request={}, run=run, created=1)
    back = Wait.from_json(wait.to_json())
    assert back == wait
    older = json.loads(wait.to_json())
    older["reactor"] = older.pop("run")
    older["total"] = 3  # a field Wait does not have is ignored
    assert Wait.from_json(json.dumps(older)).run == run


def test_a_reactor_registers_its_start_and_process_steps_with_the_same_options():
    app = create_app("run-steps")

    @reactor("steps", app=app, queue="q1", deps={"a": {"topic": "t", "args": [1]}})
    def steps(message, results):
        return results

    assert isinstance(steps, ReactorTask)
    process = app.tasks[steps.finish_name]
    assert steps.finish_name == "fusion.reactor.steps.process"
    assert isinstance(process, ProcessTask)
    assert steps.queue == process.queue == "q1"
    assert steps.acks_late and process.acks_late


def test_pipeline_picks_its_kind_and_registers_the_combine_step():
    app = create_app("run-pipelines")
    topic = Pipeline("math", app=app)
    deps = Pipeline(deps={"a": {"topic": "t", "args": [1]}}, combine=lambda d, r: r, name="both", app=app)
    assert type(topic) is TopicPipeline and isinstance(topic, Pipeline)
    assert type(deps) is DepsPipeline
    assert "fusion.pipeline.both.combine" in app.tasks
    with pytest.raises(ValueError, match="either a root topic or a deps-map"):
        Pipeline("math", deps={}, app=app)
    with pytest.raises(ValueError, match="needs a name"):
        Pipeline(deps={}, app=app)
    with pytest.raises(ValueError, match="always waits"):
        deps.s(1, wait=False)


def test_a_lost_worker_answers_through_the_task_that_died():
    seen = []

    class Lost:
        def on_worker_lost(self, task_id, kwargs, exc):
            seen.append((task_id, kwargs, type(exc).__name__))

    _worker_lost(sender=Lost(), task_id="t1", exception=WorkerLostError("gone"), kwargs={"run": {"id": "r"}})
    _worker_lost(sender=Lost(), task_id="t2", exception=ValueError("not lost"), kwargs={})
    assert seen == [("t1", {"run": {"id": "r"}}, "WorkerLostError")]
