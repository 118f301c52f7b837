"""What ``make demo`` runs: a worker with the math reactors, Flower, and one pipeline call.

``make demo`` first creates the virtualenv, installs fusion-celery and starts
the local stack (Kafka, Redis, ZooKeeper); then this script

1. starts ``celery -A fusion_celery worker`` serving :mod:`examples.math.reactors`
   and ``celery -A fusion_celery flower``, and waits until both answer;
2. calls the ``math`` pipeline (``add([1, 2, 3])``, then ``subtract([6, 2])``)
   and prints the answer and the Flower address;
3. keeps both running until Ctrl-C (or SIGTERM), then stops them cleanly.

    python -m examples.demo [--once] [--flower-port 5555]

``--once`` (or ``FUSION_DEMO_ONCE=1``) exits right after the call.  Logs go to
``.stack/logs/demo-worker.log`` and ``.stack/logs/demo-flower.log``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOGS = ROOT / ".stack" / "logs"


class DemoError(Exception):
    """Something the demo needs did not come up; the message says what and where to look."""


def wait_until(cond: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None,
               log: Path | None = None) -> None:
    """Poll ``cond`` until it holds; raise :class:`DemoError` naming ``what`` on timeout or if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise DemoError(f"{what}: the process exited with status {proc.returncode}{_tail(log)}")
        if cond():
            return
        time.sleep(0.2)
    raise DemoError(f"{what}: not ready after {timeout:.0f}s{_tail(log)}")


def _tail(log: Path | None, lines: int = 15) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- last lines of {log} ---\n" + "\n".join(text)


class Process:
    """A child process in its own session (Ctrl-C in the terminal reaches only the demo, which stops it)."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        LOGS.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log = LOGS / f"demo-{name}.log"
        self._out = open(self.log, "wb")
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (a warm shutdown for the worker), then SIGKILL if it does not end within ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"{self.name} did not stop within {timeout:.0f}s; killing it", file=sys.stderr)
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._out.close()


def flower_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthcheck", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def check_stack() -> None:
    """Fail with one clear line if Kafka or Redis is not there (``make demo`` starts them)."""
    from fusion_celery import app
    from fusion_celery.clients import clients
    from fusion_celery.errors import ConfigurationError
    from fusion_celery.worker import check_backend
    try:
        clients(app).check_reachable(15)
        check_backend(app)
    except ConfigurationError as exc:
        raise DemoError(f"{exc} -- start the local stack with `make up` (or run `make demo`)") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", default=os.environ.get("FUSION_DEMO_ONCE") == "1",
                        help="exit after the pipeline call (also FUSION_DEMO_ONCE=1)")
    parser.add_argument("--flower-port", type=int, default=int(os.environ.get("FUSION_DEMO_FLOWER_PORT", "5555")),
                        help="Flower's port (default 5555, or FUSION_DEMO_FLOWER_PORT)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for each step (default 120)")
    args = parser.parse_args(argv)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C, even when started with SIGINT ignored
    env = {**os.environ, "FUSION_IMPORTS": "examples.math.reactors",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    celery = [sys.executable, "-m", "celery", "-A", "fusion_celery"]
    flower_url = f"http://127.0.0.1:{args.flower_port}"
    procs: list[Process] = []
    try:
        check_stack()
        print("starting a worker serving examples.math.reactors ...", flush=True)
        worker = Process("worker", [*celery, "worker", "-n", "demo@%h", "-l", "info", "-c", "2"], env)
        procs.append(worker)
        print(f"starting Flower on {flower_url} ...", flush=True)
        flower = Process("flower", [*celery, "flower", f"--port={args.flower_port}", "--address=127.0.0.1"], env)
        procs.append(flower)
        wait_until(lambda: b"fusion-celery: serving" in worker.log.read_bytes(), args.timeout,
                   "the worker", worker.proc, worker.log)
        print(f"worker ready (pid {worker.proc.pid}, log {worker.log.relative_to(ROOT)})", flush=True)
        wait_until(lambda: flower_ready(flower_url), args.timeout, "Flower", flower.proc, flower.log)
        print(f"Flower ready (pid {flower.proc.pid}, log {flower.log.relative_to(ROOT)})", flush=True)

        from celery.exceptions import TimeoutError as CeleryTimeout

        from examples import topic
        from fusion_celery import FusionError, Pipeline
        math = topic("math")
        print(f"calling the {math!r} pipeline: add([1, 2, 3]), then subtract([6, 2]) ...", flush=True)
        started = time.monotonic()
        result = Pipeline(math).delay(None, timeout=args.timeout)
        try:
            answer = result.get(timeout=args.timeout + 30)
        except (FusionError, CeleryTimeout) as exc:
            raise DemoError(f"the {math!r} pipeline failed: {type(exc).__name__}: {exc}{_tail(worker.log)}") \
                from None
        print(f"\nanswer: {answer}   (pipeline {result.id}, {time.monotonic() - started:.2f}s)")
        print(f"Flower: {flower_url}   (Tasks tab: the pipeline, the math reactor, its dispatches and steps)",
              flush=True)
        if args.once:
            return 0
        print("\nIn another terminal (after `. .venv/bin/activate`), try:\n"
              f"  python -m examples.math.client '[10, 20]'\n"
              f"  celery -A fusion_celery fusion call {math} '[1, 2, 3]' --wait\n"
              f"  celery -A fusion_celery fusion graph {math} '[1, 2, 3]'\n"
              "Press Ctrl-C to stop the worker and Flower.", flush=True)
        while not stop.wait(0.5):
            for p in procs:
                if p.proc.poll() is not None:
                    raise DemoError(f"the {p.name} exited with status {p.proc.returncode}{_tail(p.log)}")
        return 0
    except KeyboardInterrupt:
        return 0
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the clean stop
        for p in reversed(procs):
            print(f"stopping the {p.name} (pid {p.proc.pid}) ...", flush=True)
            p.stop()
        if procs:
            print("stopped.", flush=True)


if __name__ == "__main__":
    sys.exit(main())
