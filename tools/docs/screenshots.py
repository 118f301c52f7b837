"""Take the docs' screenshots of Flower and of the metrics from a real run, in Debian's headless Chromium.

    set -a; . .stack/env; set +a          # the local stack (make up)
    python tools/docs/screenshots.py [--out docs/assets] [--calls 300]

With the stack up, this starts

- ``celery -A fusion_celery worker`` serving ``examples.math.reactors`` with its metrics on a free port
  (``FUSION_METRICS_PORT``), its own Celery databases and registry, and its own topic prefix;
- ``celery -A fusion_celery flower`` on a free port;
- Debian's ``prometheus`` (``apt-get install -y prometheus``), scraping the worker every second, with its
  data in a temporary directory;

then makes one call of the ``math`` pipeline and saves what Flower shows of it:
``flower-tasks.png`` (the Tasks tab) and ``flower-pipeline.png`` (the pipeline's task page, with its
children); then ``--calls`` more calls, 20 in flight, and saves Prometheus's graph of the reply latency
and of the replies by status: ``metrics-latency.png`` and ``metrics-replies.png``. Everything it
started is stopped, and the topics it made are deleted. Each wait has a deadline; a failure says what
did not come up and where its log is.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOGS = ROOT / ".stack" / "logs"
CHROMIUM = os.environ.get("FUSION_CHROMIUM", "/usr/bin/chromium")
PROMETHEUS = os.environ.get("FUSION_PROMETHEUS", "/usr/bin/prometheus")


class ShotError(Exception):
    """Something did not come up; the message says what and where its log is."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond: Callable[[], object], timeout: float, what: str, log: Path | None = None) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, LookupError):
            if found := cond():
                return found
        time.sleep(0.25)
    raise ShotError(f"{what}: not there after {timeout:.0f}s" + (f" (log {log})" if log else ""))


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)


@contextlib.contextmanager
def process(name: str, cmd: list[str], env: dict[str, str]) -> Iterator[Path]:
    """Run ``cmd`` in its own session while the block runs (SIGTERM, then SIGKILL); yields its log."""
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / f"screenshots-{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield log
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)


