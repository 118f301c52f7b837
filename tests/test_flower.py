"""Flower, started against the real stack, shows every task of a pipeline call in its final state."""

import os
import subprocess
import sys

import pytest
import requests
from support.kafka import topic_name
from support.ports import free_port
from support.stack import ROOT
from support.waiting import wait_for

from fusion_celery import Pipeline

pytestmark = pytest.mark.integration


def test_flower_shows_the_whole_pipeline_tree(services_worker, tmp_path):
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
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
