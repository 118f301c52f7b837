"""Kafka with authentication and ACLs: fusion-celery works with credentials from its settings and exactly
the ACLs `celery fusion acls` grants, a client without them is refused, another principal can neither
write nor read the registry nor touch return topics, and the password never shows in logs, task
arguments, events, Redis or errors.

The local broker has a SASL_PLAINTEXT listener (SCRAM-SHA-256, StandardAuthorizer, see stack/stack.sh);
the test creates its SCRAM users and ACLs with the admin API over the PLAINTEXT listener, whose
anonymous principal is a super user.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from celery import Celery
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialDeletion,
    UserScramCredentialUpsertion,
)
from support.kafka import high_watermark, return_topic_name
from support.reliability import stack, stack_ports
from support.stack import ROOT, RUN_ID
from support.waiting import wait_for
from support.workers import Worker, isolated_env

from fusion_celery.config import stack_env

# The tests on the SASL listener are marked ``faults``: the listener may need a Kafka restart (a stack
# started before it existed), so they run with the faults, last.
pytestmark = pytest.mark.timeout(600)

PASSWORD = f"S3cr3t-{uuid.uuid4().hex}"  # unique, so a grep for it finds nothing else
STRANGER_PASSWORD = f"stranger-{uuid.uuid4().hex}"


def sasl_servers() -> str:
    servers = stack_env().get("FUSION_KAFKA_SASL_BOOTSTRAP_SERVERS")
    if not servers:
        pytest.fail("the stack's .stack/env has no FUSION_KAFKA_SASL_BOOTSTRAP_SERVERS: restart it (make down up)")
    return servers


def listening(servers: str) -> bool:
    host, port = servers.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        return True
    except OSError:
        return False


def fusion_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``celery -A fusion_celery fusion ARGS`` with the test reactors imported, in ``env``."""
    full = {**os.environ, "FUSION_IMPORTS": "tests.apps.services", "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-m", "celery", "-A", "fusion_celery", "fusion", *args], env=full,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.fixture(scope="module")
def sasl(kit):
    """The SASL endpoint; a user ``fusion-<run>`` with exactly the ACLs ``celery fusion acls`` grants a
    deployment of tests/apps/services.py (its own registry topic and reactor topics), and a user
    ``stranger-<run>`` that may use nothing but a consumer group of its own."""
    if stack_ports() and not listening(sasl_servers()):
        stack("restart", "kafka")  # the config with the SASL listener is written on start
    servers = sasl_servers()
    wait_for(lambda: listening(servers), 60, f"the SASL listener at {servers}")
    admin = AdminClient({"bootstrap.servers": kit.servers})
    user, stranger = f"fusion-{RUN_ID}", f"stranger-{RUN_ID}"
    creds = [UserScramCredentialUpsertion(u, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_256, 4096), p.encode())
             for u, p in ((user, PASSWORD), (stranger, STRANGER_PASSWORD))]
    for f in admin.alter_user_scram_credentials(creds).values():
        f.result(30)
    env = isolated_env("kafka", db=14)
    run = env["FUSION_TEST_RUN"]
    principals = [f"User:{user}", f"User:{stranger}"]
    # Applied over the PLAINTEXT listener (the super user), as an administrator would.
    out = fusion_cli("acls", "--principal", principals[0], "--apply", "--format", "json", env=env)
    assert out.returncode == 0, out.stderr
    assert "applied" in out.stderr and "warning" not in out.stderr, out.stderr
    grants = json.loads(out.stdout)
    stranger_group = f"stranger-{RUN_ID}"
    for f in admin.create_acls([AclBinding(ResourceType.GROUP, stranger_group, ResourcePatternType.LITERAL,
                                           principals[1], "*", op, AclPermissionType.ALLOW)
                                for op in (AclOperation.READ, AclOperation.DESCRIBE)]).values():
        f.result(30)
    # ACLs reach the broker's authorizer through the metadata log: wait until they hold.
    wait_for(lambda: authorized(servers, user, PASSWORD, return_topic_name(), kit), 60, "the ACLs to be in force",
             interval=1.0)
    config = {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-256",
              "sasl.username": user, "sasl.password": PASSWORD}
    yield {"servers": servers, "user": user, "stranger": stranger, "stranger_group": stranger_group, "env": env,
           "run": run, "config": config, "grants": grants,
           "registry": env["FUSION_REGISTRY_URL"].removeprefix("kafka://")}
    filters = [AclBindingFilter(ResourceType.ANY, None, ResourcePatternType.ANY, principal, None, AclOperation.ANY,
                                AclPermissionType.ANY) for principal in principals]
    for f in admin.delete_acls(filters).values():
        f.result(30)
    for f in admin.alter_user_scram_credentials([UserScramCredentialDeletion(u, ScramMechanism.SCRAM_SHA_256)
                                                 for u in (user, stranger)]).values():
        f.result(30)
    admin.__exit__(None, None, None)


