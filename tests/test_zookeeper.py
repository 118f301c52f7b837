"""The ZooKeeper registry: pure bucket/partition logic, then the registry against the real ZooKeeper.

The worker-level guarantees (deps-maps, kill -9 takeover) run for every registry in test_deps.py and
test_crash.py; a ZooKeeper restart in the middle of a run is at the end of this module.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from urllib.parse import unquote

import pytest
from celery import Celery
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError
from kazoo.security import OPEN_ACL_UNSAFE, make_digest_acl
from support.kafka import return_topic_name
from support.ports import free_port
from support.stack import ROOT, RUN_ID
from support.waiting import wait_for
from support.workers import isolated_env

from fusion_celery.backends.memory import MemoryRegistry
from fusion_celery.backends.zookeeper import (
    ZooKeeperRegistry,
    bucket_of,
    diff_children,
    digest_auth,
    node_name,
    parse_url,
    share,
)
from fusion_celery.errors import ConfigurationError
from fusion_celery.registry import Wait, registry_for


# -- pure logic ----------------------------------------------------------------------------------
def test_bucket_of_is_stable_across_processes_and_versions():
    # Changing the hash would strand every wait stored by an older version: these values are fixed.
    assert bucket_of("7b0f6e7c-2f1e-4d8a-9c1e-3a2b1c0d9e8f", 12) == 2
    assert bucket_of("k1", 12) == 1
    assert bucket_of("", 12) == 0


def test_bucket_of_spreads_task_ids_evenly():
    n, buckets = 12_000, 12
    counts = Counter(bucket_of(str(uuid.uuid4()), buckets) for _ in range(n))
    assert set(counts) == set(range(buckets))
    assert all(abs(c - n / buckets) < 0.15 * n / buckets for c in counts.values()), counts


@pytest.mark.parametrize("members", [1, 2, 3, 5, 12, 13])
def test_share_gives_each_bucket_to_exactly_one_member(members):
    buckets = list(range(12))
    names = [f"w{i}@host-{uuid.uuid4().hex[:4]}" for i in range(members)]
    shares = {name: share(name, names, buckets) for name in names}
    taken = [b for s in shares.values() for b in s]
    assert sorted(taken) == buckets
    sizes = [len(s) for s in shares.values()]
    assert max(sizes) - min(sizes) <= 1


def test_share_does_not_depend_on_the_order_members_are_listed_in():
    names = ["c", "a", "b"]
    for order in itertools.permutations(names):
        assert {n: share(n, order, range(7)) for n in names} == {"a": [0, 3, 6], "b": [1, 4], "c": [2, 5]}


def test_diff_children():
    known = {"a": "id-a", "b": "id-b"}
    assert diff_children(known, ["b", "c", "d"]) == (["c", "d"], ["a"])
    assert diff_children({}, []) == ([], [])


@pytest.mark.parametrize("wait_id", ["0e6e1c9e-7f3c-4c7b-9d2a-1b2c3d4e5f60", "a/b", ".", "..", "x.y%z"])
def test_node_name_is_a_valid_znode_name_and_reversible(wait_id):
    name = node_name(wait_id)
    assert "/" not in name and name not in (".", "..")
    assert unquote(name) == wait_id


def test_node_name_keeps_task_ids_readable():
    tid = str(uuid.uuid4())
    assert node_name(tid) == tid


@pytest.mark.parametrize("url,hosts,path", [
    ("zookeeper://zk1:2181,zk2:2181/fusion/prod", "zk1:2181,zk2:2181", "/fusion/prod"),
    ("zookeeper://zk1:2181", "zk1:2181", "/fusion"),
    ("zookeeper:///waits", "default:2181", "/waits"),
    ("zookeeper://h:1/x/", "h:1", "/x"),
])
def test_parse_url(url, hosts, path):
    assert parse_url(url, "default:2181") == (hosts, path)


@pytest.mark.parametrize("url", ["zookeeper://h:1/a//b", "zookeeper://h:1/a/../b", "zookeeper://h:1/a?x=1"])
def test_parse_url_rejects_bad_paths(url):
    with pytest.raises(ConfigurationError, match="bad ZooKeeper path"):
        parse_url(url, "default:2181")


def test_registry_url_selects_zookeeper_and_connects_lazily():
    app = Celery("zk-lazy", set_as_current=False)
    app.conf.fusion_registry_url = "zookeeper://127.0.0.1:1/lazy"
    reg = registry_for(app)
    assert isinstance(reg, ZooKeeperRegistry)
    assert reg._zk is None  # nothing connects before first use (fork safety)
    reg.close()


def test_memory_and_default_registries_always_run_exclusive_jobs():
    with MemoryRegistry().exclusive("reaper") as mine:
        assert mine


# -- the registry against the real ZooKeeper ------------------------------------------------------
def make_wait(wait_id: str | None = None) -> Wait:
    wid = wait_id or str(uuid.uuid4())
    return Wait(id=wid, return_topic=f"fusion.rt.0.{wid}", topic="t", deadline=2**62, request={"id": wid})


class Held:
    """What a watcher reports it owns, kept up to date by :meth:`update` (called from the test thread)."""

    def __init__(self, watcher) -> None:
        self.watcher, self.ids = watcher, set()

    def update(self) -> set[str]:
        for change in self.watcher.poll(0.05):
            if change.kind == "add":
                self.ids.add(change.wait.id)
            else:
                self.ids -= set(change.ids)
        return self.ids


@pytest.fixture
def zk_registry(zookeeper):
    """Makes registries on a fresh ZooKeeper path (each one its own client, so its own session)."""
    root = f"/fusion-test-{RUN_ID}-{uuid.uuid4().hex[:6]}"
    made = []

    def make(hosts: str = zookeeper, **conf) -> ZooKeeperRegistry:
        app = Celery("zk-test", set_as_current=False)
        app.conf.update({"fusion_registry_partitions": 6, "fusion_zookeeper_time_boundary": 0.3, **conf})
        reg = ZooKeeperRegistry(app, f"zookeeper://{hosts}{root}")
        made.append(reg)
        return reg

    yield make
    for reg in made:
        reg.close()
    from kazoo.client import KazooClient
    zk = KazooClient(hosts=zookeeper)
    zk.start(10)
    zk.delete(root, recursive=True)
    zk.stop()
    zk.close()


@pytest.mark.integration
def test_register_stores_a_znode_per_wait_in_its_bucket(zk_registry):
    reg = zk_registry()
    waits = [make_wait() for _ in range(5)]
    for w in waits:
        reg.register(w)
    zk = reg.client()
    for w in waits:
        data, _ = zk.get(f"{reg.path}/buckets/{bucket_of(w.id, 6)}/{w.id}")
        assert Wait.from_json(data) == w
    assert sorted(w.id for w in reg.pending()) == sorted(w.id for w in waits)
    reg.remove(waits[0])
    reg.remove(waits[0])  # removing twice is harmless
    assert sorted(w.id for w in reg.pending()) == sorted(w.id for w in waits[1:])


def follow_a_stored_a_new_and_a_removed_wait(reg, name: str) -> tuple[Held, Wait]:
    """Watch ``reg`` as ``name`` while a stored wait is found, a new one registered and the stored one removed;
    returns the watcher (for the caller to close) and the wait left."""
    old = make_wait()
    reg.register(old)
    held = Held(reg.watch(name))
    wait_for(lambda: held.update() == {old.id}, 30, "the stored wait to be reported")
    new = make_wait()
    reg.register(new)
    wait_for(lambda: held.update() == {old.id, new.id}, 10, "the new wait to be reported")
    reg.remove(old)
    wait_for(lambda: held.update() == {new.id}, 10, "the removed wait to be reported gone")
    return held, new


@pytest.mark.integration
def test_watcher_reports_stored_new_and_removed_waits(zk_registry):
    held, _ = follow_a_stored_a_new_and_a_removed_wait(zk_registry(), "solo")
    held.watcher.close()


@pytest.mark.integration
def test_two_watchers_divide_the_buckets_and_one_takes_over_when_the_other_leaves(zk_registry):
    ra, rb = zk_registry(), zk_registry()
    waits = {w.id for w in (make_wait() for _ in range(30))}
    for wid in waits:
        ra.register(make_wait(wid))
    a, b = Held(ra.watch("a")), Held(rb.watch("b"))
    try:
        def divided():
            ia, ib = a.update(), b.update()
            return ia and ib and not ia & ib and ia | ib == waits and \
                sorted(a.watcher.buckets + b.watcher.buckets) == list(range(6))
        wait_for(divided, 60, "both watchers to own a share of the waits")
        a.watcher.close()
        wait_for(lambda: b.update() == waits and b.watcher.buckets == list(range(6)), 60,
                 "the remaining watcher to take every bucket over")
    finally:
        a.watcher.close()
        b.watcher.close()


@pytest.mark.integration
def test_exclusive_runs_a_job_in_one_place_at_a_time(zk_registry):
    ra, rb = zk_registry(), zk_registry()
    with ra.exclusive("reaper") as first:
        assert first
        with rb.exclusive("reaper") as second:
            assert not second
        with rb.exclusive("other-job") as other:
            assert other
    with rb.exclusive("reaper") as after:
        assert after


@pytest.mark.integration
def test_unreachable_zookeeper_fails_new_waits_with_a_clear_error(zk_registry):
    hosts = f"127.0.0.1:{free_port()}"
    reg = zk_registry(hosts=hosts, fusion_zookeeper_connect_timeout=1.0)
    with pytest.raises(ConfigurationError, match=rf"ZooKeeper at {hosts} .*unreachable"):
        reg.register(make_wait())
    with pytest.raises(ConfigurationError, match="ZooKeeper"):
        reg.pending()
    reg.remove(make_wait())  # kept for later, never raises
    with reg.exclusive("reaper") as mine:
        assert not mine


@pytest.mark.integration
def test_a_wait_too_large_for_a_znode_is_refused_naming_it(zk_registry):
    reg = zk_registry()
    w = make_wait()
    w.carry = {"big": "x" * 1_100_000}
    with pytest.raises(Exception, match="more than the 1000000 a ZooKeeper znode holds"):
        reg.register(w)



# -- digest authentication and ACLs ----------------------------------------------------------------
ZK_USER = "fusion"
ZK_PASSWORD = f"zk-{uuid.uuid4().hex}"  # unique, so a search for it finds nothing else


def zk_client(hosts: str, auth: tuple[str, str] | None = None) -> KazooClient:
    """A started kazoo client, unauthenticated or authenticated with the digest ``(user, password)``."""
    zk = KazooClient(hosts=hosts, timeout=5, auth_data=[("digest", ":".join(auth))] if auth else None)
    zk.start(10)
    return zk


def znodes(zk: KazooClient, path: str) -> Iterator[str]:
    """``path`` and every znode under it."""
    yield path
    for child in zk.get_children(path):
        yield from znodes(zk, f"{path}/{child}")


@pytest.fixture
def zk_auth(zookeeper):
    """Makes registries that authenticate as ``ZK_USER`` on a fresh path; removes the path as that
    identity afterwards (nobody else may)."""
    root = f"/fusion-test-{RUN_ID}-auth-{uuid.uuid4().hex[:6]}"
    made: list[ZooKeeperRegistry] = []

    def make(**conf) -> ZooKeeperRegistry:
        app = Celery("zk-auth-test", set_as_current=False)
        app.conf.update({"fusion_registry_partitions": 6, "fusion_zookeeper_time_boundary": 0.3,
                         "fusion_zookeeper_connect_timeout": 3.0, "fusion_zookeeper_username": ZK_USER,
                         "fusion_zookeeper_password": ZK_PASSWORD, **conf})
        reg = ZooKeeperRegistry(app, f"zookeeper://{zookeeper}{root}")
        made.append(reg)
        return reg

    make.root = root  # type: ignore[attr-defined]
    yield make
    for reg in made:
        reg.close()
    zk = zk_client(zookeeper, (ZK_USER, ZK_PASSWORD))
    zk.delete(root, recursive=True)
    zk.stop()
    zk.close()


@pytest.mark.integration
def test_a_registry_with_digest_auth_works_and_every_znode_it_makes_admits_only_its_identity(
        zk_auth, zookeeper, caplog):
    caplog.set_level(1)  # everything, kazoo's own request log (level 5 and DEBUG) included
    reg = zk_auth()
    held, new = follow_a_stored_a_new_and_a_removed_wait(reg, "auth")
    try:
        assert [w.id for w in reg.pending()] == [new.id]
        assert reg.open_znodes() == []
        with reg.exclusive("reaper") as mine:
            assert mine
            # While a wait, the waiters' party and bucket locks and an exclusive lock all exist: every znode
            # under the path carries the digest ACL of ZK_USER and nothing else.
            zk = zk_client(zookeeper, (ZK_USER, ZK_PASSWORD))
            try:
                acls = {path: zk.get_acls(path)[0] for path in znodes(zk, zk_auth.root)}
            finally:
                zk.stop()
                zk.close()
        expected = [make_digest_acl(ZK_USER, ZK_PASSWORD, all=True)]
        assert {path: acl for path, acl in acls.items() if acl != expected} == {}
        kinds = {path[len(zk_auth.root) + 1:].split("/")[0] for path in acls if path != zk_auth.root}
        assert kinds == {"buckets", "waiters", "exclusive"}
        assert reg.wait_path(new.id) in acls
        assert any(p.startswith(f"{zk_auth.root}/waiters/party/") for p in acls)
        assert any(p.startswith(f"{zk_auth.root}/waiters/locks/0/") for p in acls)
        assert any(p.startswith(f"{zk_auth.root}/exclusive/reaper/") for p in acls)
    finally:
        held.watcher.close()
    assert "Auth(" in caplog.text, "kazoo's request log was not captured: the next check proves nothing"
    assert ZK_PASSWORD not in caplog.text


def intrusions(zk: KazooClient, reg: ZooKeeperRegistry, w: Wait) -> dict[str, Callable[[], object]]:
    """What another client might try on the znodes of ``reg``, whose wait ``w`` is pending."""
    root, bucket, wait_path = reg.path, reg.bucket_path(bucket_of(w.id, reg.buckets)), reg.wait_path(w.id)
    return {
        "read a wait": lambda: zk.get(wait_path),
        "list a bucket": lambda: zk.get_children(bucket),
        "list the root": lambda: zk.get_children(root),
        "list the waiters": lambda: zk.get_children(f"{root}/waiters/party"),
        "change a wait": lambda: zk.set(wait_path, make_wait().to_json()),
        "plant a wait": lambda: zk.create(f"{bucket}/{uuid.uuid4()}", make_wait().to_json()),
        "delete a wait": lambda: zk.delete(wait_path),
        "join the waiters": lambda: zk.create(f"{root}/waiters/party/intruder", ephemeral=True),
        "take a bucket lock": lambda: zk.create(f"{root}/waiters/locks/0/intruder", ephemeral=True),
        "take the reaper's lock": lambda: zk.create(f"{root}/exclusive/reaper/intruder", ephemeral=True),
        "change the root's ACL": lambda: zk.set_acls(root, OPEN_ACL_UNSAFE),
    }


@pytest.mark.integration
def test_the_znodes_of_an_authenticated_registry_refuse_every_other_client(zk_auth, zookeeper):
    reg = zk_auth()
    w = make_wait()
    reg.register(w)
    held = Held(reg.watch("auth"))
    try:
        wait_for(lambda: held.update() == {w.id}, 30, "the wait to be reported (party and locks in place)")
        with reg.exclusive("reaper") as mine:
            assert mine
            for who, auth in [("an unauthenticated client", None),
                              ("the same user with a wrong password", (ZK_USER, "wrong-" + ZK_PASSWORD)),
                              ("another user", ("mallory", ZK_PASSWORD))]:
                zk = zk_client(zookeeper, auth)
                try:
                    for what, attempt in intrusions(zk, reg, w).items():
                        with pytest.raises(NoAuthError):
                            attempt()
                            pytest.fail(f"{who} could {what}")
                finally:
                    zk.stop()
                    zk.close()
        assert [x.to_json() for x in reg.pending()] == [w.to_json()]  # untouched
        assert held.update() == {w.id}
    finally:
        held.watcher.close()
    # A registry with the wrong password fails clearly, naming the settings and not the password.
    wrong = zk_auth(fusion_zookeeper_password="wrong-" + ZK_PASSWORD)
    for call in (lambda: wrong.register(make_wait()), wrong.pending):
        with pytest.raises(ConfigurationError, match="NoAuthError .*fusion_zookeeper_password") as exc:
            call()
        assert ZK_PASSWORD not in str(exc.value) and f"user {ZK_USER}" in str(exc.value)


@pytest.mark.integration
def test_a_path_made_before_authentication_was_on_is_reported_open(zk_auth, caplog):
    open_reg = zk_auth(fusion_zookeeper_username="", fusion_zookeeper_password="")
    open_reg.register(make_wait())  # the root and one bucket, open to anyone
    reg = zk_auth()
    exposed = reg.open_znodes()
    assert zk_auth.root in exposed and f"{zk_auth.root}/buckets" in exposed
    held = Held(reg.watch("auth"))
    try:
        wait_for(lambda: "do not have the registry's ACL" in caplog.text, 30, "the waiter's warning")
    finally:
        held.watcher.close()
    assert ZK_PASSWORD not in caplog.text


def test_zookeeper_credentials_come_from_masked_settings_never_from_the_url():
    from celery.app.utils import filter_hidden_settings
    with pytest.raises(ConfigurationError, match="credentials do not go in the URL") as exc:
        parse_url(f"zookeeper://{ZK_USER}:{ZK_PASSWORD}@zk1:2181/fusion", "default:2181")
    assert ZK_PASSWORD not in str(exc.value) and "zk1:2181" in str(exc.value)
    with pytest.raises(ConfigurationError, match="fusion_zookeeper_password is empty"):
        digest_auth(ZK_USER, "")
    with pytest.raises(ConfigurationError, match="fusion_zookeeper_username is empty") as exc:
        digest_auth("", ZK_PASSWORD)
    assert ZK_PASSWORD not in str(exc.value)
    with pytest.raises(ConfigurationError, match="cannot contain ':'"):
        digest_auth("a:b", ZK_PASSWORD)
    assert digest_auth("", "") == ([], None)
    # Flower and `celery inspect conf` show the settings through Celery's filter
    shown = filter_hidden_settings({"fusion_zookeeper_username": ZK_USER, "fusion_zookeeper_password": ZK_PASSWORD})
    assert ZK_PASSWORD not in json.dumps(shown) and ZK_USER in json.dumps(shown)
    app = Celery("zk-where", set_as_current=False)
    app.conf.update(fusion_zookeeper_username=ZK_USER, fusion_zookeeper_password=ZK_PASSWORD)
    reg = ZooKeeperRegistry(app, "zookeeper://127.0.0.1:1/where")
    assert reg.where == f"ZooKeeper at 127.0.0.1:1 (path /where, user {ZK_USER})"
    assert ZK_PASSWORD not in repr(vars(reg)).replace(repr(reg._auth_data), "")
    reg.close()


# -- a ZooKeeper restart in the middle of a run (real workers) -------------------------------------
def stack(*args: str) -> None:
    subprocess.run(["bash", str(ROOT / "stack" / "stack.sh"), *args], check=True, timeout=180)


@pytest.mark.integration
@pytest.mark.faults
def test_zookeeper_restart_mid_run_loses_no_wait(kit, service, worker_factory, redis_client, zookeeper):
    env = isolated_env("zookeeper")
    run = env["FUSION_TEST_RUN"]
    worker_factory(name="zkrestart", env=env, concurrency=2)
    gate_topic = kit.topic()
    gate = service(gate_topic, lambda data: {"echo": data})
    gate.hold = True
    n = 30
    backs = [kit.topic(return_topic_name()) for _ in range(n)]
    for i, back in enumerate(backs):
        kit.producer.produce(f"{run}.generic", json.dumps({
            "data": {"deps": {"g": {"topic": gate_topic, "args": [i]}}, "echo": i},
            "return-topic": back, "id": f"z{i}"}))
    kit.producer.flush(30)
    wait_for(lambda: len(gate.received) >= n, 120, f"{n} dependency requests (waits registered)")

    stack("stop", "zookeeper")
    try:
        # While ZooKeeper is down a new wait cannot be stored: the caller gets an error naming it.
        late = kit.topic(return_topic_name())
        kit.send(f"{run}.generic", {"data": {"deps": {"g": {"topic": gate_topic, "args": ["late"]}}},
                                    "return-topic": late, "id": "late"})
        [msg] = kit.read(late, 1, timeout=120)
        body, headers = json.loads(msg.value()), dict(msg.headers() or [])
        assert headers["fusion-status"] == b"error"
        assert "ZooKeeper" in body["error"]["message"] and zookeeper in body["error"]["message"]
        gate.hold = False
        gate.release()  # the replies wait in Kafka until the waiter owns its buckets again
    finally:
        stack("start", "zookeeper")

    got = {}
    for i, back in enumerate(backs):
        [msg] = kit.read(back, 1, timeout=180)
        got[i] = json.loads(msg.value())
    assert got == {i: {"results": {"g": {"echo": [i]}}, "echo": i} for i in range(n)}
    runs = [int(redis_client.get(f"bodyruns:{run}:z{i}") or 0) for i in range(n)]
    assert runs == [1] * n, f"chord bodies ran {runs}"
    assert len(gate.received) == n, "a dependency request was sent twice (or the late one was sent)"
