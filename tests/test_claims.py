"""Once-only claims in the real Redis result backend (fusion_celery.claims)."""

from __future__ import annotations

import uuid

import pytest
from support.ports import free_port
from support.redis_server import redis_server
from support.waiting import wait_for

from fusion_celery import claims
from fusion_celery.application import create_app

pytestmark = pytest.mark.integration


@pytest.fixture
def app(stack):
    a = create_app("claims-test", backend=stack["backend"], broker=stack["broker"])
    yield a
    a.close()


def test_a_claim_is_taken_once_and_can_be_released(app):
    name = f"test-{uuid.uuid4().hex}"
    assert claims.claim(app, name, ttl=30)
    assert not claims.claim(app, name, ttl=30), "a second claim of a held marker must fail"
    assert claims.is_claimed(app, name)
    claims.release(app, name)
    assert not claims.is_claimed(app, name)
    assert claims.claim(app, name, ttl=30), "a released marker can be taken again"
    claims.release(app, name)


def test_a_retried_claim_whose_first_try_went_through_is_still_ours(app):
    """The SET NX may reach Redis and its reply be lost with the connection: the retry finds its own
    token and takes the claim, where a plain SET NX would answer "duplicate" and drop the work."""
    key = claims._key(f"test-{uuid.uuid4().hex}")
    client = app.backend.client
    try:
        assert claims._set_nx(client, key, "token-a", 30)
        assert claims._set_nx(client, key, "token-a", 30), "the same token (a retry) must get the claim"
        assert not claims._set_nx(client, key, "token-b", 30), "another token (a duplicate) must not"
    finally:
        client.delete(key)


def test_a_claim_rides_out_a_redis_that_is_not_up_yet(tmp_path, caplog, monkeypatch):
    """Claims go through the result backend's ``ensure`` (its retry policy, about a minute in the
    fusion app): a dispatch that claims while Redis restarts waits for it instead of failing."""
    import threading

    port = free_port()
    monkeypatch.delenv("CELERY_RESULT_BACKEND", raising=False)  # it would win over backend=
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    app = create_app("claims-late", backend=f"redis://127.0.0.1:{port}/0", broker=f"redis://127.0.0.1:{port}/1")
    outcome: list = []
    t = threading.Thread(target=lambda: outcome.append(claims.claim(app, "late", ttl=30)), daemon=True)
    t.start()
    # The backend logs each failed try ("Connection to Redis lost: Retry (1/24) ...").
    wait_for(lambda: not t.is_alive() or "Retry (" in caplog.text, 30, "the claim to fail a first try")
    assert t.is_alive(), f"the claim did not wait for Redis: {outcome} {caplog.text[-2000:]}"
    server = redis_server(port, tmp_path)
    try:
        wait_for(lambda: not t.is_alive(), 60, "the claim to go through once Redis is up")
        assert outcome == [True]
    finally:
        server.terminate()
        server.wait(10)
        app.close()


def test_a_held_lease_outlives_its_ttl_in_redis_and_a_copy_takes_it_only_after_its_holder_let_go(app):
    """The renewer keeps a live holder's lease (1 s ttl) for four renewals; a copy's :func:`claims.acquire`
    finds it held all along, and takes it once the holder let go and the lease ran out."""
    from fusion_celery import keepalive
    name = f"test-{uuid.uuid4().hex}"
    state, token, ttl = claims.acquire(app, name, 1)
    assert state == "taken"
    r = keepalive.renewer()
    renewed = r.renewed
    with keepalive.held(app, claims.key_of(name), token, ttl):
        wait_for(lambda: r.renewed >= renewed + 4, 10, "four renewals", interval=0.05)
        assert claims.acquire(app, name, 1)[0] == "held"
    wait_for(lambda: claims.acquire(app, name, 30)[0] == "taken", 5, "the lease to run out", interval=0.1)
    claims.finish(app, name)
    assert claims.acquire(app, name, 30)[0] == "done"
    claims.release(app, name)
