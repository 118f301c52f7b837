"""Every example in examples/ runs here against the real stack, so none of them can rot.

Each test gets its own topic prefix (``FUSION_EXAMPLES_PREFIX``), Celery broker
and backend databases and registry topic (``isolated_env()``), so the examples'
workers never take work from the session worker or from each other.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from support.ports import free_port
from support.stack import ROOT, RUN_ID
from support.waiting import wait_for
from support.workers import isolated_env


def run(module: str, *args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` from the repository root, as a person would."""
    return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def example_env(kit) -> Iterator[dict[str, str]]:
    """Environment for an example: isolated Celery databases and registry, a fresh topic prefix."""
    tag = uuid.uuid4().hex[:6]
    prefix = f"ex.{RUN_ID}.{tag}."
    env = {**os.environ, **isolated_env(), "FUSION_EXAMPLES_PREFIX": prefix, "PYTHONPATH": str(ROOT)}
    yield env
    registry = env["FUSION_REGISTRY_URL"].removeprefix("kafka://")
    leftovers = [t for t in kit.topics() if t.startswith(prefix) or t == registry]
    if leftovers:
        kit.admin.delete_topics(leftovers)


@contextmanager
def plain_service(env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """``python -m examples.plain_service.language`` as its own process, stopped with SIGTERM afterwards."""
    log_path = ROOT / ".stack" / "logs" / f"plain-service-{uuid.uuid4().hex[:6]}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "examples.plain_service.language"], env=env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(lambda: proc.poll() is not None or b"serving topic" in log_path.read_bytes(), 60,
                     f"the language service to start (log {log_path})", interval=0.1)
            assert proc.poll() is None, log_path.read_text()
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
                    pytest.fail(f"the language service ignored SIGTERM (log {log_path})")
    assert b"language service: stopped" in log_path.read_bytes(), log_path.read_text()


