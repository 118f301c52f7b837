"""The Python examples of the docs run, and do what their comments say.

Every ```` ```python ```` block of ``docs/`` is listed in :data:`HOW` with how it is checked:
run against an in-process app (:func:`fusion_celery.testing.in_process_app`, a real Celery
worker in a thread, Kafka and Redis in memory) with its answers compared with the ones the page
shows, validated as a deps-map, compared with the signature it shows, or only compiled, with
the reason it cannot run here.  A block added to the docs fails :func:`test_every_block_is_listed`
until it is listed.  Blocks pulled from ``examples/`` (``--8<--``) are run by
``tests/test_examples.py``; ``tests/test_docs_examples_stack.py`` runs the main page's example and the
raw Python caller against the real stack.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from celery import Celery
from support.arithmetic import arithmetic
from support.stack import ROOT

import fusion_celery
from fusion_celery import DepsGraph, Message, reactor
from fusion_celery.testing import in_process_app, worker
from fusion_celery.testing.kafka import Producer

DOCS = ROOT / "docs"
FENCE = re.compile(r"^(?P<indent> *)```python[^\n]*\n(?P<body>.*?)^(?P=indent)```", re.S | re.M)
TIMEOUT = 15.0


@dataclass(frozen=True)
class Block:
    """One ```` ```python ```` block of a page: where it is and its code (dedented)."""

    page: str
    line: int
    code: str

    @property
    def key(self) -> str:
        """``page: first line``: how :data:`HOW` names the block (stable while the block moves)."""
        return f"{self.page}: {self.code.strip().splitlines()[0].strip()}"


def docs_blocks() -> list[Block]:
    """Every Python block of ``docs/`` that is written in the page (not pulled from a file)."""
    found = []
    for path in sorted(DOCS.rglob("*.md")):
        text = path.read_text()
        for m in FENCE.finditer(text):
            code = textwrap.dedent(m.group("body"))
            if all(not ln.strip() or ln.lstrip().startswith("--8<--") for ln in code.splitlines()):
                continue
            found.append(Block(str(path.relative_to(DOCS)), text[:m.start()].count("\n") + 1, code))
    return found


#: How each block is checked: ``run`` (a test below runs it), ``deps-map`` (a dict literal validated by
#: DepsGraph), ``signature <name>`` (the signature of ``fusion_celery.<name>``), or ``compile: <why>``.
HOW: dict[str, str] = {
    "index.md: from fusion_celery import reactor, Pipeline": "run",
    "concepts.md: {\"one\": {\"topic\": \"add\", \"args\": [1, 2, 3]},": "deps-map",
    "fusion-clj.md: from fusion_celery import reactor": "run",
    "guides/deps-maps.md: def math_deps(message):": "run",
    "guides/deps-maps.md: {\"a\": {\"topic\": \"ta\", \"args\": [1]},": "run",
    "guides/deps-maps.md: from fusion_celery import register_arg_in_fn": "run",
    "guides/deps-maps.md: def order_deps(message):": "run",
    "guides/deps-maps.md: @reactor(\"quote\", reply=\"shared\", deps=lambda m: {": "run",
    "guides/managed-kafka.md: import os": "compile: a managed cluster's address and credentials",
    "guides/managed-kafka.md: from confluent_kafka.admin import AdminClient, ScramCredentialInfo, "
    "ScramMechanism, UserScramCredentialUpsertion":
        "compile: the stack's super user does this for tests/test_security.py (stack/stack.sh)",
    "guides/managed-kafka.md: from aws_msk_iam_sasl_signer import MSKAuthTokenProvider   "
    "# your provider's token library": "compile: a cloud provider's token library",
    "guides/other-languages.md: import json, time, uuid": "compile: needs a real Kafka; "
                                                        "tests/test_docs_examples_stack.py runs it",
    "guides/pipelines.md: from fusion_celery import Pipeline": "run",
    "guides/pipelines.md: math.delay([1, 2, 3], key=\"account-42\")": "run",
    "guides/pipelines.md: math = Pipeline(\"math\", reply=\"shared\")            "
    "# a fusion reactor: shared topics, none per call": "run",
    "guides/pipelines.md: result = Pipeline(\"math\").delay([1, 2, 3])": "run",
    "guides/pipelines.md: Pipeline(\"audit\").delay({\"event\": \"login\"}, wait=False).get(timeout=30)": "run",
    "guides/pipelines.md: from celery.result import AsyncResult": "run",
    "guides/pipelines.md: from celery import Celery":
        "compile: a client on the user's own hosts; tests/test_pipeline.py makes the same call from a "
        "Kafka-less client against the real stack",
    "guides/pipelines.md: from celery import chain, chord, group": "run",
    "guides/reactors.md: from fusion_celery import reactor": "run",
    "guides/reactors.md: reactor(topic, *, deps=None, app=None, name=None, group=None, partitions=None, "
    "reply=None, **task_options)": "signature reactor",
    "guides/reactors.md: @reactor(\"echo\")": "run",
    "guides/reactors.md: from fusion_celery import Reactor": "run",
    "guides/reactors.md: from fusion_celery import app, run_id": "run",
    "guides/reactors.md: from fusion_celery.signals import reactor_result": "run",
    "guides/reactors.md: from fusion_celery.signals import wait_timed_out": "run",
    "guides/reactors.md: app.conf.task_routes = {\"fusion.reactor.thumbnails*\": {\"queue\": \"images\"}}": "run",
    "guides/registries.md: app.conf.fusion_registry_url = \"kafka://fusion.waits\"                          "
    "# the default": "run",
    "guides/registries.md: from celery import Celery": "run",
    "guides/registries.md: app.conf.update(fusion_registry_url=\"zookeeper://zk1:2181,zk2:2181,zk3:2181/fusion\",":
        "run",
    "guides/scaling.md: app.conf.task_routes = {\"fusion.reactor.render*\": {\"queue\": \"heavy\"}}   "
    "# the run and its processing step": "run",
    "guides/testing.md: import pytest": "run",
    "guides/testing.md: from confluent_kafka import OFFSET_BEGINNING, TopicPartition": "run",
    "operations/topics.md: app.conf.fusion_return_topic_pool = 16   "
    "# or FUSION_RETURN_TOPIC_POOL=16 in the environment": "run",
    "reference/api.md: from fusion_celery import (app, create_app, install, reactor, Reactor, Pipeline, Message, "
    "DepsGraph,": "run",
    "reference/settings.md: from fusion_celery import app": "run",
}

BLOCKS = {b.key: b for b in docs_blocks()}


def block(key: str) -> Block:
    assert key in BLOCKS, f"no Python block {key!r} in docs/ (a page changed: update HOW)"
    return BLOCKS[key]


def run_block(key: str, ns: dict[str, Any]) -> list[Any]:
    """Execute a block in ``ns`` and return the value of each of its top-level expression statements."""
    b = block(key)
    values: list[Any] = []
    ns["__values__"] = values
    tree = ast.parse(b.code, filename=f"docs/{b.page}")
    for i, node in enumerate(tree.body):
        if isinstance(node, ast.Expr):
            call = ast.Call(ast.Attribute(ast.Name("__values__", ast.Load()), "append", ast.Load()), [node.value], [])
            tree.body[i] = ast.copy_location(ast.Expr(call), node)
    ast.fix_missing_locations(tree)
    exec(compile(tree, f"docs/{b.page}:{b.line}", "exec"), ns)
    return values


@contextmanager
def docs_app(monkeypatch: pytest.MonkeyPatch, **conf: Any) -> Iterator[Celery]:
    """An in-process app that stands for the docs' ``fusion_celery.app`` while the block runs."""
    app = in_process_app("docs", fusion_default_timeout=TIMEOUT, **conf)
    monkeypatch.setattr(fusion_celery, "app", app)
    yield app


# -- every block is listed, parses, and the static ones say what the code says ----------------------
def test_every_block_is_listed():
    unlisted = sorted(set(BLOCKS) - set(HOW))
    stale = sorted(set(HOW) - set(BLOCKS))
    assert not unlisted, f"Python blocks of docs/ that no test checks (add them to HOW): {unlisted}"
    assert not stale, f"HOW lists blocks that are no longer in docs/: {stale}"
    for key, how in HOW.items():
        assert how in ("run", "deps-map") or how.startswith(("signature ", "compile: ")), f"{key}: {how!r}"


@pytest.mark.parametrize("key", [k for k, how in HOW.items() if not how.startswith("signature ")])
def test_block_compiles(key):
    b = block(key)
    compile(b.code, f"docs/{b.page}:{b.line}", "exec")


@pytest.mark.parametrize("key", [k for k, how in HOW.items() if how == "deps-map"])
def test_deps_map_block_is_valid(key):
    DepsGraph(ast.literal_eval(block(key).code))


@pytest.mark.parametrize("key", [k for k, how in HOW.items() if how.startswith("signature ")])
def test_signature_block_matches_the_code(key):
    shown = ast.parse(f"def {block(key).code.strip()}: ...").body[0].args
    params = inspect.signature(getattr(fusion_celery, HOW[key].removeprefix("signature "))).parameters.values()

    def names(kind: inspect._ParameterKind) -> list[str]:
        return [p.name for p in params if p.kind is kind]

    assert [a.arg for a in shown.args] == names(inspect.Parameter.POSITIONAL_OR_KEYWORD)
    assert [a.arg for a in shown.kwonlyargs] == names(inspect.Parameter.KEYWORD_ONLY)
    assert ([shown.kwarg.arg] if shown.kwarg else []) == names(inspect.Parameter.VAR_KEYWORD)
    defaults = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    for arg, default in zip(shown.kwonlyargs, shown.kw_defaults, strict=True):
        assert default is not None and ast.literal_eval(default) == defaults[arg.arg], arg.arg


# -- the blocks that run ------------------------------------------------------------------------------
def test_main_page_example_answers_4(monkeypatch):
    b = block("index.md: from fusion_celery import reactor, Pipeline")
    definitions, call = b.code.rstrip().rsplit("\n", 1)
    ns: dict[str, Any] = {}
    with docs_app(monkeypatch) as app:
        exec(compile(definitions, f"docs/{b.page}", "exec"), ns)
        with worker(app):
            assert eval(compile(call.replace(".get()", f".get(timeout={TIMEOUT})"), f"docs/{b.page}", "eval"), ns) == 4


def test_fusion_clj_page_and_deps_maps_page_define_the_seed_math(monkeypatch):
    for key in ("fusion-clj.md: from fusion_celery import reactor", "guides/deps-maps.md: def math_deps(message):"):
        with docs_app(monkeypatch) as app:
            arithmetic(app)
            run_block(key, {"reactor": reactor})
            with worker(app):
                assert fusion_celery.Pipeline("math").delay(None).get(timeout=TIMEOUT) == 4, key


def test_deps_maps_page_injection_order(monkeypatch):
    """The comments of the injection example: b gets ["b0", A], c [A, "c0"], d [C, B]."""
    key = "guides/deps-maps.md: {\"a\": {\"topic\": \"ta\", \"args\": [1]},"
    deps_map = ast.literal_eval(block(key).code)
    with docs_app(monkeypatch) as app:
        @reactor("ta", app=app)
        def ta(message):
            return "A"

        def tagged(tag: str) -> Any:
            return lambda message: {tag: message.data}

        for name in ("tb", "tc", "td"):
            reactor(name, app=app)(tagged(name[1].upper()))

        @reactor("docs-injection", app=app, deps=deps_map)
        def combine(message, results):
            return results

        with worker(app):
            results = fusion_celery.Pipeline("docs-injection").delay(None).get(timeout=TIMEOUT)
    assert results["b"] == {"B": ["b0", "A"]}
    assert results["c"] == {"C": ["A", "c0"]}
    assert results["d"] == {"D": [{"C": ["A", "c0"]}, {"B": ["b0", "A"]}]}


def test_deps_maps_page_custom_injection_function(monkeypatch):
    key = "guides/deps-maps.md: from fusion_celery import register_arg_in_fn"
    ns: dict[str, Any] = {}
    run_block(key, ns)
    entry = ast.literal_eval(block(key).code.rstrip().rsplit("\n", 1)[1].lstrip("# "))
    with docs_app(monkeypatch) as app:
        @reactor("fetch", app=app)
        def fetch(message):
            return {"text": "kafka and celery"}

        @reactor("keywords", app=app)
        def keywords(message):
            return sorted(message.data["text"].split())[: message.data["top"]]

        @reactor("docs-keywords", app=app, deps={"fetch": {"topic": "fetch", "args": []}, **entry})
        def summary(message, results):
            return results["keywords"]

        with worker(app):
            assert fusion_celery.Pipeline("docs-keywords").delay(None).get(timeout=TIMEOUT) == [
                "and", "celery", "kafka"]


def test_deps_maps_page_keys_and_reply_channels(monkeypatch):
    with docs_app(monkeypatch) as app:
        ns: dict[str, Any] = {"reactor": reactor}
        run_block("guides/deps-maps.md: def order_deps(message):", ns)
        graph = DepsGraph(ns["order_deps"](Message("orders", data={"items": ["sku-1"], "warehouse": 3})))
        assert graph.deps["stock"].key == "warehouse-3" and graph.deps["price"].key is None
        run_block("guides/deps-maps.md: @reactor(\"quote\", reply=\"shared\", deps=lambda m: {", ns)
        assert "fusion.reactor.quote" in app.tasks


def test_pipelines_page(monkeypatch):
    with docs_app(monkeypatch) as app:
        arithmetic(app)
        ns: dict[str, Any] = {}

        @reactor("math", app=app, deps=lambda m: {
            "one": {"topic": "add", "args": m.data},
            "two": {"topic": "subtract", "args": [2], "arg_in_fn": "cons", "deps": ["one"]}})
        def math(message, results):
            return results["two"]

        @reactor("echo", app=app)
        def echo(message):
            return message.data

        audited = []

        @reactor("audit", app=app)
        def audit(message):
            audited.append(message.data)

        @app.task
        def my_celery_task(value):
            return value

        ns["my_celery_task"] = my_celery_task
        with worker(app):
            assert run_block("guides/pipelines.md: from fusion_celery import Pipeline", ns)[-1] == 4
            keyed, fire = run_block("guides/pipelines.md: math.delay([1, 2, 3], key=\"account-42\")", ns)
            assert keyed.get(timeout=TIMEOUT) == 4
            assert fire.get(timeout=TIMEOUT)["topic"] == "audit"
            run_block("guides/pipelines.md: math = Pipeline(\"math\", reply=\"shared\")            "
                      "# a fusion reactor: shared topics, none per call", ns)
            assert ns["math"].delay([1, 2, 3]).get(timeout=TIMEOUT) == 4
            state, info, answer = run_block("guides/pipelines.md: result = Pipeline(\"math\").delay([1, 2, 3])", ns)
            assert answer == 4 and ns["result"].state == "SUCCESS"
            record = run_block("guides/pipelines.md: Pipeline(\"audit\").delay({\"event\": \"login\"}, "
                               "wait=False).get(timeout=30)", ns)[0]
            assert set(record) == {"topic", "partition", "offset", "timestamp"} and record["topic"] == "audit"
            assert run_block("guides/pipelines.md: from celery.result import AsyncResult", ns)[-1] == 3
            echoed, added, chorded, mixed = run_block("guides/pipelines.md: from celery import chain, chord, group",
                                                      ns)
            assert (echoed, added, chorded) == (4, [1, 2, 3, 4], 6)
            assert mixed.get(timeout=TIMEOUT) == 4
        assert {"event": "login"} in audited


def test_reactors_page(monkeypatch):
    with docs_app(monkeypatch) as app:
        arithmetic(app)

        @reactor("tax-rates", app=app)
        def tax(message):
            return 0.25

        @reactor("stock", app=app)
        def stock(message):
            return 3

        ns: dict[str, Any] = {"reactor": reactor,
                              "report_deps": lambda m: {"tax": {"topic": "tax-rates", "args": ["fr"]}}}
        run_block("guides/reactors.md: from fusion_celery import reactor", ns)
        run_block("guides/reactors.md: @reactor(\"echo\")", ns)
        run_block("guides/reactors.md: from fusion_celery import Reactor", ns)
        run_block("guides/reactors.md: app.conf.task_routes = {\"fusion.reactor.thumbnails*\": "
                  "{\"queue\": \"images\"}}", {**ns, "app": app})
        assert app.tasks["fusion.reactor.thumbnails"].time_limit == 120
        for step in ("fusion.reactor.thumbnails", "fusion.reactor.thumbnails.process"):
            assert queue_of(app, step) == "images", step
        assert ns["Quote"].task.rate_limit == "50/s"
        seen: list[Any] = []
        ns.update(log=Logged(seen), alerts=Logged(seen))
        run_block("guides/reactors.md: from fusion_celery.signals import reactor_result", ns)
        run_block("guides/reactors.md: from fusion_celery.signals import wait_timed_out", ns)
        try:
            with worker(app):
                Pipeline = fusion_celery.Pipeline
                assert Pipeline("prices").delay({"sku": "A-1", "quantity": 2}).get(timeout=TIMEOUT) == {
                    "item": "A-1", "price": 25.0}
                assert Pipeline("echo").delay([1]).get(timeout=TIMEOUT) == [1]
                assert Pipeline("report").delay("q1").get(timeout=TIMEOUT) == {"tax": 0.25, "for": "q1"}
                assert Pipeline("quotes").delay({"country": "fr", "sku": "A-1"}).get(timeout=TIMEOUT) == {
                    "price": 12.5, "in_stock": True}
                rec = delivery_record(app, "add", {"data": [1, 2]})
                ns["producer_delivery_record"] = rec
                assert run_block("guides/reactors.md: from fusion_celery import app, run_id", ns)[-1] == 3
        finally:
            fusion_celery.signals.reactor_result.disconnect(ns["audit"])
            fusion_celery.signals.wait_timed_out.disconnect(ns["page"])
        assert any("run " in line and "of prices" in line for line in seen), seen


def queue_of(app: Celery, task_name: str) -> str:
    """The queue Celery's router sends ``task_name`` to."""
    return app.amqp.router.route({}, task_name)["queue"].name


class Logged:
    """Stands for the page's ``log`` and ``alerts``: keeps what they were given."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def info(self, fmt: str, *args: Any) -> None:
        self.lines.append(fmt % args)

    def send(self, text: str) -> None:
        self.lines.append(text)


def delivery_record(app: Celery, topic: str, request: dict[str, Any]) -> Any:
    """The delivery report of a request produced to ``topic`` of the app's in-memory Kafka."""
    reports: list[Any] = []
    producer = Producer({"bootstrap.servers": app.conf.fusion_kafka_bootstrap_servers})
    producer.produce(topic, json.dumps(request).encode(), on_delivery=lambda err, msg: reports.append(msg))
    producer.flush(5)
    assert reports and reports[0].error() is None
    return reports[0]


def test_registries_and_settings_blocks_set_settings(monkeypatch):
    monkeypatch.setenv("FUSION_ZK_PASSWORD", "secret")
    with docs_app(monkeypatch) as app:
        import os

        ns: dict[str, Any] = {"app": app, "os": os}
        run_block("guides/registries.md: app.conf.fusion_registry_url = \"kafka://fusion.waits\"                  "
                  "        # the default", ns)
        assert app.conf.fusion_registry_url == "zookeeper://zk1:2181,zk2:2181,zk3:2181/fusion"
        run_block("guides/registries.md: app.conf.update(fusion_registry_url=\"zookeeper://zk1:2181,zk2:2181,"
                  "zk3:2181/fusion\",", ns)
        assert app.conf.fusion_zookeeper_password == "secret"
        run_block("operations/topics.md: app.conf.fusion_return_topic_pool = 16   "
                  "# or FUSION_RETURN_TOPIC_POOL=16 in the environment", ns)
        assert app.conf.fusion_return_topic_pool == 16
        run_block("reference/settings.md: from fusion_celery import app", {})
        assert app.conf.fusion_imports == ["shop.reactors"]
        run_block("reference/api.md: from fusion_celery import (app, create_app, install, reactor, Reactor, "
                  "Pipeline, Message, DepsGraph,", {})
        ns = {}
        run_block("guides/registries.md: from celery import Celery", ns)
        from fusion_celery.registry import Registry
        assert issubclass(ns["EtcdRegistry"], Registry)
        assert {"register", "remove", "watch", "pending"} <= set(vars(ns["EtcdRegistry"]))
        with docs_app(monkeypatch) as app:
            run_block("guides/scaling.md: app.conf.task_routes = {\"fusion.reactor.render*\": "
                      "{\"queue\": \"heavy\"}}   # the run and its processing step", {"reactor": reactor, "app": app})
            assert queue_of(app, "fusion.reactor.render") == queue_of(app, "fusion.reactor.render.process") == "heavy"


def test_testing_page_module_passes_under_pytest(tmp_path):
    """The testing guide's test module, as a user would save and run it."""
    (tmp_path / "test_math_docs.py").write_text(block("guides/testing.md: import pytest").code)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout


def test_testing_page_dead_letter_example(monkeypatch):
    with docs_app(monkeypatch) as app:
        arithmetic(app)
        with worker(app):
            ns: dict[str, Any] = {"app": app}
            run_block("guides/testing.md: from confluent_kafka import OFFSET_BEGINNING, TopicPartition", ns)
            letter = ns["letter"]
            assert letter is not None and letter.error() is None
            assert dict(letter.headers())["fusion-dlq-reason"]
            ns["dlq"].close()
