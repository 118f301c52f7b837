"""Flower, started against the real stack, shows every task of a pipeline call in its final state."""

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import requests
from support.kafka import topic_name
from support.ports import free_port
from support.stack import ROOT
from support.waiting import wait_for

from fusion_celery import Pipeline

pytestmark = pytest.mark.integration


@pytest.fixture
def flower(services_worker, tmp_path) -> Iterator[str]:
    """A Flower process on the stack (unauthenticated API on loopback) that sees the session worker: its URL."""
    port = free_port()
    env = {**os.environ, "FLOWER_UNAUTHENTICATED_API": "true", "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "flower.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "fusion_celery", "flower", f"--port={port}",
                             "--address=127.0.0.1"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        def workers_seen():
            try:
                r = requests.get(f"{base}/api/workers", params={"status": "true"}, timeout=5)
                return r.ok and services_worker.name in r.json()
            except requests.RequestException:
                return False

        wait_for(workers_seen, 60, "Flower to see the worker (events flowing)", interval=0.5)
        yield base
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


@pytest.mark.broker
def test_flower_shows_the_whole_pipeline_tree(flower):
    base = flower
    result = Pipeline(topic_name("math")).delay([1, 2, 3])
    assert result.get(timeout=60) == 4

    expected = {
        f"fusion.pipeline[{topic_name('math')}]",
        f"fusion.reactor.{topic_name('math')}[{topic_name('math')}:process]",
        f"fusion.dispatch[{topic_name('add')}]",
        f"fusion.dispatch[{topic_name('subtract')}]",
        f"fusion.reactor.{topic_name('add')}[{topic_name('add')}]",
        f"fusion.reactor.{topic_name('subtract')}[{topic_name('subtract')}]",
    }

    def tree():
        tasks = requests.get(f"{base}/api/tasks", timeout=5).json()
        mine = {t["name"]: t for t in tasks.values() if t.get("root_id") == result.id}
        done = {n for n, t in mine.items() if t["state"] == "SUCCESS"}
        return expected <= done and mine

    mine = wait_for(tree, 60, f"Flower to show {sorted(expected)} in state SUCCESS", interval=0.5)
    for name in expected:
        task = mine[name]
        assert task["runtime"] is not None and task["runtime"] > 0, (name, task)
        assert task["kwargs"], (name, task)  # arguments are visible
    assert mine[f"fusion.pipeline[{topic_name('math')}]"]["result"] == "4"


def test_flower_shows_a_pipeline_in_progress_until_it_succeeds(flower, gates):
    base = flower
    first, second = gates(), gates()
    deps = {"a": {"topic": first.topic}, "b": {"topic": second.topic}}
    result = Pipeline(topic_name("generic")).delay({"deps": deps})
    wait_for(lambda: first.held and second.held, 60, "both dependency requests")
    assert first.release() == 1

    def state(task_id, wanted, done=None):
        task = requests.get(f"{base}/api/task/info/{task_id}", timeout=5)
        return task.ok and task.json()["state"] == wanted and \
            (done is None or f"'done': {done}," in (task.json()["result"] or "")) and task.json()

    shown = wait_for(lambda: state(result.id, "PROGRESS", done=1), 60,
                     "Flower to show the pipeline in PROGRESS with 1 dep done", interval=0.5)
    assert shown["result"] == repr(result.info) and result.info["done"] == 1 and result.info["total"] == 2
    run = result.info["run"]
    wait_for(lambda: state(run, "PROGRESS", done=1), 60, "Flower to show the reactor run in PROGRESS", interval=0.5)
    assert second.release() == 1
    result.get(timeout=60)
    wait_for(lambda: state(result.id, "SUCCESS"), 60, "Flower to show the pipeline in SUCCESS", interval=0.5)
    wait_for(lambda: state(run, "SUCCESS"), 60, "Flower to show the reactor run in SUCCESS", interval=0.5)
