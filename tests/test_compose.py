"""docker-compose.yml, checked where no Docker engine runs.

The file is valid against the Compose specification's JSON schema (the copy
check-jsonschema ships, as its pre-commit hook ``check-compose-spec`` uses it).
Its services run what stack/stack.sh runs as plain processes: the Kafka and
ZooKeeper versions of stack/*-pom.xml, the broker settings and listeners of the
stack's Kafka, the zoo.cfg and Redis options of the stack.  Then the services,
images, ports, commands, health checks and start order of the deployment, and
the consistency of the application containers' settings with the Kafka
listeners, the registry and fusion-celery's own settings.
"""

from __future__ import annotations

import copy
import re
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema
from support.stack import ROOT

STACK = (ROOT / "stack" / "stack.sh").read_text()


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def compose_validator() -> jsonschema.protocols.Validator:
    schema = get_builtin_schema("vendor.compose-spec")
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def command(service: dict) -> str:
    cmd = service["command"]
    return " ".join(cmd) if isinstance(cmd, list) else cmd


def env(service: dict) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {k: str(v) for k, v in raw.items()}


def test_the_services_and_their_images(services):
    assert set(services) == {"kafka", "redis", "zookeeper", "worker", "flower", "client"}
    assert re.fullmatch(r"apache/kafka:\d+\.\d+\.\d+", services["kafka"]["image"])
    assert services["redis"]["image"].startswith("redis:")
    assert services["zookeeper"]["image"].startswith("zookeeper:")
    for name in ("worker", "flower", "client"):
        assert services[name]["image"].startswith("python:3.1"), name
        assert "/app" in services[name]["working_dir"]


