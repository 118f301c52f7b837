"""Where fusion-celery's requests land: keyed by their id they spread over a topic's partitions, keyed by the
caller they stay on one (no services: an in-process worker on the stub Kafka).

A reactor whose topic has six partitions answers with the partition, key and id of the request it got.
The stub partitions by key with librdkafka's default partitioner (CRC-32), so the partition a key picks
is known (:func:`~fusion_celery.testing.broker.partition_for`).
"""

from __future__ import annotations

import json
import logging
import types
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from click.testing import CliRunner
from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from fusion_celery import Message, Pipeline, reactor
from fusion_celery.cli import fusion as fusion_cli
from fusion_celery.pipeline import PIPELINE_TASK
from fusion_celery.testing import in_process_app, worker
from fusion_celery.testing.app import kafka_broker
from fusion_celery.testing.broker import partition_for
from fusion_celery.testing.kafka import Consumer

PARTITIONS = 6
ANSWER_TIMEOUT = 15.0
#: Task ids of the spreading test's pipeline calls: fixed, so the partitions they pick are too.
CALL_IDS = [str(uuid.uuid5(uuid.NAMESPACE_URL, f"fusion-keys/{i}")) for i in range(60)]


def fan_deps(message: Message) -> dict[str, Any]:
    """``n`` deps on the ``spread`` reactor, all with the request's ``key`` if it has one."""
    key = {"key": message.data["key"]} if message.data.get("key") else {}
    return {f"d{i}": {"topic": "spread", "args": i, **key} for i in range(message.data["n"])}


@pytest.fixture(scope="module")
def fusion() -> Iterator[Celery]:
    """An app with a six-partition reactor, a reactor whose deps-map calls it, and a topic nobody serves."""
    app = in_process_app("keys", fusion_default_timeout=ANSWER_TIMEOUT)

    @reactor("spread", app=app, partitions=PARTITIONS)
    def spread(message: Message) -> dict[str, Any]:
        return {"partition": message.partition, "key": message.key, "id": message.id}

    @reactor("fan", app=app, deps=fan_deps)
    def fan(message: Message, results: dict[str, Any]) -> dict[str, Any]:
        return results

    kafka_broker(app).create_topic("sink", PARTITIONS)
    with worker(app):
        yield app


def partition_of(key: str) -> int:
    return partition_for(key.encode(), PARTITIONS)


def test_pipeline_calls_are_keyed_by_their_id_and_reach_every_partition(fusion):
    spread = Pipeline("spread", app=fusion)
    pending = [spread.apply_async(args=(i,), task_id=task_id) for i, task_id in enumerate(CALL_IDS)]
    answers = [r.get(timeout=ANSWER_TIMEOUT) for r in pending]
    assert [(a["key"], a["id"]) for a in answers] == [(task_id, task_id) for task_id in CALL_IDS]
    assert all(a["partition"] == partition_of(a["key"]) for a in answers)
    assert {a["partition"] for a in answers} == set(range(PARTITIONS))


def test_a_deps_maps_requests_are_keyed_by_their_id_and_spread(fusion):
    answers = Pipeline("fan", app=fusion).delay({"n": 120}).get(timeout=ANSWER_TIMEOUT)
    assert len(answers) == 120
    assert all(a["key"] == a["id"] and a["partition"] == partition_of(a["key"]) for a in answers.values())
    assert len({a["id"] for a in answers.values()}) == 120
    # Random ids (derived from the run's): all six partitions miss one with a chance of about 2e-9.
    assert {a["partition"] for a in answers.values()} == set(range(PARTITIONS))


def test_an_entitys_key_keeps_its_requests_on_one_partition(fusion):
    spread = Pipeline("spread", app=fusion)
    answers = [r.get(timeout=ANSWER_TIMEOUT) for r in [spread.delay(i, key="account-42") for i in range(12)]]
    assert {(a["partition"], a["key"]) for a in answers} == {(partition_of("account-42"), "account-42")}
    assert len({a["id"] for a in answers}) == 12, "the requests keep ids of their own"

    fanned = Pipeline("fan", app=fusion).delay({"n": 12, "key": "account-7"}).get(timeout=ANSWER_TIMEOUT)
    assert {(a["partition"], a["key"]) for a in fanned.values()} == {(partition_of("account-7"), "account-7")}


