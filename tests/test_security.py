"""Kafka with authentication and ACLs: fusion-celery works with credentials from its settings, a client
without them is refused, and the password never shows in logs, task arguments, events or errors.

The local broker has a SASL_PLAINTEXT listener (SCRAM-SHA-256, StandardAuthorizer, see stack/stack.sh);
the test creates its SCRAM users and ACLs with the admin API over the PLAINTEXT listener, whose
anonymous principal is a super user.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import uuid

import pytest
import redis
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
    UserScramCredentialUpsertion,
)
from conftest import RUN_ID, Worker, isolated_env, return_topic_name, wait_for
from reliability import stack, stack_ports

from fusion_celery.config import stack_env

# The listener may need a Kafka restart (a stack started before it existed): run with the faults, last.
pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]

PASSWORD = f"S3cr3t-{uuid.uuid4().hex}"  # unique, so a grep for it finds nothing else


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


@pytest.fixture(scope="module")
def sasl(kit):
    """The SASL endpoint, a user ``fusion-<run>`` with ACLs for a fusion deployment, and a user without any."""
    if stack_ports() and not listening(sasl_servers()):
        stack("restart", "kafka")  # the config with the SASL listener is written on start
    servers = sasl_servers()
    wait_for(lambda: listening(servers), 60, f"the SASL listener at {servers}")
    admin = AdminClient({"bootstrap.servers": kit.servers})
    user, stranger = f"fusion-{RUN_ID}", f"stranger-{RUN_ID}"
    creds = [UserScramCredentialUpsertion(u, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_256, 4096), p.encode())
             for u, p in ((user, PASSWORD), (stranger, "stranger-pw"))]
    for f in admin.alter_user_scram_credentials(creds).values():
        f.result(30)
    env = isolated_env("kafka", db=14)
    run = env["FUSION_TEST_RUN"]
    principal = f"User:{user}"
    bindings = [AclBinding(rtype, name, pattern, principal, "*", AclOperation.ALL, AclPermissionType.ALLOW)
                for rtype, name, pattern in (
                    (ResourceType.TOPIC, run, ResourcePatternType.PREFIXED),            # reactors, their DLQs
                    (ResourceType.TOPIC, "fusion.rt.", ResourcePatternType.PREFIXED),   # return topics
                    (ResourceType.TOPIC, "fusion.waits", ResourcePatternType.PREFIXED),  # the registry
                    (ResourceType.GROUP, "fusion.", ResourcePatternType.PREFIXED))]     # its consumer groups
    bindings += [AclBinding(ResourceType.BROKER, "kafka-cluster", ResourcePatternType.LITERAL, principal, "*", op,
                            AclPermissionType.ALLOW) for op in (AclOperation.DESCRIBE, AclOperation.IDEMPOTENT_WRITE)]
    for f in admin.create_acls(bindings).values():
        f.result(30)
    # ACLs reach the broker's authorizer through the metadata log: wait until they hold.
    wait_for(lambda: authorized(servers, user, PASSWORD, f"{run}.probe", kit), 60, "the ACLs to be in force",
             interval=1.0)
    config = {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-256",
              "sasl.username": user, "sasl.password": PASSWORD}
    yield {"servers": servers, "user": user, "stranger": stranger, "env": env, "run": run, "config": config}
    filters = [AclBindingFilter(b.restype, b.name, b.resource_pattern_type, b.principal, b.host, b.operation,
                                b.permission_type) for b in bindings]
    for f in admin.delete_acls(filters).values():
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
    """Produce one record with a client of ``config``, in a process of its own (librdkafka SASL clients
    have crashed the interpreter at exit), and say what happened."""
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(config), topic], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def authorized(servers: str, user: str, password: str, topic: str, kit) -> bool:
    kit.topic(topic)
    return probe({"bootstrap.servers": servers, "security.protocol": "SASL_PLAINTEXT",
                  "sasl.mechanism": "SCRAM-SHA-256", "sasl.username": user, "sasl.password": password},
                 topic)["delivered"]


def test_fusion_celery_works_with_credentials_from_its_settings(sasl, kit, worker_factory, request):
    env = {**sasl["env"], "FUSION_KAFKA_BOOTSTRAP_SERVERS": sasl["servers"],
           "FUSION_KAFKA_CONFIG": json.dumps(sasl["config"])}
    w = worker_factory(name="sasl", env=env, concurrency=2)
    events = capture_events(sasl["env"]["CELERY_BROKER_URL"])
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
    events.stop()
    # The secret is nowhere: worker log, task arguments and results in Redis, the events Flower shows.
    log = w.log()
    assert "SASL" in log or "serving" in log
    assert PASSWORD not in log
    backend = redis.Redis.from_url(sasl["env"]["CELERY_RESULT_BACKEND"])
    for key in backend.scan_iter("*"):
        value = backend.dump(key) or b""
        assert PASSWORD.encode() not in value, f"the password is in Redis key {key!r}"
    assert events.seen, "no task events were captured"
    assert PASSWORD not in json.dumps(events.seen, default=str)


class capture_events(threading.Thread):
    """Every Celery event on ``broker`` while it runs (what Flower would show: task arguments, results)."""

    def __init__(self, broker: str) -> None:
        super().__init__(daemon=True)
        from kombu import Connection

        from fusion_celery import app
        self.app, self.conn = app, Connection(broker)
        self.seen: list[dict] = []
        self.ready = threading.Event()
        self.should_stop = False
        self.start()
        self.ready.wait(10)

    def run(self) -> None:
        recv = self.app.events.Receiver(self.conn, handlers={"*": self.seen.append})
        self.ready.set()
        try:
            for _ in recv.consume(limit=None, timeout=1, wakeup=False):
                if self.should_stop:
                    return
        except Exception:
            return

    def stop(self) -> None:
        wait_for(lambda: any(e.get("type") == "task-succeeded" for e in self.seen), 30, "task events")
        self.should_stop = True
        self.join(5)
        self.conn.release()


def test_a_client_without_credentials_is_refused(sasl, kit):
    topic = kit.topic(f"{sasl['run']}.add.refused")
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


def test_acls_hold_for_an_authenticated_user_without_them(sasl, kit):
    topic = kit.topic(f"{sasl['run']}.add.acl")
    assert not authorized(sasl["servers"], sasl["stranger"], "stranger-pw", topic, kit)
    assert authorized(sasl["servers"], sasl["user"], PASSWORD, topic, kit)
    outside = kit.topic(f"outside.{RUN_ID}.{uuid.uuid4().hex[:6]}")
    assert not authorized(sasl["servers"], sasl["user"], PASSWORD, outside, kit)


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