def test_kafka_runs_in_kraft_mode(services):
    kafka = env(services["kafka"])
    assert set(kafka["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert kafka["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{kafka['KAFKA_NODE_ID']}@kafka:")
    assert "CLUSTER_ID" in kafka
    assert not any("ZOOKEEPER" in key for key in kafka), "KRaft: Kafka itself needs no ZooKeeper"


def test_ports(services):
    published = {name: [str(p) for p in s.get("ports", [])] for name, s in services.items()}
    assert "9092:9092" in published["kafka"]
    assert "6379:6379" in published["redis"]
    assert "2181:2181" in published["zookeeper"]
    assert "5555:5555" in published["flower"]


def test_commands(services):
    assert re.search(r"celery -A fusion_celery worker\b", command(services["worker"]))
    assert re.search(r"celery -A fusion_celery flower --port=5555\b", command(services["flower"]))
    assert re.search(r"python -m examples\.math\.client\b", command(services["client"]))
    assert str(services["client"].get("restart")) == "no"  # one-shot


def test_the_worker_serves_the_math_example_that_exists(services):
    imports = env(services["worker"])["FUSION_IMPORTS"].split(",")
    assert imports == ["examples.math.reactors"]
    assert (ROOT / "examples" / "math" / "reactors.py").is_file()
    assert (ROOT / "examples" / "math" / "client.py").is_file()


def test_every_service_others_wait_for_has_a_health_check(services):
    for name in ("kafka", "redis", "zookeeper", "worker", "flower"):
        check = services[name].get("healthcheck")
        assert check and check.get("test"), f"{name} has no health check"


def test_start_order_waits_for_health(services):
    def waits_for(name: str) -> dict[str, str]:
        deps = services[name].get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on needs conditions, not a bare list"
        return {dep: spec.get("condition") for dep, spec in deps.items()}

    infra = {"kafka": "service_healthy", "redis": "service_healthy", "zookeeper": "service_healthy"}
    assert waits_for("worker") == infra
    assert waits_for("flower") == {**infra, "worker": "service_healthy"}
    assert waits_for("client") == {**infra, "worker": "service_healthy", "flower": "service_healthy"}
    for name in services:
        for dep, condition in (services[name].get("depends_on") or {}).items():
            assert dep in services
            if condition.get("condition") == "service_healthy":
                assert services[dep].get("healthcheck"), f"{name} waits for {dep} to be healthy, which has no check"


def test_application_settings_match_the_services(services):
    from fusion_celery.config import SETTINGS
    known = {s.env for s in SETTINGS}
    kafka = env(services["kafka"])
    advertised = kafka["KAFKA_ADVERTISED_LISTENERS"]
    for name in ("worker", "flower", "client"):
        e = env(services[name])
        assert e["FUSION_KAFKA_BOOTSTRAP_SERVERS"] in advertised, "the containers use an advertised listener"
        assert e["CELERY_BROKER_URL"].startswith("redis://redis:6379/")
        assert e["CELERY_RESULT_BACKEND"].startswith("redis://redis:6379/")
        assert e["FUSION_ZOOKEEPER_HOSTS"] == "zookeeper:2181"
        unknown = {k for k in e if k.startswith("FUSION_") and k not in known}
        assert not unknown, f"{name}: {unknown} are not fusion-celery settings"


# -- the Compose specification ----------------------------------------------------------------


def schema_errors(validator, document: dict) -> list[str]:
    """Every error the schema finds, with those under a failed ``anyOf``/``oneOf`` (a wrong value deep in a
    property that takes several forms is reported there), as ``json path: message``."""
    def flatten(errors):
        for error in errors:
            yield error
            yield from flatten(error.context or ())
    return sorted(f"{e.json_path}: {e.message}" for e in flatten(validator.iter_errors(document)))


def test_the_file_is_valid_against_the_compose_specification(compose, compose_validator):
    assert compose_validator.schema["title"] == "Compose Specification"
    assert not schema_errors(compose_validator, compose)


def test_the_schema_check_refuses_what_compose_would_refuse(compose, compose_validator):
    broken = copy.deepcopy(compose)
    broken["services"]["worker"]["depends_on"]["kafka"]["condition"] = "service_ready"
    broken["services"]["redis"]["healthcheck"]["intervall"] = "3s"
    broken["services"]["kafka"]["ports"] = {"9092": 9092}
    broken["service"] = {}
    errors = schema_errors(compose_validator, broken)
    paths = {error.split(":", 1)[0] for error in errors}
    assert {"$", "$.services.worker.depends_on.kafka.condition", "$.services.redis.healthcheck",
            "$.services.kafka.ports"} <= paths, errors


# -- in step with stack/stack.sh --------------------------------------------------------------


def pom_version(name: str) -> str:
    pom = (ROOT / "stack" / f"{name}-pom.xml").read_text()
    return re.search(rf"<{name}\.version>\s*([^<\s]+)\s*</{name}\.version>", pom).group(1)


def stack_default(variable: str) -> str:
    """The default stack.sh gives ``variable`` (``NAME="${FUSION_NAME:-default}"``)."""
    return re.search(rf'^{variable}="\$\{{FUSION_{variable}:-(.*)\}}"$', STACK, re.M).group(1)


def heredoc(function: str) -> dict[str, str]:
    """The ``key=value`` lines of the file the shell function ``function`` of stack.sh writes with a heredoc."""
    body = re.search(rf"^{function}\(\) \{{.*?<<EOF[^\n]*\n(.*?)\nEOF$", STACK, re.M | re.S).group(1)
    lines = [line for line in body.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def kafka_env(prop: str) -> str:
    """The apache/kafka image's variable for a broker property: `.` -> `_`, `_` -> `__`, `-` -> `___`."""
    return "KAFKA_" + prop.replace("_", "__").replace("-", "___").replace(".", "_").upper()


def listeners(spec: str) -> dict[str, tuple[str, int]]:
    """``NAME://host:port,...`` as {name: (host, port)}."""
    out = {}
    for item in spec.split(","):
        name, _, address = item.partition("://")
        host, _, port = address.rpartition(":")
        out[name] = (host, int(port))
    return out


def stack_kafka_ports() -> dict[str, int]:
    """The ports of the stack's Kafka node 1, by the shell function stack.sh computes each with."""
    port = int(stack_default("KAFKA_PORT"))
    sasl = re.fullmatch(r"\$\(\(KAFKA_PORT \+ (\d+)\)\)", stack_default("KAFKA_SASL_PORT"))
    return {"kafka_port": port, "controller_port": int(stack_default("KAFKA_CONTROLLER_PORT")),
            "sasl_port": port + int(sasl.group(1))}


#: Broker properties whose values name hosts, listeners or paths of the stack's machine; the
#: listeners are compared by port and protocol (test_kafka_listens_as_the_stack_does).
CONTAINER_SPECIFIC = {"listeners", "advertised.listeners", "listener.security.protocol.map",
                      "inter.broker.listener.name", "controller.quorum.voters", "log.dirs"}
#: What the shell variables of stack.sh's broker properties hold for one node, the topology compose runs.
SINGLE_NODE = {"$n": "1", "$rf": "1", "$isr": "1"}


def test_the_images_are_the_versions_the_stack_runs(services):
    kafka, zookeeper = pom_version("kafka"), pom_version("zookeeper")
    assert services["kafka"]["image"] == f"apache/kafka:{kafka}", f"stack/kafka-pom.xml runs Kafka {kafka}"
    assert services["zookeeper"]["image"] == f"zookeeper:{zookeeper}", f"stack/zookeeper-pom.xml runs {zookeeper}"
    # stack.sh runs the machine's Debian redis-server; the image pins a minor version, never a floating tag
    assert re.fullmatch(r"redis:\d+\.\d+", services["redis"]["image"]), services["redis"]["image"]


def test_kafka_has_every_broker_setting_of_the_stack(services):
    stack = heredoc("write_kafka_config")
    assert {"process.roles", "auto.create.topics.enable", "authorizer.class.name"} <= stack.keys()
    kafka = env(services["kafka"])
    for prop, value in stack.items():
        if prop in CONTAINER_SPECIFIC:
            continue
        value = SINGLE_NODE.get(value, value)
        assert "$" not in value, f"stack.sh sets {prop}={value}: add what one node makes of it to SINGLE_NODE"
        assert kafka.get(kafka_env(prop)) == value, f"{prop}: the stack sets {value!r}"
    properties = {kafka_env(prop) for prop in stack}
    extra = {key for key in kafka if key.startswith("KAFKA_") and key != "KAFKA_HEAP_OPTS"} - properties
    assert not extra, f"broker settings the stack does not make: {extra}"
    assert kafka["KAFKA_HEAP_OPTS"] == stack_default("KAFKA_HEAP")


def test_kafka_listens_as_the_stack_does(services):
    stack = heredoc("write_kafka_config")
    ports = stack_kafka_ports()
    stack_listeners = {name: ports[fn] for name, fn in
                       re.findall(r'(\w+)://\$HOST:\$\((\w+) "\$n"\)', stack["listeners"])}
    stack_advertised = set(re.findall(r'(\w+)://\$HOST:', stack["advertised.listeners"]))
    stack_protocols = dict(item.split(":") for item in stack["listener.security.protocol.map"].split(","))
    assert set(stack_listeners) == set(stack_protocols) and stack_advertised

    kafka = env(services["kafka"])
    listening = listeners(kafka["KAFKA_LISTENERS"])
    advertised = listeners(kafka["KAFKA_ADVERTISED_LISTENERS"])
    protocols = dict(item.split(":") for item in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    by_port = {port: name for name, (_host, port) in listening.items()}
    published = {str(p) for p in services["kafka"]["ports"]}
    for name, port in stack_listeners.items():
        assert port in by_port, f"the stack's {name} listener is on port {port}"
        mine = by_port[port]
        assert protocols[mine] == stack_protocols[name], f"port {port}"
        if name in stack_advertised:
            assert advertised[mine] == ("localhost", port), f"the host reaches {name} on localhost:{port}"
            assert f"{port}:{port}" in published, f"the host reaches {name} on port {port}"
    assert protocols[kafka["KAFKA_INTER_BROKER_LISTENER_NAME"]] == stack_protocols[stack["inter.broker.listener.name"]]
    assert kafka["KAFKA_CONTROLLER_LISTENER_NAMES"] == stack["controller.listener.names"]
    # per-listener settings (listener.name.<name>.*) apply to the listener of that name
    assert listening["SASL_PLAINTEXT"][1] == ports["sasl_port"]
    # the containers reach the broker on a PLAINTEXT listener of their own, by the service's name
    assert advertised["INTERNAL"][0] == "kafka" and protocols["INTERNAL"] == "PLAINTEXT"


#: zoo.cfg keys and the zookeeper image's variables for them.
ZOO_ENV = {"tickTime": "ZOO_TICK_TIME", "initLimit": "ZOO_INIT_LIMIT", "syncLimit": "ZOO_SYNC_LIMIT",
           "maxClientCnxns": "ZOO_MAX_CLIENT_CNXNS", "4lw.commands.whitelist": "ZOO_4LW_COMMANDS_WHITELIST",
           "admin.enableServer": "ZOO_ADMINSERVER_ENABLED",
           "autopurge.snapRetainCount": "ZOO_AUTOPURGE_SNAPRETAINCOUNT",
           "autopurge.purgeInterval": "ZOO_AUTOPURGE_PURGEINTERVAL"}


def test_zookeeper_has_the_zoo_cfg_of_the_stack(services):
    stack = heredoc("start_zookeeper")
    assert stack["clientPort"] == "$ZOOKEEPER_PORT"
    zookeeper = env(services["zookeeper"])
    for key, value in stack.items():
        if key in {"dataDir", "clientPort", "clientPortAddress"}:  # paths and the loopback of the stack's machine
            continue
        assert key in ZOO_ENV, f"stack.sh's zoo.cfg sets {key}: add the image's variable for it to ZOO_ENV"
        assert zookeeper.get(ZOO_ENV[key]) == value, f"{key}: the stack sets {value!r}"
    port = stack_default("ZOOKEEPER_PORT")
    assert f"{port}:2181" in [str(p) for p in services["zookeeper"]["ports"]], "the image listens on 2181"


def test_redis_runs_with_the_options_of_the_stack(services):
    assert re.search(r'--save "" --appendonly "\$aof"', STACK) and re.search(r"local aof=no\b", STACK)
    cmd = services["redis"]["command"]
    assert cmd[cmd.index("--save") + 1] == "", "no snapshots, as with the stack"
    assert cmd[cmd.index("--appendonly") + 1] == "no", "no append-only file, as with the stack (FUSION_REDIS_PERSIST=0)"
    port = stack_default("REDIS_PORT")
    assert f"{port}:6379" in [str(p) for p in services["redis"]["ports"]]


def test_the_application_containers_keep_their_waits_in_the_zookeeper_service(services):
    from fusion_celery.backends.zookeeper import parse_url
    for name in ("worker", "flower", "client"):
        e = env(services[name])
        url = e.get("FUSION_REGISTRY_URL", "")
        assert urlparse(url).scheme == "zookeeper", f"{name}: FUSION_REGISTRY_URL={url!r}"
        hosts, path = parse_url(url, e["FUSION_ZOOKEEPER_HOSTS"])
        assert hosts == "zookeeper:2181" and path == "/fusion", name
    assert services["worker"]["depends_on"]["zookeeper"]["condition"] == "service_healthy"
