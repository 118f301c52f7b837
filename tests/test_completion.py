"""Deferred completion against the real Redis backend: a chord part is counted even when Redis goes
away between storing a parked task's outcome and counting it (fusion_celery.completion)."""

from __future__ import annotations

import base64
import json
import uuid

import pytest
import redis

from fusion_celery.clock import now_ms
from fusion_celery.completion import complete
from fusion_celery.registry import Wait

pytestmark = pytest.mark.integration


def _chord(app, parts: int) -> tuple[str, str, list[Wait]]:
    """A chord of ``parts`` parked header tasks whose body goes to a queue of its own."""
    gid, queue = str(uuid.uuid4()), f"completion-test-{uuid.uuid4().hex}"
    body = app.signature("completion-test.body", queue=queue)
    app.backend.set_chord_size(gid, parts)
    waits = []
    for i in range(parts):
        request = {"id": str(uuid.uuid4()), "task": "fusion.dispatch", "group": gid, "group_index": i,
                   "chord": dict(body), "root_id": gid, "ignore_result": False, "delivery_info": {}}
        waits.append(Wait(id=request["id"], return_topic=f"rt.{i}", topic="dep", deadline=now_ms() + 60_000,
                          request=request))
    return gid, queue, waits


def _bodies(stack, queue: str) -> int:
    return redis.Redis.from_url(stack["broker"]).llen(queue)


class _RedisGoesAwayOnce:
    """Stands in for the backend's chord count: the first call fails as a Redis connection loss would."""

    def __init__(self, real):
        self.real, self.calls = real, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 1:
            raise redis.exceptions.ConnectionError("Connection closed by server.")
        return self.real(*args, **kwargs)


def test_a_retried_completion_counts_the_chord_part_its_first_try_did_not(app, stack, monkeypatch):
    """The outcome was stored, then Redis went away before the chord part was counted: the waiter's
    retry must count it (the outcome is already there), or the chord body never runs."""
    _gid, queue, (first, second) = _chord(app, 2)
    complete(app, first, result=1, done={})
    assert _bodies(stack, queue) == 0, "the body must wait for the second part"
    flaky = _RedisGoesAwayOnce(app.backend.on_chord_part_return)
    monkeypatch.setattr(app.backend, "on_chord_part_return", flaky)
    done: dict[str, bool] = {}
    with pytest.raises(redis.exceptions.ConnectionError):
        complete(app, second, result=2, done=done)
    assert done == {"stored": True}, done
    assert app.backend.get_state(second.id) == "SUCCESS"
    complete(app, second, result=2, done=done)  # the waiter's retry
    assert flaky.calls == 2
    assert _bodies(stack, queue) == 1, "the chord body was not sent after the retried completion"
    complete(app, second, result=2, done={})  # a replay after a restart sends nothing more
    assert _bodies(stack, queue) == 1


def test_a_completion_replayed_by_a_new_waiter_counts_a_part_stored_but_never_counted(app, stack):
    """A waiter died (or lost Redis for good) between storing the outcome and counting the chord part;
    the next waiter replays the wait: the part is counted and the body sent, once."""
    _gid, queue, (first, second) = _chord(app, 2)
    complete(app, first, result=1, done={})
    app.backend.store_result(second.id, 2, "SUCCESS")  # what the dead waiter got done
    assert _bodies(stack, queue) == 0
    complete(app, second, result=2, done={})
    assert _bodies(stack, queue) == 1, "the replayed completion did not count the stored part"
    complete(app, second, result=2, done={})
    assert _bodies(stack, queue) == 1, "a second replay must not send the body again"


def test_a_replayed_failure_of_a_part_already_stored_as_a_success_sends_no_error_reply(app, stack):
    """A waiter replaying a wait whose outcome is already a success (its deadline passed meanwhile)
    must not answer the reactor with an error: the success stands and the chord goes on."""
    from fusion_celery import claims
    from fusion_celery.errors import DependencyTimeout

    _gid, queue, (first, second) = _chord(app, 2)
    reactor_id = str(uuid.uuid4())
    second.reactor = {"id": reactor_id, "topic": "r", "message": {"return_topic": "nowhere", "id": "m"}}
    complete(app, first, result=1, done={})
    app.backend.store_result(second.id, 2, "SUCCESS")
    complete(app, second, exc=DependencyTimeout("dep 'x' did not reply"), done={})
    assert not claims.is_claimed(app, f"reply-{reactor_id}"), "an error reply was sent for a stored success"
    assert _bodies(stack, queue) == 1, "the stored success was not counted"


def test_a_completion_replayed_after_the_outcome_was_stored_sends_the_next_chain_step(app, stack):
    """Every parked request is ``chain(dispatch, next)``: a waiter that died after storing the outcome
    left the next step unsent; the waiter that replays the wait (with nothing done) must send it."""
    queue = f"completion-test-{uuid.uuid4().hex}"
    nxt = app.signature("completion-test.next", queue=queue)
    nxt.freeze()
    request = {"id": str(uuid.uuid4()), "task": "fusion.dispatch", "chain": [dict(nxt)],
               "ignore_result": False, "delivery_info": {}}
    wait = Wait(id=request["id"], return_topic="rt.chain", topic="dep", deadline=now_ms() + 60_000,
                request=request, dep="one", carry={"zero": 0})
    app.backend.store_result(wait.id, {"zero": 0, "one": 1}, "SUCCESS")  # what the dead waiter got done
    assert _bodies(stack, queue) == 0
    complete(app, wait, result=1, done={})
    assert _bodies(stack, queue) == 1, "the replayed completion did not send the chain's next step"
    sent = json.loads(redis.Redis.from_url(stack["broker"]).lindex(queue, 0))
    assert sent["headers"]["id"] == nxt.id, "the next step must keep its frozen task id (its claim dedupes it)"
    assert json.loads(base64.b64decode(sent["body"]))[0] == [{"zero": 0, "one": 1}], \
        "the next step must receive the stored value"
