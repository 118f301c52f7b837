"""The processes of a run (workers, services, the consumer-per-wait reactor) and their CPU and memory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

__all__ = ["Proc", "Usage", "stack_pid", "wait_until"]

ROOT = Path(__file__).resolve().parent.parent


def wait_until(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``cond`` until truthy; raise ``TimeoutError`` naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def stack_pid(service: str) -> int | None:
    """The pid of a service of the local stack (from ``.stack/pids``), if it runs."""
    try:
        pid = int((ROOT / ".stack" / "pids" / f"{service}.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if psutil.pid_exists(pid) else None


class Usage:
    """CPU seconds and memory of a process and its children."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)

    def tree(self) -> list[psutil.Process]:
        try:
            return [self.proc, *self.proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self.tree():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def memory(self) -> dict[str, float]:
        """RSS in MiB of the main process, of its children, and their sum; thread count of the main one."""
        main = children = 0
        threads = 0
        for i, p in enumerate(self.tree()):
            try:
                rss = p.memory_info().rss
                if i == 0:
                    main, threads = rss, p.num_threads()
                else:
                    children += rss
            except psutil.NoSuchProcess:
                pass
        mib = 1024 * 1024
        return {"main_mib": main / mib, "children_mib": children / mib, "total_mib": (main + children) / mib,
                "threads": threads}

    def connections(self) -> int:
        try:
            return len(self.proc.net_connections(kind="tcp"))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return -1


class Proc:
    """A helper process started by the orchestrator (own session, output to a log file)."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], logdir: Path) -> None:
        self.name, self.cmd = name, cmd
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
        self.log_path = logdir / f"{name}.log"
        self.status_path = str(logdir / f"{name}.status.json")
        self.proc: subprocess.Popen | None = None

    @classmethod
    def python(cls, name: str, module: str, args: list[str], env: dict[str, str], logdir: Path) -> Proc:
        return cls(name, [sys.executable, "-m", module, *args], env, logdir)

    def start(self) -> Proc:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log {self.log_path}:\n"
                               f"{self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def usage(self) -> Usage:
        return Usage(self.pid)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL of its process group after ``timeout`` seconds."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        else:  # its children (a prefork pool) may outlive a dead main process
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()
        return self.proc.returncode