PROBE = """
import json, sys
from confluent_kafka import Producer
config, topic = json.loads(sys.argv[1]), sys.argv[2]
errors, out = [], {}
p = Producer({**config, "message.timeout.ms": 5000, "log_level": 0, "error_cb": lambda e: errors.append(e.str())})
try:
    p.produce(topic, b"probe", on_delivery=lambda err, msg: out.update(err=err and err.str()))
    p.flush(10)
except Exception as exc:
    out["err"] = str(exc)
print(json.dumps({"delivered": "err" in out and out["err"] is None, "error": out.get("err"), "errors": errors}))
"""


def probe(config: dict, topic: str) -> dict:
    """Produce one record with a client of ``config``, in a process of its own (a librdkafka SASL client
    may crash the interpreter at exit), and say what happened."""
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(config), topic], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def authorized(servers: str, user: str, password: str, topic: str, kit) -> bool:
    kit.topic(topic)
    return probe({"bootstrap.servers": servers, "security.protocol": "SASL_PLAINTEXT",
                  "sasl.mechanism": "SCRAM-SHA-256", "sasl.username": user, "sasl.password": password},
                 topic)["delivered"]


ATTEMPT = """
import json, sys
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
config, action, topic, group = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
quiet = {**config, "log_level": 0}
error = "NO_ANSWER"
if action == "write":  # a tombstone for a key no wait has: harmless should it be written
    done = {}
    p = Producer({**quiet, "message.timeout.ms": 10000})
    p.produce(topic, None, key=b"intruder", on_delivery=lambda err, msg: done.update(err=err and err.name()))
    p.flush(15)
    error = done.get("err", error)
elif action in ("read", "join"):  # read partition 0 from the beginning, or join the group on the topic
    c = Consumer({**quiet, "group.id": group, "enable.auto.commit": False, "enable.partition.eof": True,
                  "auto.offset.reset": "earliest"})
    if action == "read":
        c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    else:
        c.subscribe([topic])
    for _ in range(40):
        m = c.poll(0.5)
        if m is not None:
            error = m.error().name() if m.error() else None
            break
    c.close()
else:  # delete or create a topic
    a = AdminClient(quiet)
    fs = a.delete_topics([topic], operation_timeout=10) if action == "delete" else \
        a.create_topics([NewTopic(topic, 1)], operation_timeout=10)
    try:
        fs[topic].result(20)
        error = None
    except KafkaException as exc:
        error = exc.args[0].name()
print(json.dumps({"error": error}))
"""


