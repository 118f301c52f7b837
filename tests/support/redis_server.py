"""A private ``redis-server`` a test starts, stops and restarts without touching the stack's Redis."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

from support.waiting import wait_for

__all__ = ["redis_server"]


def redis_server(port: int, data_dir: Path) -> subprocess.Popen:
    """Start a private, non-persistent ``redis-server`` on ``port`` and wait until it accepts connections."""
    server = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                               "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(data_dir)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return server.poll() is not None

    wait_for(up, 30, f"redis-server on port {port}", interval=0.05)
    assert server.poll() is None, f"redis-server on port {port} exited with {server.returncode}"
    return server
