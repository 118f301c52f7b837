"""The malloc settings a worker applies at start: the arena cap and the pinned mmap threshold (fusion_celery.malloc)."""

from __future__ import annotations

import platform
import subprocess
import sys

from fusion_celery.malloc import fix_mmap_threshold, limit_malloc_arenas

ON_GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _in_fresh_interpreter(call: str, env: dict[str, str]) -> str:
    """What ``fusion_celery.malloc.<call>`` returns in a fresh interpreter (the settings are process-wide)."""
    code = f"from fusion_celery import malloc; print(malloc.{call})"
    return subprocess.run([sys.executable, "-c", code], env={"PATH": "/usr/bin:/bin", **env}, capture_output=True,
                          text=True, check=True).stdout.strip()


def test_the_cap_is_set_on_glibc_and_left_to_the_environment_when_it_says():
    """The cap is glibc's (mallopt): set on Linux with glibc, refused elsewhere; MALLOC_ARENA_MAX always wins."""
    assert _in_fresh_interpreter("limit_malloc_arenas(2)", {}) == str(ON_GLIBC)
    assert _in_fresh_interpreter("limit_malloc_arenas(2)", {"MALLOC_ARENA_MAX": "4"}) == "False", \
        "MALLOC_ARENA_MAX must win"


def test_zero_leaves_the_default():
    assert limit_malloc_arenas(0) is False


def test_the_mmap_threshold_is_pinned_on_glibc_and_left_to_the_environment_when_it_says():
    """Pinned with mallopt on glibc, refused elsewhere; MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ /
    GLIBC_TUNABLES always win."""
    call = "fix_mmap_threshold(262144)"
    assert _in_fresh_interpreter(call, {}) == str(ON_GLIBC)
    for env in ({"MALLOC_MMAP_THRESHOLD_": "131072"}, {"MALLOC_TRIM_THRESHOLD_": "131072"},
                {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}):
        assert _in_fresh_interpreter(call, env) == "False", f"{env} must win"
    # another glibc tunable with "threshold" in its name is not one of ours
    assert _in_fresh_interpreter(call, {"GLIBC_TUNABLES": "glibc.cpu.x86_non_temporal_threshold=0x100000"}) == \
        str(ON_GLIBC)
    assert fix_mmap_threshold(0) is False
