"""Who may complete a wait: only a reply to the wait's own request (real broker, real workers).

A return topic's name is all a caller gives away, and anybody can write to a topic they know, or name it
as the return topic of a request of their own.  The waiter therefore completes a wait only with a record
that carries the wait's id, or with a record that carries no fusion header at all (a service that knows
nothing of fusion-celery), and drops everything else (fusion_celery.protocol.reply_rejection).
"""

from __future__ import annotations

import json

import pytest
from support.kafka import return_topic_name
from support.stack import RUN_ID
from support.waiting import wait_for
from support.workers import isolated_env

from fusion_celery.protocol import reply_rejection


def park_on_gate(kit, service, reactor_topic: str, request_id: str):
    """A generic-reactor request whose one dep waits on a held service; returns (gate, caller's topic)."""
    gate = service(kit.topic(), lambda data: {"real": data})
    gate.hold = True
    back = kit.topic(return_topic_name())
    kit.send(reactor_topic, {"data": {"deps": {"x": {"topic": gate.topic, "args": [1]}}}, "return-topic": back,
                             "id": request_id})
    wait_for(lambda: gate.received, 60, "the dependency request (the wait parked)")
    return gate, back


def dropped(worker, topic: str) -> int:
    return worker.log().count(f"dropped the record {topic}[")


@pytest.mark.integration
def test_a_stranger_cannot_complete_another_callers_wait(kit, services_worker, service):
    gate, back = park_on_gate(kit, service, f"{RUN_ID}.generic", "victim-1")
    victim = gate.received[0]["return-topic"]

    # A request without an id to a fusion reactor, naming the victim's live return topic: the reactor
    # answers there with fusion-status and no fusion-id.
    kit.send(f"{RUN_ID}.add", {"data": [100, 1], "return-topic": victim})
    wait_for(lambda: kit.read(victim, 1), 60, "the fusion reactor's answer on the victim's topic")
    # Records written straight to the topic: another id, a fusion status without an id.
    kit.send(victim, json.dumps(666), headers=[("fusion-id", b"someone-else")])
    kit.send(victim, json.dumps(667), headers=[("fusion-status", b"ok")])
    kit.send(victim, json.dumps({"error": {"type": "X", "message": "spoofed"}}), headers=[("fusion-status", b"error")])
    wait_for(lambda: dropped(services_worker, victim) >= 4, 60, "the waiter to drop the four strangers' records")

    gate.release()  # the real dependency answers, with no fusion header (a plain service)
    [answer] = kit.read(back, 1, timeout=60)
    assert json.loads(answer.value()) == {"results": {"x": {"real": [1]}}, "echo": None}
    assert dict(answer.headers())["fusion-status"] == b"ok"
    assert dropped(services_worker, victim) == 4


@pytest.mark.integration
def test_with_the_id_required_only_a_reply_echoing_it_completes_the_wait(kit, worker_factory, service):
    env = {**isolated_env("kafka", db=8), "FUSION_REPLY_ID_REQUIRED": "true"}
    w = worker_factory(name="idreq", env=env)
    gate, back = park_on_gate(kit, service, f"{env['FUSION_TEST_RUN']}.generic", "req-1")
    request = gate.received[0]
    gate.reply(request["return-topic"], "no id")  # a plain service that does not echo the id
    wait_for(lambda: dropped(w, request["return-topic"]) == 1, 60, "the waiter to drop the reply without an id")
    gate.reply(request["return-topic"], "echoed", headers=[("fusion-id", request["id"].encode())])
    [answer] = kit.read(back, 1, timeout=60)
    assert json.loads(answer.value())["results"] == {"x": "echoed"}


@pytest.mark.parametrize(("headers", "require", "accepted"), [
    ([], False, True),                                          # a plain service
    ([], True, False),                                          # ... not when the id is required
    ([("fusion-id", b"w-1")], True, True),                      # the wait's own id
    ([("fusion-id", b"w-1"), ("fusion-status", b"ok")], False, True),
    ([("fusion-id", b"w-2")], False, False),                    # another wait's id
    ([("fusion-id", b"w-2"), ("fusion-status", b"ok")], False, False),
    ([("fusion-status", b"ok")], False, False),                 # a fusion reply to a request without id
    ([("fusion-status", b"error")], False, False),
    ([("fusion-id", b"")], False, False),                       # an empty id is an id, and not this one
])
def test_reply_rejection_rules(headers, require, accepted):
    assert (reply_rejection(headers, "w-1", require_id=require) is None) is accepted
