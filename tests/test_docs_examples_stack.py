"""The main page's example and the raw Python caller of the docs, run against the real stack.

The main page's block is saved as a module and served by a real ``celery -A fusion_celery
worker`` (``FUSION_IMPORTS``); a client process runs the same block, as a user would, and
prints the pipeline's answer. The raw caller of "Other languages" (confluent-kafka only, no
Celery) then calls the same reactor. ``tests/test_docs_examples.py`` runs the other blocks in
process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.stack import KAFKA, ROOT
from support.workers import Worker, isolated_env
from test_docs_examples import block

pytestmark = pytest.mark.integration

MAIN = "index.md: from fusion_celery import reactor, Pipeline"
RAW_CALLER = "guides/other-languages.md: import json, time, uuid"
TOPICS = ("add", "subtract", "math")


@pytest.fixture(scope="module")
def served(tmp_path_factory, stack, kit) -> Iterator[tuple[Path, dict[str, str]]]:
    """The main page's reactors in a real worker; yields the client's directory and environment."""
    here: Path = tmp_path_factory.mktemp("docs-main")
    definitions, call = block(MAIN).code.rstrip().rsplit("\n", 1)
    (here / "docs_main_page.py").write_text(definitions + "\n")
    (here / "docs_main_client.py").write_text(f"{definitions}\nprint({call.split('#')[0].strip()})\n")
    env = {**isolated_env(), "PYTHONPATH": f"{here}:{ROOT}"}
    worker = Worker("docs", "docs_main_page", env=env).start()
    try:
        yield here, {**os.environ, **env, "FUSION_IMPORTS": ""}
    finally:
        worker.stop()
        names = {*TOPICS, *(f"{t}.dlq" for t in TOPICS)}
        kit.admin.delete_topics([t for t in kit.topics() if t in names])


def python(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_main_page_example_answers_4_from_a_real_worker(served):
    here, env = served
    out = python([str(here / "docs_main_client.py")], env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "4"  # add([1, 2, 3]) = 6, then subtract([6, 2]) = 4


def test_raw_python_caller_of_other_languages_gets_ok_4(served):
    _, env = served
    code = block(RAW_CALLER).code.replace('servers = "localhost:9092"', f'servers = "{KAFKA}"')
    assert f'servers = "{KAFKA}"' in code
    out = python(["-c", code], env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "b'ok' 4"  # the block's comment
