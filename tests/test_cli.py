"""The `celery fusion` commands against the real stack."""

import json
import os
import pty
import subprocess
import sys
import time
import uuid

import pytest
from support.kafka import topic_name
from support.stack import ROOT
from support.waiting import wait_for
from support.workers import isolated_env

pytestmark = pytest.mark.integration


def fusion(*args, timeout=120, env=None):
    e = {**os.environ, "FUSION_IMPORTS": "tests.apps.services", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "celery", "-A", "fusion_celery", "fusion", *args], env=e,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def one_line_error(out, text):
    assert out.returncode != 0
    assert text in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert len([line for line in out.stderr.splitlines() if line.strip()]) <= 3, out.stderr


@pytest.mark.broker
def test_call_wait_prints_the_answer(services_worker):
    out = fusion("call", topic_name("math"), "[1, 2, 3]", "--wait", "--timeout", "60")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "4"


def test_call_without_wait_prints_the_delivery_record(services_worker, kit):
    topic = kit.topic()
    out = fusion("call", topic, '{"a": 1}')
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert {k: record[k] for k in ("topic", "partition", "offset")} == {"topic": topic, "partition": 0, "offset": 0}
    assert record["timestamp"] > 0


def test_call_gets_an_answer_that_comes_after_the_reaper_grace(worker_factory, kit):
    """`call --wait` registers no wait, so only its return topic's name keeps the workers' reapers away: the
    name carries the call's deadline, and the topic lives until then plus the grace, not the grace alone."""
    prefix = f"fusion.rt.grace{uuid.uuid4().hex[:6]}."  # this worker's reaper, with its short grace, sees only these
    grace = 2.0
    env = {**isolated_env(), "FUSION_RETURN_TOPIC_PREFIX": prefix, "FUSION_REAPER_GRACE": str(grace),
           "FUSION_REAPER_INTERVAL": "0.5"}
    worker_factory(name="grace", env=env, concurrency=1)
    now = int(time.time() * 1000)
    orphan = kit.topic(f"{prefix}{now - 60_000}.{uuid.uuid4().hex}")  # its deletion shows the reaper at work
    no_time = kit.topic(f"{prefix}no-time-{uuid.uuid4().hex}")
    wait_for(lambda: orphan not in kit.topics(prefix), 60, "the worker's reaper to delete a past-due orphan")
    kit.created.remove(orphan)

    started = time.monotonic()
    out = fusion("call", f"{env['FUSION_TEST_RUN']}.slow", "6", "--wait", "--timeout", "30", env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == 6
    assert time.monotonic() - started > 6 > 2 * grace, "the answer came after more than the grace"
    wait_for(lambda: kit.topics(prefix) == {no_time}, 60,
             "the call to delete its return topic, and the reaper to leave the name without a time alone")


def test_call_errors_are_one_line(services_worker):
    one_line_error(fusion("call", topic_name("math"), "[1, 2"), "not valid JSON")
    one_line_error(fusion("call", f"missing.{uuid.uuid4().hex}", "1"), "does not exist")
    one_line_error(fusion("call", "bad topic!", "1"), "not a legal Kafka topic name")
    one_line_error(fusion("call", topic_name("boom"), "3", "--wait"), "replied with an error: ValueError: boom: 3")
    one_line_error(fusion("call", topic_name("add"), "1", "--wait",
                          env={"FUSION_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}), "did not answer")


def _read_ready(fd: int) -> bytes:
    import select
    seen = b""
    while select.select([fd], [], [], 0.1)[0]:
        try:
            chunk = os.read(fd, 1024)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        seen += chunk
    return seen


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "pipe"])
def test_call_shows_progress_while_the_deps_are_pending(services_worker, service, kit, terminal):
    """A bar on stderr when stdout is a terminal (drawn over itself), else one plain line per change."""
    gate_topic = kit.topic()
    gate = service(gate_topic, lambda data: "late")
    gate.hold = True
    data = json.dumps({"deps": {"fast": {"topic": topic_name("add"), "args": [1]}, "slow": {"topic": gate_topic}}})
    err_master, err_slave = pty.openpty()
    out_master, out_slave = pty.openpty() if terminal else (None, None)
    e = {**os.environ, "FUSION_IMPORTS": "tests.apps.services", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "fusion_celery", "fusion", "call",
                             topic_name("generic"), data, "--wait"], env=e, cwd=ROOT,
                            stdout=out_slave if terminal else subprocess.PIPE, stderr=err_slave)
    os.close(err_slave)
    if terminal:
        os.close(out_slave)
    seen = b""
    shown = b"[##########----------] 1/2 deps done" if terminal else b"deps done: 1/2\r\n"

    def progress_shown():
        nonlocal seen
        seen += _read_ready(err_master)
        return shown in seen

    wait_for(progress_shown, 60, f"the progress {shown!r}")
    gate.release()
    if terminal:
        out = b""

        def exited():
            nonlocal out
            out += _read_ready(out_master)
            return proc.poll() is not None

        wait_for(exited, 60, "the call to exit")
        out += _read_ready(out_master)
        os.close(out_master)
    else:
        out, _ = proc.communicate(timeout=60)
    proc.wait(60)
    os.close(err_master)
    assert proc.returncode == 0
    assert json.loads(out) == {"results": {"fast": 1, "slow": "late"}, "echo": None}
    assert (b"\r[" in seen) == terminal  # the bar redraws its line; plain lines do not


def pending_wait(kit, service):
    """A reactor run parked on a dependency that holds its reply: (dep topic, dep service, return topic)."""
    gate_topic = kit.topic()
    gate = service(gate_topic, lambda data: "ok")
    gate.hold = True
    back = kit.topic(f"fusion.rt.{uuid.uuid4().hex}")
    kit.send(topic_name("generic"), {"data": {"deps": {"g": {"topic": gate_topic}}}, "return-topic": back})
    wait_for(lambda: gate.received, 60, "the dependency request")
    return gate_topic, gate, back


def test_topics_and_reap(services_worker, service, kit):
    gate_topic, gate, back = pending_wait(kit, service)
    # 200 s old by its name: an orphan for `reap --grace 100`, still young for the workers' own
    # reapers (fusion_reaper_grace, 300 s), which must not delete it first.
    orphan = kit.topic(f"fusion.rt.{int(time.time() * 1000) - 200_000}.{uuid.uuid4().hex}")
    out = fusion("topics", "--json")
    assert out.returncode == 0, out.stderr
    listed = {t["topic"]: t for t in json.loads(out.stdout)}
    pending_rt = gate.received[0]["return-topic"]
    assert listed[pending_rt]["owner"] == services_worker.name and listed[pending_rt]["target"] == gate_topic
    assert listed[orphan]["owner"] is None and listed[orphan]["age_s"] >= 199
    table = fusion("topics")
    assert pending_rt in table.stdout and "(orphan)" in table.stdout

    out = fusion("reap", "--grace", "100")
    assert out.returncode == 0, out.stderr
    assert f"deleted {orphan}" in out.stdout and pending_rt not in out.stdout
    kit.created.remove(orphan)
    gate.release()
    kit.read(back, 1, timeout=60)


def test_graph_mermaid_and_dot(services_worker):
    out = fusion("graph", topic_name("math"), "[1, 2, 3]")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("flowchart LR") and "d_one --> d_two" in out.stdout
    out = fusion("graph", topic_name("fanout"), "[1, 2]", "--format", "dot")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("digraph deps {") and '"sum" -> "proc_fn";' in out.stdout
    one_line_error(fusion("graph", "nothing-here", "1"), "no reactor serves topic 'nothing-here'")
    one_line_error(fusion("graph", topic_name("add"), "1"), "has no deps")


@pytest.mark.broker
def test_status_shows_pending_waits(services_worker, service, kit):
    gate_topic, gate, back = pending_wait(kit, service)

    def shown():
        out = fusion("status", "--json")
        return out.returncode == 0 and json.loads(out.stdout).get(services_worker.name, {}).get("by_topic", {})\
            .get(gate_topic) == 1 and out

    out = wait_for(shown, 60, "the waiter to report the pending wait")
    st = json.loads(out.stdout)[services_worker.name]
    assert st["pending"] >= 1 and st["oldest_age_s"] >= 0
    assert gate_topic in fusion("status").stdout
    gate.release()
    kit.read(back, 1, timeout=60)