def attempt(config: dict, action: str, topic: str, group: str = "") -> str | None:
    """Try ``action`` (write, read, join, delete, create) on ``topic`` with a client of ``config``, in a
    process of its own; the name of the Kafka error it met (``_PARTITION_EOF``: read to the end), or None."""
    out = subprocess.run([sys.executable, "-c", ATTEMPT, json.dumps(config), action, topic, group],
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["error"]


def secret_forms(secret: str) -> list[bytes]:
    """``secret`` as it would show in stored data: as is, and inside base64 at each of the three alignments
    (kombu's Redis transport keeps task message bodies base64-encoded)."""
    raw = secret.encode()
    forms = [raw]
    for k in range(3):
        encoded = base64.b64encode(b"\0" * k + raw)
        # drop the characters that depend on the padding bytes before or on what follows the secret
        forms.append(encoded[(4 * k + 2) // 3:((k + len(raw)) // 3) * 4])
    return forms


def db_of(url: str) -> bytes:
    return url.rsplit("/", 1)[1].encode()


class RedisTraffic(threading.Thread):
    """Every command Redis runs on the databases of ``urls`` while this runs (MONITOR), as Redis shows it:
    task messages pushed to the broker's queues and their acknowledgements, results, chord counters, events."""

    def __init__(self, *urls: str) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(urls[0])
        self.dbs = {db_of(u) for u in urls}
        self.lines: dict[bytes, list[bytes]] = {db: [] for db in self.dbs}
        self.stop_token: bytes | None = None
        self.monitor = self.client.monitor().__enter__()  # MONITOR is on once this returns
        self.start()

    def run(self) -> None:
        while True:
            try:
                line = self.monitor.connection.read_response()
            except Exception:
                return
            if self.stop_token is not None and self.stop_token in (line if isinstance(line, bytes) else b""):
                return  # every command run before stop() was read
            m = re.match(rb"\S+ \[(\d+) ", line if isinstance(line, bytes) else b"")
            if m and m.group(1) in self.dbs:
                self.lines[m.group(1)].append(line)

    def stop(self) -> None:
        """Read up to the commands run before this call (MONITOR shows them in order), then stop."""
        self.stop_token = f"traffic-stop-{uuid.uuid4().hex}".encode()
        self.client.echo(self.stop_token)
        self.join(30)
        self.monitor.__exit__(None, None, None)
        self.client.close()


def stored_values(url: str) -> Iterator[tuple[bytes, bytes]]:
    """Every key of the Redis database ``url`` with its value, read according to its type."""
    r = redis.Redis.from_url(url)
    try:
        for key in r.scan_iter("*"):
            kind = r.type(key)
            if kind == b"string":
                values = [r.get(key)]
            elif kind == b"list":
                values = r.lrange(key, 0, -1)
            elif kind == b"hash":
                values = [x for item in r.hgetall(key).items() for x in item]
            elif kind == b"set":
                values = list(r.smembers(key))
            elif kind == b"zset":
                values = r.zrange(key, 0, -1)
            elif kind == b"stream":
                values = [repr(entry).encode() for entry in r.xrange(key)]
            else:  # gone meanwhile
                values = []
            yield key, b"\n".join(v or b"" for v in values)
    finally:
        r.close()


@pytest.mark.integration
@pytest.mark.faults
def test_fusion_celery_works_with_credentials_from_its_settings(sasl, kit, worker_factory, monkeypatch):
    # librdkafka's "security" debug context logs each SASL login ("Authenticated as <user> using <mechanism>");
    # the worker logs at debug level so that those lines, and everything else, reach its log.
    env = {**sasl["env"], "FUSION_KAFKA_BOOTSTRAP_SERVERS": sasl["servers"],
           "FUSION_KAFKA_CONFIG": json.dumps({**sasl["config"], "debug": "security"})}
    broker, backend = sasl["env"]["CELERY_BROKER_URL"], sasl["env"]["CELERY_RESULT_BACKEND"]
    traffic = RedisTraffic(broker, backend)
    w = worker_factory(name="sasl", env=env, concurrency=2, extra_args=("-l", "debug"))
    events = capture_events(broker)
    back = kit.topic(return_topic_name())
    # math has two chained deps: intake, return topics, registry, requests and replies all go through SASL
    kit.send(f"{sasl['run']}.math", {"data": [1, 2, 3], "return-topic": back, "id": "s-1"})
    [msg] = kit.read(back, 1, timeout=120)
    assert json.loads(msg.value()) == 4
    # a dependency the user may not use fails with a clear error, not a hang
    forbidden = kit.topic(f"forbidden.{RUN_ID}.{uuid.uuid4().hex[:6]}")
    back2 = kit.topic(return_topic_name())
    kit.send(f"{sasl['run']}.generic", {"data": {"deps": {"x": {"topic": forbidden}}}, "return-topic": back2})
    [err] = kit.read(back2, 1, timeout=120)
    body = json.loads(err.value())
    assert dict(err.headers())["fusion-status"] == b"error" and "dep 'x'" in body["error"]["message"]
    assert PASSWORD not in err.value().decode()
    # A canary in the arguments of a task message left in a queue no worker reads: the search below must find
    # it, in the traffic and in the stored values, or it proves nothing.
    canary, queue = f"canary-{uuid.uuid4().hex}", f"canary-{RUN_ID}"
    monkeypatch.setenv("CELERY_BROKER_URL", broker)  # Celery prefers it to the app's own broker setting
    sender = Celery("canary", set_as_current=False)
    sender.send_task("tests.ping", args=[canary], queue=queue)
    sender.close()
    events.stop()
    traffic.stop()
    # The worker logged in over SASL/SCRAM as the user: librdkafka says so for its connections ...
    log = w.log()
    assert f"Authenticated as {sasl['user']} using SCRAM-SHA-256" in log, "no SASL login in the worker's log"
    # ... and it acted as that user, not as the PLAINTEXT listener's super user, who may write anywhere:
    # the topic outside its ACLs received nothing.
    assert high_watermark(kit.servers, forbidden) == 0
    # The secret is nowhere: the worker's (debug) log, the events Flower shows, and Redis: both the broker's
    # and the result backend's database, every command run on them during the run (the task messages
    # pushed to the broker's queues, base64 bodies included) and every key's value left at the end.
    assert PASSWORD not in log
    assert events.seen, "no task events were captured"
    assert PASSWORD not in json.dumps(events.seen, default=str)
    forms = secret_forms(PASSWORD)
    pushed = [line for line in traffic.lines[db_of(broker)] if b'"LPUSH"' in line.upper()]
    assert pushed, "no task message was seen going into the broker's queues"
    assert any(b"celery-task-meta-" in line for line in traffic.lines[db_of(backend)]), "no result was seen stored"
    for db, lines in traffic.lines.items():
        for line in lines:
            assert not any(f in line for f in forms), f"the password went through Redis db {db!r}: {line[:300]!r}"
    canaries = secret_forms(canary)
    assert any(f in line for line in traffic.lines[db_of(broker)] for f in canaries), "the canary was not seen"
    assert any(f in value for _key, value in stored_values(broker) for f in canaries), "the canary was not found"
    redis.Redis.from_url(broker).delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
    for url in (broker, backend):
        for key, value in stored_values(url):
            assert not any(f in key + value for f in forms), f"the password is in Redis key {key!r} of {url}"


@pytest.mark.integration
@pytest.mark.faults
def test_the_acls_command_grants_the_deployment_to_one_principal(sasl):
    out = fusion_cli("acls", "--principal", "User:someone", "--host", "10.0.0.1", "--calls", "prices.*",
                     "--calls", "tax", "--format", "json", env=sasl["env"])
    assert out.returncode == 0, out.stderr
    rows = {(r["resource_type"], r["pattern_type"], r["name"]): r for r in json.loads(out.stdout)}
    assert {(r["principal"], r["host"], r["permission"]) for r in rows.values()} == {("User:someone", "10.0.0.1",
                                                                                       "ALLOW")}
    ops = {k: set(r["operations"]) for k, r in rows.items()}
    registry, run = sasl["registry"], sasl["run"]
    assert ops[("TOPIC", "LITERAL", registry)] == {"CREATE", "DESCRIBE", "READ", "WRITE"}
    assert ops[("GROUP", "LITERAL", f"fusion.waiters.{registry}")] == {"DESCRIBE", "READ"}
    assert ops[("TOPIC", "PREFIXED", "fusion.rt.")] == {"CREATE", "DELETE", "DESCRIBE", "READ", "WRITE"}
    assert ops[("TOPIC", "LITERAL", f"{run}.math")] == {"CREATE", "DESCRIBE", "READ", "WRITE"}
    assert ops[("TOPIC", "LITERAL", f"{run}.math.dlq")] == {"CREATE", "DESCRIBE", "WRITE"}
    assert ops[("GROUP", "LITERAL", f"fusion.reactor.{run}.math")] == {"DESCRIBE", "READ"}
    assert ops[("TOPIC", "PREFIXED", "prices.")] == ops[("TOPIC", "LITERAL", "tax")] == {"DESCRIBE", "WRITE"}
    assert ops[("BROKER", "LITERAL", "kafka-cluster")] == {"IDEMPOTENT_WRITE"}
    # nothing broader than the deployment's own names: no wildcard, no prefix but return topics and --calls
    assert not any(name in ("*", "", "fusion.") for _t, _p, name in rows)
    assert {name for _t, p, name in rows if p == "PREFIXED"} == {"fusion.rt.", "prices."}
    # what sasl() applied for the worker's user is this list
    assert {(r["resource_type"], r["pattern_type"], r["name"]) for r in sasl["grants"]} == \
        set(rows) - {("TOPIC", "PREFIXED", "prices."), ("TOPIC", "LITERAL", "tax")}
    shell = fusion_cli("acls", "--principal", "User:someone", "--format", "kafka-acls", env=sasl["env"])
    assert f"--allow-principal User:someone --allow-host '*' --operation Create --operation Describe " \
           f"--operation Read --operation Write --topic {registry} --resource-pattern-type literal" in shell.stdout
    bad = fusion_cli("acls", "--principal", "someone", env=sasl["env"])
    assert bad.returncode != 0 and "use TYPE:NAME" in bad.stderr


@pytest.mark.integration
@pytest.mark.faults
def test_another_principal_can_neither_use_the_registry_nor_touch_return_topics(sasl, kit):
    registry, waiters = sasl["registry"], f"fusion.waiters.{sasl['registry']}"
    kit.topic(registry)  # made by the worker of the first test; made here when this test runs alone
    stranger = {"bootstrap.servers": sasl["servers"], **sasl["config"], "sasl.username": sasl["stranger"],
                "sasl.password": STRANGER_PASSWORD}
    user = {"bootstrap.servers": sasl["servers"], **sasl["config"]}
    doomed = kit.topic(return_topic_name())
    # The stranger logs in (its errors are authorization errors, not failed logins) and may use a consumer
    # group of its own, but it cannot write a wait into the registry, read the registry (with its own group),
    # join the waiters' group, nor delete or create a return topic.
    assert attempt(stranger, "write", registry) == "TOPIC_AUTHORIZATION_FAILED"
    assert attempt(stranger, "join", registry, sasl["stranger_group"]) == "TOPIC_AUTHORIZATION_FAILED"
    assert attempt(stranger, "read", registry, sasl["stranger_group"]) not in (None, "_PARTITION_EOF")  # no data
    assert attempt(stranger, "join", registry, waiters) == "GROUP_AUTHORIZATION_FAILED"
    assert attempt(stranger, "delete", doomed) == "TOPIC_AUTHORIZATION_FAILED"
    assert doomed in kit.topics("fusion.rt.")
    assert attempt(stranger, "create", return_topic_name()) == "TOPIC_AUTHORIZATION_FAILED"
    # fusion's principal may do each of these (the same attempts, so the refusals above are the ACLs')
    assert attempt(user, "write", registry) is None
    assert attempt(user, "read", registry, "fusion.registry-reader") in (None, "_PARTITION_EOF")
    assert attempt(user, "delete", doomed) is None
    wait_for(lambda: doomed not in kit.topics("fusion.rt."), 30, f"{doomed} to be deleted")


@pytest.mark.integration
@pytest.mark.faults
def test_the_acls_command_warns_of_other_principals_allowed_on_the_registry(sasl, kit):
    other = f"User:other-{RUN_ID}"
    binding = AclBinding(ResourceType.TOPIC, "fusion.waits", ResourcePatternType.PREFIXED, other, "*",
                         AclOperation.WRITE, AclPermissionType.ALLOW)
    admin = AdminClient({"bootstrap.servers": kit.servers})
    try:
        for f in admin.create_acls([binding]).values():
            f.result(30)
        flt = AclBindingFilter(ResourceType.TOPIC, sasl["registry"], ResourcePatternType.MATCH, other, None,
                               AclOperation.ANY, AclPermissionType.ANY)
        wait_for(lambda: admin.describe_acls(flt).result(30), 30, "the other principal's ACL to be listed")
        out = fusion_cli("acls", "--principal", f"User:{sasl['user']}", "--apply", env=sasl["env"])
        assert out.returncode == 0, out.stderr
        assert f"warning: {other} (host *) WRITE on TOPIC PREFIXED 'fusion.waits'" in out.stderr, out.stderr
        assert f"User:{sasl['user']}" not in out.stderr.replace(f"for User:{sasl['user']}", "")
    finally:
        filters = [AclBindingFilter(b.restype, b.name, b.resource_pattern_type, b.principal, b.host, b.operation,
                                    b.permission_type) for b in [binding]]
        for f in admin.delete_acls(filters).values():
            f.result(30)
        admin.__exit__(None, None, None)


class capture_events(threading.Thread):
    """Every Celery event on ``broker`` while it runs (what Flower would show: task arguments, results)."""

    def __init__(self, broker: str) -> None:
        super().__init__(daemon=True)
        from kombu import Connection

        from fusion_celery import app
        self.app, self.conn = app, Connection(broker)
        self.seen: list[dict] = []
        self.errors: list[str] = []
        self.ready = threading.Event()
        self.should_stop = False
        self.start()
        self.ready.wait(10)

    def run(self) -> None:
        # consume() ends with socket.timeout after a second without an event: consume again (same receiver,
        # same queue) until told to stop.  Other errors are kept for stop()'s message.
        recv = self.app.events.Receiver(self.conn, handlers={"*": self.seen.append})
        self.ready.set()
        while not self.should_stop:
            try:
                for _ in recv.consume(limit=None, timeout=1, wakeup=False):
                    if self.should_stop:
                        return
            except TimeoutError:
                continue
            except Exception as exc:
                self.errors.append(repr(exc))
                if len(self.errors) > 100:
                    return
                time.sleep(0.2)  # a pause between reconnections, not a wait for a condition

    def stop(self) -> None:
        wait_for(lambda: any(e.get("type") == "task-succeeded" for e in self.seen), 30,
                 f"task events (receiver errors: {self.errors[-3:]}; {len(self.seen)} other events)")
        self.should_stop = True
        self.join(5)
        self.conn.release()


@pytest.mark.integration
@pytest.mark.faults
def test_a_client_without_credentials_is_refused(sasl, kit):
    topic = kit.topic(return_topic_name())  # one the user may write
    # no SASL at all: the broker closes the connection, nothing is written
    plain = probe({"bootstrap.servers": sasl["servers"]}, topic)
    assert not plain["delivered"]
    # a wrong password: authentication fails, and no error repeats the password
    wrong = probe({"bootstrap.servers": sasl["servers"], **sasl["config"], "sasl.password": "wrong-" + PASSWORD},
                  topic)
    assert not wrong["delivered"]
    assert any("Authentication failed" in e for e in wrong["errors"]), wrong
    assert PASSWORD not in json.dumps(wrong)
    # the right one works
    assert probe({"bootstrap.servers": sasl["servers"], **sasl["config"]}, topic)["delivered"]


@pytest.mark.integration
@pytest.mark.faults
def test_acls_hold_for_an_authenticated_user_without_them(sasl, kit):
    topic = kit.topic(return_topic_name())
    assert not authorized(sasl["servers"], sasl["stranger"], STRANGER_PASSWORD, topic, kit)
    assert authorized(sasl["servers"], sasl["user"], PASSWORD, topic, kit)
    outside = kit.topic(f"outside.{RUN_ID}.{uuid.uuid4().hex[:6]}")
    assert not authorized(sasl["servers"], sasl["user"], PASSWORD, outside, kit)


@pytest.mark.integration
@pytest.mark.faults
def test_a_worker_with_a_wrong_password_fails_clearly_without_showing_it(sasl):
    wrong = "wrong-" + PASSWORD
    env = {**sasl["env"], "FUSION_KAFKA_BOOTSTRAP_SERVERS": sasl["servers"], "FUSION_STARTUP_TIMEOUT": "5",
           "FUSION_KAFKA_CONFIG": json.dumps({**sasl["config"], "sasl.password": wrong})}
    w = Worker("wrongpw", "tests.apps.services", env=env)
    out = subprocess.run(w.cmd, env=w.env, capture_output=True, text=True, timeout=120, cwd=str(w.log_path.parents[2]))
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert f"fusion-celery cannot start: Kafka at {sasl['servers']} did not answer" in text
    assert wrong not in text and PASSWORD not in text


def test_invalid_kafka_config_in_the_environment_does_not_echo_the_secret(monkeypatch):
    from fusion_celery.config import defaults
    monkeypatch.setenv("FUSION_KAFKA_CONFIG", '{"sasl.password": "' + PASSWORD + '", oops')
    with pytest.raises(ValueError) as exc:
        defaults()
    assert "FUSION_KAFKA_CONFIG" in str(exc.value) and PASSWORD not in str(exc.value)


def test_flower_config_view_masks_the_password():
    """Flower and `celery inspect conf` show settings through Celery's filter_hidden_settings."""
    from celery.app.utils import filter_hidden_settings
    shown = json.dumps(filter_hidden_settings({"fusion_kafka_config": {"sasl.password": PASSWORD},
                                               "fusion_kafka_producer_config": {"ssl.key.password": PASSWORD}}))
    assert PASSWORD not in shown


def test_cli_errors_do_not_show_the_broker_password():
    env = {**os.environ, "CELERY_BROKER_URL": f"redis://:{PASSWORD}@127.0.0.1:1/0"}
    out = subprocess.run([sys.executable, "-m", "celery", "-A", "fusion_celery", "fusion", "status"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert PASSWORD not in out.stdout + out.stderr
