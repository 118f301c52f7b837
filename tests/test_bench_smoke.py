"""The benchmark harness runs end to end (tiny counts; no timing is asserted: figures come from `make bench`)."""

import json
import os
import subprocess
import sys

import pytest
from support.stack import ROOT

pytestmark = pytest.mark.integration


def test_bench_smoke_run_completes_and_writes_json(stack, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, f"stdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-3000:]}"
    result = json.loads((tmp_path / "latest.json").read_text())
    for key in ("run", "machine", "profile", "load_average", "latency", "throughput", "waiting", "churn",
                "leftovers", "targets", "duration_s"):
        assert key in result, f"missing {key!r} in the benchmark JSON"
    keys = {r["key"] for r in result["latency"]["rows"]}
    assert {"floor.ephemeral", "floor.correlation", "fusion.kafka.onedep", "fusion-shared.kafka.math",
            "fusion-eph.kafka.diamond", "fusion.corr.onedep", "fusion-shared.corr.math", "fusion.pipeline.math",
            "clj.diamond", "celery.diamond", "fusion-pool.kafka.onedep"} <= keys
    assert all(r.get("n", 0) > 0 for r in result["latency"]["rows"]), result["latency"]["rows"]
    assert {r["design"] for r in result["throughput"]["rows"]} == {
        "fusion-celery leased", "fusion-celery shared", "fusion-celery ephemeral", "consumer-per-wait", "plain Celery",
        "fusion-celery leased, two workers"}
    assert all(r.get("completed", 0) > 0 for r in result["throughput"]["rows"]), result["throughput"]["rows"]
    end = result["leftovers"][-1]
    assert end["section"] == "end of run" and end["left"] == 0, result["leftovers"]  # the pool's topics too
    assert result["waiting"]["fusion-celery"] and result["waiting"]["consumer-per-wait"]
    assert "| shape |" in out.stdout  # the table was printed