def prometheus_config(directory: Path, metrics_port: int) -> Path:
    path = directory / "prometheus.yml"
    path.write_text(f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: fusion-worker
    static_configs:
      - targets: ["127.0.0.1:{metrics_port}"]
""")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/docs/screenshots.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "assets")
    parser.add_argument("--calls", type=int, default=300, help="pipeline calls for the metrics (default 300)")
    parser.add_argument("--prefix", default="", help="FUSION_EXAMPLES_PREFIX of the example's topics (default none: "
                                                      "the names a user of `make demo` sees)")
    args = parser.parse_args(argv)
    for tool in (CHROMIUM, PROMETHEUS):
        if not Path(tool).exists():
            print(f"{tool} is missing: apt-get install -y {Path(tool).name}", file=sys.stderr)
            return 2
    from playwright.sync_api import sync_playwright

    tag = uuid.uuid4().hex[:6]
    prefix = args.prefix
    broker = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0").rsplit("/", 1)[0]
    metrics_port, flower_port, prometheus_port = free_port(), free_port(), free_port()
    env = {**os.environ, "FUSION_IMPORTS": "examples.math.reactors", "FUSION_EXAMPLES_PREFIX": prefix,
           "CELERY_BROKER_URL": f"{broker}/12", "CELERY_RESULT_BACKEND": f"{broker}/13",
           "FUSION_REGISTRY_URL": f"kafka://fusion.waits.shots-{tag}", "FUSION_METRICS_PORT": str(metrics_port),
           "FUSION_METRICS_ADDRESS": "127.0.0.1", "PYTHONPATH": str(ROOT)}
    os.environ.update({k: env[k] for k in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "FUSION_REGISTRY_URL",
                                            "FUSION_EXAMPLES_PREFIX")})
    celery = [sys.executable, "-m", "celery", "-A", "fusion_celery"]
    data = Path(tempfile.mkdtemp(prefix="fusion-prometheus-"))
    try:
        with contextlib.ExitStack() as stack:
            worker_log = stack.enter_context(process("worker", [*celery, "worker", "-n", f"shots-{tag}@%h", "-c", "4",
                                                                "-l", "info", "-E"], env))
            flower_log = stack.enter_context(process("flower", [*celery, "flower", f"--port={flower_port}",
                                                                "--address=127.0.0.1"],
                                                     {**env, "FLOWER_UNAUTHENTICATED_API": "1"}))
            prometheus_log = stack.enter_context(process("prometheus", [
                PROMETHEUS, f"--config.file={prometheus_config(data, metrics_port)}", f"--storage.tsdb.path={data}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}"], env))
            wait_until(lambda: b"fusion-celery: serving" in worker_log.read_bytes(), 120, "the worker", worker_log)
            flower = f"http://127.0.0.1:{flower_port}"
            wait_until(lambda: urllib.request.urlopen(f"{flower}/healthcheck", timeout=2).status == 200, 60,
                       "Flower", flower_log)
            prometheus = f"http://127.0.0.1:{prometheus_port}"
            wait_until(lambda: get_json(f"{prometheus}/api/v1/targets")["data"]["activeTargets"][0]["health"] == "up",
                       60, "Prometheus scraping the worker", prometheus_log)

            sys.path.insert(0, str(ROOT))
            from examples import topic
            from fusion_celery import FusionError, Pipeline
            math = Pipeline(topic("math"))
            first = math.delay(None, timeout=60)
            assert first.get(timeout=90) == 4
            tasks = wait_until(lambda: (t := get_json(f"{flower}/api/tasks")) and len(t) >= 6
                               and all(v["state"] == "SUCCESS" for v in t.values()) and t, 60,
                               "Flower to show the call's six tasks as SUCCESS", flower_log)
            print(f"one call of {topic('math')!r}: {len(tasks)} tasks in Flower", flush=True)
            for task_id, task in sorted(tasks.items(), key=lambda item: item[1]["received"]):
                print(f"  {task['name']} {task_id[:8]} parent={str(task.get('parent_id'))[:8]} "
                      f"children={[c[:8] for c in task.get('children') or []]}", flush=True)

            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1500, "height": 640}, device_scale_factor=1)
                page.goto(f"{flower}/tasks", wait_until="networkidle")
                page.wait_for_selector("text=Showing 1 to")
                page.screenshot(path=str(args.out / "flower-tasks.png"))
                page.set_viewport_size({"width": 1500, "height": 900})
                page.goto(f"{flower}/task/{first.id}", wait_until="networkidle")
                page.screenshot(path=str(args.out / "flower-pipeline.png"), full_page=True)

                def call(i: int) -> str:
                    try:
                        return "ok" if math.delay([i, 1], timeout=60).get(timeout=90) == i - 1 else "wrong"
                    except FusionError as exc:
                        return type(exc).__name__

                with ThreadPoolExecutor(20) as pool:
                    outcomes = list(pool.map(call, range(args.calls)))
                print(f"{args.calls} calls: {outcomes.count('ok')} ok", flush=True)
                replies = urllib.parse.urlencode({"query": "sum(fusion_replies_total)"})
                wait_until(lambda: float(get_json(f"{prometheus}/api/v1/query?{replies}")["data"]["result"][0]
                                         ["value"][1]) >= 3 * (args.calls + 1), 60,
                           "Prometheus to have scraped the replies of every call (3 each: add, subtract, math)",
                           prometheus_log)
                for name, expr in [
                    ("metrics-latency", 'histogram_quantile(0.95, sum by (topic, le) '
                                        '(rate(fusion_wait_duration_seconds_bucket[30s])))'),
                    ("metrics-replies", "sum by (topic, status) (rate(fusion_replies_total[10s]))"),
                ]:
                    query = urllib.parse.urlencode({"g0.expr": expr, "g0.tab": "0", "g0.range_input": "1m"})
                    page.goto(f"{prometheus}/graph?{query}", wait_until="networkidle")
                    page.wait_for_selector("canvas, .graph-legend, .legend", timeout=30_000)
                    page.screenshot(path=str(args.out / f"{name}.png"), full_page=True)
                browser.close()
    except ShotError as exc:
        print(f"screenshots: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(data, ignore_errors=True)
        cleanup(prefix, tag)
    print(f"saved in {args.out}: flower-tasks.png flower-pipeline.png metrics-latency.png metrics-replies.png")
    return 0


def cleanup(prefix: str, tag: str) -> None:
    """Delete the topics of this run: the example's, their dead-letter topics and the registry's."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": os.environ.get("FUSION_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")})
    names = {f"{prefix}{name}{dlq}" for name in ("math", "add", "subtract") for dlq in ("", ".dlq")}
    ours = [t for t in admin.list_topics(timeout=10).topics if t in names or t == f"fusion.waits.shots-{tag}"]
    if ours:
        for future in admin.delete_topics(ours).values():
            with contextlib.suppress(Exception):
                future.result(30)


if __name__ == "__main__":
    sys.exit(main())