# -- examples/math --------------------------------------------------------------------------------
@pytest.mark.integration
def test_math_example_client_prints_the_seed_answer(example_env, worker_factory):
    worker_factory("examples.math.reactors", name="math", env=example_env)
    out = run("examples.math.client", env=example_env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "4"  # add([1, 2, 3]) = 6, then subtract([6, 2]) = 4
    out = run("examples.math.client", "[10, 20]", env=example_env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "28"


@pytest.mark.integration
def test_math_example_client_reports_a_failing_reactor_in_one_line(example_env, worker_factory):
    worker_factory("examples.math.reactors", name="math", env=example_env)
    out = run("examples.math.client", '"not numbers"', env=example_env)
    assert out.returncode == 1
    assert out.stderr.startswith("math pipeline failed: DependencyFailed:"), out.stderr
    assert "dep 'one'" in out.stderr and len(out.stderr.strip().splitlines()) == 1


# -- examples/plain_service -----------------------------------------------------------------------
def test_plain_service_imports_neither_celery_nor_fusion_celery():
    probe = ("import sys, examples.plain_service.language; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'celery', 'kombu', 'fusion_celery'}))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.integration
def test_plain_service_follows_the_wire_protocol(example_env, kit):
    topic = example_env["FUSION_EXAMPLES_PREFIX"] + "language"
    with plain_service(example_env):
        back = kit.topic(f"fusion.rt.{int(time.time() * 1000)}.{uuid.uuid4().hex}")
        expired = int(time.time() * 1000) - 1000
        # Same key, so the same partition: the service sees them in this order.
        kit.send(topic, {"data": "the cat sat on the mat", "return-topic": back, "id": "late", "deadline": expired},
                 key="k")
        kit.send(topic, {"data": "the cat sat on the mat", "return-topic": back, "id": "c-1"}, key="k")
        kit.send(topic, {"data": {"text": "le chat et la souris"}, "response-topic": back, "id": 2}, key="k")
        kit.send(topic, {"data": 42, "return_topic": back}, key="k")
        ok, spelled, error = kit.read(back, 3, timeout=60)
    assert json.loads(ok.value()) == {"language": "en", "confidence": 1.0}
    assert dict(ok.headers()) == {"fusion-status": b"ok", "fusion-id": b"c-1"}  # the expired one got no reply
    assert json.loads(spelled.value())["language"] == "fr" and dict(spelled.headers())["fusion-id"] == b"2"
    assert dict(error.headers()) == {"fusion-status": b"error"}
    assert json.loads(error.value()) == {"error": {"type": "ValueError",
                                                   "message": "expected a text or {'text': ...}, got int"}}


# -- examples/enrich ------------------------------------------------------------------------------
@pytest.mark.integration
def test_enrich_example_fans_out_injects_and_combines(example_env, worker_factory):
    with plain_service(example_env):
        worker_factory("examples.enrich.services,examples.enrich.pipelines", name="enrich", env=example_env)
        out = run("examples.enrich.client", "harbour", env=example_env)
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert report["id"] == "harbour" and report["language"] == "en"
        assert report["sentiment"] == {"score": 1.0, "label": "positive"}
        assert report["stats"] == {"words": 49, "sentences": 3, "reading_minutes": 0.2}
        assert report["keywords"] == ["fishermen", "cheerful", "reopened", "saturday", "welcomed"]
        assert report["summary"] == ("'The harbour reopens': positive (+1.00), en, 49 words, "
                                     "about fishermen, cheerful, reopened")

        out = run("examples.enrich.client", "outage", "marche", "harbour", env=example_env)
        assert out.returncode == 0, out.stderr
        digest = json.loads(out.stdout)
        assert digest["most_positive_first"] == ["harbour", "marche", "outage"]
        assert [s.split(":")[0] for s in digest["summaries"]] == [
            "'Payment outage'", "'Le marché du samedi'", "'The harbour reopens'"]
        assert ", fr, " in digest["summaries"][1]

        out = run("examples.enrich.client", "nope", env=example_env)
        assert out.returncode == 1
        assert "dep 'fetch'" in out.stderr and "no document 'nope'" in out.stderr, out.stderr


# -- examples/other_languages ---------------------------------------------------------------------
def kafka_client_jars() -> str:
    """The classpath of the kafka-clients jar that stack/stack.sh fetched from Maven Central."""
    cache = Path(os.environ.get("FUSION_STACK_CACHE") or Path.home() / ".cache" / "fusion-celery")
    found = sorted(cache.glob("kafka-*/libs/kafka-clients-*.jar"))
    if not found:
        pytest.fail(f"no kafka-clients jar under {cache}; `make up` fetches it", pytrace=False)
    return os.pathsep.join(str(p.parent / "*") for p in found[-1:])


@pytest.mark.integration
def test_java_caller_gets_the_math_answer(example_env, worker_factory):
    worker_factory("examples.math.reactors", name="math", env=example_env)
    source = ROOT / "examples" / "other_languages" / "java" / "CallReactor.java"
    servers = example_env["FUSION_KAFKA_BOOTSTRAP_SERVERS"]
    out = subprocess.run(["java", "-cp", kafka_client_jars(), str(source), servers,
                          example_env["FUSION_EXAMPLES_PREFIX"] + "math", "[1, 2, 3]"],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1] == "4"


def go_build(example: str, tmp_path: Path) -> Path:
    """Build the Go program of ``examples/other_languages/<example>`` (modules from the Go module proxy, kept
    in the user's module and build caches, so a second run downloads nothing); the path of the binary."""
    out = tmp_path / example
    proc = subprocess.run(["go", "build", "-o", str(out), "."], cwd=ROOT / "examples" / "other_languages" / example,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"go build of {example} failed:\n{proc.stdout}{proc.stderr}"
    return out


@pytest.mark.integration
def test_go_caller_gets_the_math_answer(example_env, worker_factory, tmp_path):
    worker_factory("examples.math.reactors", name="math", env=example_env)
    caller = go_build("go", tmp_path)
    out = subprocess.run([str(caller), example_env["FUSION_KAFKA_BOOTSTRAP_SERVERS"].split(",")[0],
                          example_env["FUSION_EXAMPLES_PREFIX"] + "math", "[1, 2, 3]"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "4"


@pytest.mark.integration
def test_go_service_serves_a_dependency_of_the_math_reactor(example_env, worker_factory, kit, tmp_path):
    """The math reactor's ``subtract`` dep goes to a Go service (kafka-go, no Celery) that answers with the
    fusion-id and fusion-status headers; the Go caller calls the reactor, and the service directly with bad
    input, which it answers with an error reply."""
    servers, prefix = example_env["FUSION_KAFKA_BOOTSTRAP_SERVERS"], example_env["FUSION_EXAMPLES_PREFIX"]
    topic = kit.topic(prefix + "go-subtract", partitions=1)
    caller = go_build("go", tmp_path)
    service = subprocess.Popen([str(go_build("go-service", tmp_path)), servers, topic], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)

    def call(reactor: str, data: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(caller), servers.split(",")[0], reactor, data], capture_output=True, text=True,
                              timeout=180)

    try:
        worker_factory("examples.math.reactors", name="math-go",
                       env={**example_env, "FUSION_EXAMPLES_MATH_SUBTRACT": "go-subtract"})
        for numbers, expected in (("[1, 2, 3]", "4"), ("[10, 20]", "28"), ("[5]", "3")):
            out = call(prefix + "math", numbers)
            assert (out.returncode, out.stdout.strip()) == (0, expected), out.stdout + out.stderr
        out = call(topic, '"not numbers"')
        assert out.returncode == 1 and "expected a non-empty list of numbers" in out.stderr, out.stdout + out.stderr
    finally:
        service.terminate()
        log, _ = service.communicate(timeout=30)
    assert service.returncode == 0, log
    assert f"serving {topic}" in log and "stopped" in log, log


# -- dialects: Faust ------------------------------------------------------------------------------
#: What a deployment admits besides fusion.rt.: Faust's reply topics and the Spring caller's.
DIALECT_ALLOWLIST = r"f-reply-[0-9a-f-]{36},spring\.replies\.[0-9a-f]{32}"
FAUST_PYTHON = ROOT / ".venv-faust" / "bin" / "python"


def faust_python() -> str:
    """The interpreter of the Faust venv (faust-streaming pins click below what the dev tools need)."""
    if not FAUST_PYTHON.exists():
        pytest.fail(f"no {FAUST_PYTHON}; `make venv` makes it", pytrace=False)
    return str(FAUST_PYTHON)


@contextmanager
def new_topics_deleted(kit) -> Iterator[None]:
    """Delete the topics made meanwhile by a program that names its own (Faust's f-reply-<uuid>, its
    internal topics)."""
    before = kit.topics()
    try:
        yield
    finally:
        made = [t for t in kit.topics() - before if t.startswith(("f-reply-", "fusion-faust-"))]
        if made:
            kit.admin.delete_topics(made)


@contextmanager
def program(argv: list[str], name: str, ready: str) -> Iterator[subprocess.Popen]:
    """A service program (``argv``) as its own process, once its log says ``ready``; stopped with SIGTERM."""
    log_path = ROOT / ".stack" / "logs" / f"{name}-{uuid.uuid4().hex[:6]}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(lambda: proc.poll() is not None or ready.encode() in log_path.read_bytes(), 120,
                     f"{name} to start (log {log_path})", interval=0.1)
            assert proc.poll() is None, log_path.read_text()
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
                    pytest.fail(f"{name} ignored SIGTERM (log {log_path})")


@pytest.mark.integration
@pytest.mark.parametrize("form", ["headers", "record"])
def test_faust_caller_gets_the_math_answer_in_either_form(example_env, worker_factory, kit, form):
    """agent.ask with Faust's reply headers (its default) and with a ReqRepRequest record
    (use_reply_headers=False): the reactor answers on Faust's f-reply-<uuid> topic with a ReqRepResponse."""
    worker_factory("examples.math.reactors", name="math", env={**example_env,
                                                               "FUSION_REPLY_ALLOWLIST": DIALECT_ALLOWLIST})
    with new_topics_deleted(kit):
        out = subprocess.run([faust_python(), "examples/other_languages/faust/caller.py",
                              example_env["FUSION_KAFKA_BOOTSTRAP_SERVERS"], example_env["FUSION_EXAMPLES_PREFIX"]
                              + "math", "[1, 2, 3]", *(["--record"] if form == "record" else [])],
                             cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1] == "4"


@pytest.mark.integration
@pytest.mark.parametrize("reply", ["leased", "ephemeral"])
def test_faust_agent_serves_a_dependency_of_the_math_reactor(example_env, worker_factory, kit, reply):
    """The math reactor's subtract dep goes to a plain Faust agent (``"dialect": "faust"``): dispatch sends the
    numbers with Faust's reply headers, the waiter takes the ReqRepResponse that carries the wait's id."""
    prefix = example_env["FUSION_EXAMPLES_PREFIX"]
    topic = kit.topic(prefix + "faust-subtract", partitions=1)
    with new_topics_deleted(kit), program(
            [faust_python(), "examples/other_languages/faust/service.py",
             example_env["FUSION_KAFKA_BOOTSTRAP_SERVERS"], topic], "faust-service", "faust service: serving"):
        worker_factory("examples.math.reactors", name="math-faust", env={
            **example_env, "FUSION_EXAMPLES_MATH_SUBTRACT": "faust-subtract",
            "FUSION_EXAMPLES_MATH_SUBTRACT_DIALECT": "faust", "FUSION_EXAMPLES_MATH_SUBTRACT_REPLY": reply})
        for numbers, expected in (("[1, 2, 3]", "4"), ("[10, 20]", "28")):
            out = run("examples.math.client", numbers, env=example_env)
            assert (out.returncode, out.stdout.strip()) == (0, expected), out.stdout + out.stderr


# -- dialects: Spring Kafka -----------------------------------------------------------------------
SPRING = ROOT / "examples" / "other_languages" / "spring"


def spring_classpath() -> str:
    """Build the Spring example with Maven (dependencies from Maven Central into ~/.m2 once, the program
    into its target/, ignored by git) and return the classpath to run it with."""
    proc = subprocess.run(["mvn", "-B", "-q", "package"], cwd=SPRING, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"mvn package failed:\n{proc.stdout}{proc.stderr}"
    return os.pathsep.join([str(SPRING / "target" / "classes"), str(SPRING / "target" / "dependency" / "*")])


@pytest.mark.integration
def test_spring_replying_template_gets_the_math_answer(example_env, worker_factory, kit):
    """A ReplyingKafkaTemplate listening on partition 1 of its reply topic: the reactor answers there
    (kafka_replyPartition) and echoes the 16 raw bytes of kafka_correlationId, which the template matches."""
    worker_factory("examples.math.reactors", name="math", env={**example_env,
                                                               "FUSION_REPLY_ALLOWLIST": DIALECT_ALLOWLIST})
    reply_topic = f"spring.replies.{uuid.uuid4().hex}"
    out = subprocess.run(["java", "-cp", spring_classpath(), "fusion.example.Main", "caller",
                          example_env["FUSION_KAFKA_BOOTSTRAP_SERVERS"], example_env["FUSION_EXAMPLES_PREFIX"] + "math",
                          "[1, 2, 3]", reply_topic], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1] == "4"
    assert reply_topic not in kit.topics()  # the caller deleted it


@pytest.mark.integration
def test_a_spring_reply_topic_outside_the_allowlist_is_dead_lettered(example_env, worker_factory, kit):
    """kafka_replyTopic goes through the same check as the body's return-topic."""
    worker_factory("examples.math.reactors", name="math", env=example_env)
    topic = example_env["FUSION_EXAMPLES_PREFIX"] + "add"
    kit.wait_visible([topic])
    kit.send(topic, b"[1, 2]", headers=[("kafka_replyTopic", b"spring.replies.0"),
                                        ("kafka_correlationId", bytes(range(16)))])
    (letter,) = kit.read(topic + ".dlq", 1, timeout=60)
    headers = dict(letter.headers())
    assert headers["fusion-dlq-reason"] == b"return-topic-not-allowed"
    assert b"'spring.replies.0' is not allowed" in headers["fusion-dlq-error"]
    assert letter.value() == b"[1, 2]" and headers["kafka_correlationId"] == bytes(range(16))


@pytest.mark.integration
@pytest.mark.parametrize("reply", ["leased", "shared"])
def test_spring_listener_serves_a_dependency_of_the_math_reactor(example_env, worker_factory, kit, reply):
    """The math reactor's subtract dep goes to a @KafkaListener + @SendTo service (``"dialect": "spring"``):
    dispatch sends kafka_replyTopic and kafka_correlationId, Spring echoes the id, the waiter matches it."""
    classpath = spring_classpath()
    prefix = example_env["FUSION_EXAMPLES_PREFIX"]
    topic = kit.topic(prefix + "spring-subtract", partitions=1)
    with program(["java", "-cp", classpath, "fusion.example.Main", "service",
                  example_env["FUSION_KAFKA_BOOTSTRAP_SERVERS"], topic], "spring-service",
                 "spring service: serving") as service:
        worker_factory("examples.math.reactors", name="math-spring", env={
            **example_env, "FUSION_EXAMPLES_MATH_SUBTRACT": "spring-subtract",
            "FUSION_EXAMPLES_MATH_SUBTRACT_DIALECT": "spring", "FUSION_EXAMPLES_MATH_SUBTRACT_REPLY": reply})
        for numbers, expected in (("[1, 2, 3]", "4"), ("[10, 20]", "28")):
            out = run("examples.math.client", numbers, env=example_env)
            assert (out.returncode, out.stdout.strip()) == (0, expected), out.stdout + out.stderr
    assert service.returncode is not None


# -- the shell callers: Kafka's CLI and kcat --------------------------------------------------------
@pytest.fixture(scope="session")
def kafka_cli() -> str:
    """The folder of Kafka's command-line tools (``stack/stack.sh cli`` writes them, and installs kcat where it
    is missing); the Kafka jars are fetched once into the stack cache."""
    out = subprocess.run(["bash", "stack/stack.sh", "cli"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.integration
@pytest.mark.parametrize("script", ["call.sh", "kcat-call.sh"])
def test_shell_caller_gets_the_math_answer(example_env, worker_factory, kit, kafka_cli, script):
    """call.sh (Kafka's console tools) and kcat-call.sh (kcat, with kafka-topics.sh for the return topic
    that kcat cannot create) print the answer after its headers, and delete their return topic."""
    worker_factory("examples.math.reactors", name="math", env=example_env)
    env = {**os.environ, "PATH": kafka_cli + os.pathsep + os.environ["PATH"]}
    out = subprocess.run(["sh", str(ROOT / "examples" / "other_languages" / "shell" / script),
                          example_env["FUSION_KAFKA_BOOTSTRAP_SERVERS"], example_env["FUSION_EXAMPLES_PREFIX"] + "math",
                          "[1, 2, 3]"], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    headers, value = out.stdout.strip().splitlines()[-1].split("\t")
    assert value == "4" and "fusion-status" in headers and "ok" in headers, out.stdout
    assert not [t for t in kit.topics() if re.match(r"fusion\.rt\.[0-9.]+\.(sh|kcat)[0-9]", t)]


# -- fusion-clj's own callers --------------------------------------------------------------------
#: What admits fusion-clj's return topics: a bare UUID (docs/guides/other-languages.md says what it opens).
UUID_TOPICS = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def fusion_clj_call(example_env: dict[str, str], timeout: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "examples/other_languages/fusion_clj/call.py",
                           example_env["FUSION_KAFKA_BOOTSTRAP_SERVERS"],
                           example_env["FUSION_EXAMPLES_PREFIX"] + "math", "[1, 2, 3]", timeout],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)


@pytest.mark.integration
def test_fusion_clj_caller_gets_the_answer_where_the_allowlist_admits_bare_uuids(example_env, worker_factory):
    # A JSON list: in the environment, a value that starts with "[" is read as one.
    worker_factory("examples.math.reactors", name="math",
                   env={**example_env, "FUSION_REPLY_ALLOWLIST": json.dumps([UUID_TOPICS])})
    out = fusion_clj_call(example_env, "60")
    assert (out.returncode, out.stdout.strip()) == (0, "4"), out.stdout + out.stderr


@pytest.mark.integration
def test_fusion_clj_caller_is_dead_lettered_without_the_allowlist(example_env, worker_factory, kit):
    worker_factory("examples.math.reactors", name="math", env=example_env)
    out = fusion_clj_call(example_env, "5")
    assert out.returncode == 1 and "no answer within 5s" in out.stderr, out.stdout + out.stderr
    (letter,) = kit.read(example_env["FUSION_EXAMPLES_PREFIX"] + "math.dlq", 1, timeout=60)
    assert dict(letter.headers())["fusion-dlq-reason"] == b"return-topic-not-allowed"
    assert re.fullmatch(UUID_TOPICS, json.loads(letter.value())["return-topic"])


# -- examples/demo --------------------------------------------------------------------------------
@pytest.mark.integration
def test_demo_once_prints_the_answer_and_flower_address_and_stops_cleanly(example_env):
    port = free_port()
    env = {**example_env, "FUSION_DEMO_ONCE": "1", "FUSION_DEMO_FLOWER_PORT": str(port)}
    out = run("examples.demo", env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"^answer: 4 ", out.stdout, re.MULTILINE), out.stdout
    assert f"Flower: http://127.0.0.1:{port}" in out.stdout
    pids = [int(p) for p in re.findall(r"\(pid (\d+)", out.stdout)]
    assert len(set(pids)) == 2, out.stdout  # the worker and Flower ...
    assert not [p for p in set(pids) if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]  # ... gone
    assert "waiter: stopped" in (ROOT / ".stack" / "logs" / "demo-worker.log").read_text()  # a warm shutdown
