"""The malloc settings a worker applies at start: the arena cap and the pinned mmap threshold (fusion_celery.memory)."""

from __future__ import annotations

import platform
import subprocess
import sys

from fusion_celery.memory import fix_mmap_threshold, limit_malloc_arenas


def test_the_cap_is_set_on_glibc_and_left_to_the_environment_when_it_says():
    """The cap is glibc's (mallopt): set on Linux with glibc, refused elsewhere; MALLOC_ARENA_MAX always wins."""
    code = "from fusion_celery.memory import limit_malloc_arenas as f; print(f(2))"

    def run(env: dict[str, str]) -> str:  # a fresh interpreter: the cap is process-wide
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              check=True).stdout.strip()

    on_glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert run({"PATH": "/usr/bin:/bin"}) == str(on_glibc)
    assert run({"PATH": "/usr/bin:/bin", "MALLOC_ARENA_MAX": "4"}) == "False", "MALLOC_ARENA_MAX must win"


def test_zero_leaves_the_default():
    assert limit_malloc_arenas(0) is False


def test_the_mmap_threshold_is_pinned_on_glibc_and_left_to_the_environment_when_it_says():
    """Pinned with mallopt on glibc, refused elsewhere; MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ /
    GLIBC_TUNABLES always win."""
    code = "from fusion_celery.memory import fix_mmap_threshold as f; print(f(262144))"

    def run(env: dict[str, str]) -> str:
        return subprocess.run([sys.executable, "-c", code], env={"PATH": "/usr/bin:/bin", **env},
                              capture_output=True, text=True, check=True).stdout.strip()

    on_glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert run({}) == str(on_glibc)
    assert run({"MALLOC_MMAP_THRESHOLD_": "131072"}) == "False"
    assert run({"MALLOC_TRIM_THRESHOLD_": "131072"}) == "False"
    assert run({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}) == "False"
    assert fix_mmap_threshold(0) is False