def test_fire_and_forget_is_keyed_by_its_id_or_the_callers_key(fusion):
    sink = Pipeline("sink", app=fusion)
    plain = sink.delay({"x": 1}, wait=False)
    assert plain.get(timeout=ANSWER_TIMEOUT)["partition"] == partition_of(plain.id)
    keyed = [sink.delay({"x": i}, wait=False, key="device-9").get(timeout=ANSWER_TIMEOUT) for i in range(3)]
    assert {r["partition"] for r in keyed} == {partition_of("device-9")}
    by_name = fusion.send_task(PIPELINE_TASK, args=["sink", 5], kwargs={"wait": False, "key": "device-9"})
    assert by_name.get(timeout=ANSWER_TIMEOUT)["partition"] == partition_of("device-9")


def test_a_key_is_a_string_and_only_a_topic_pipeline_takes_one(fusion):
    spread = Pipeline("spread", app=fusion)
    assert "key" not in spread.s(1).kwargs, "without a key, the call is the one a worker without keys takes"
    assert spread.s(1, key="k").kwargs["key"] == "k"
    assert spread.si(1, key="k").kwargs["key"] == "k"
    with pytest.raises(TypeError, match="must be a string"):
        spread.s(1, key=42)
    with pytest.raises(TypeError, match="must be a string"):
        fusion.send_task(PIPELINE_TASK, args=["spread", 1], kwargs={"key": 42}).get(timeout=ANSWER_TIMEOUT)
    fan_out = Pipeline(deps={"a": {"topic": "spread"}}, name="keys-fan-out", app=fusion)
    with pytest.raises(ValueError, match="give its deps a 'key'"):
        fan_out.s(1, key="k")


@pytest.fixture
def cli(fusion) -> Iterator[Any]:
    """``cli(*args)``: run ``celery fusion ...`` on the in-process app; the loggers it quiets are restored."""
    quieted = {name: logging.getLogger(name).level
               for name in ("fusion_celery.rdkafka", "fusion_celery.transport", "fusion_celery.clients")}

    def run(*args: str) -> Any:
        result = CliRunner().invoke(fusion_cli, list(args), obj=types.SimpleNamespace(app=fusion))
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    yield run
    for name, level in quieted.items():
        logging.getLogger(name).setLevel(level)


def test_celery_fusion_call_keys_by_key_then_id_and_never_by_topic(fusion, cli):
    records = [cli("call", "sink", '{"cli": 1}', "--key", "k-1"), cli("call", "sink", '{"cli": 2}', "--id", "corr-2"),
               cli("call", "sink", '{"cli": 3}', "--id", "corr-3", "--key", "k-1"), cli("call", "sink", '{"cli": 4}')]
    assert [r["partition"] for r in records[:3]] == [partition_of("k-1"), partition_of("corr-2"), partition_of("k-1")]
    reader = Consumer({"bootstrap.servers": fusion.conf.fusion_kafka_bootstrap_servers, "group.id": "keys-cli"})
    got: dict[int, bytes] = {}
    try:
        reader.assign([TopicPartition("sink", p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
        for _ in range(100):
            for m in reader.consume(100, timeout=0.05):
                data = json.loads(m.value())["data"] if m.error() is None else None
                if isinstance(data, dict) and "cli" in data:
                    got[data["cli"]] = m.key()
            if len(got) == 4:
                break
    finally:
        reader.close()
    assert [got[1], got[2], got[3]] == [b"k-1", b"corr-2", b"k-1"]
    assert len(got[4]) == 32 and got[4] != b"sink", "without --key or --id, a fresh random key"
