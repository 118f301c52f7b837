"""Pending waits in ZooKeeper: persistent znodes in buckets, divided among the waiters with kazoo.

Layout under the path of the registry URL (``zookeeper://host:2181/fusion``)::

    /fusion/buckets/<n>/<wait id>     one persistent znode per pending wait (the Wait as JSON)
    /fusion/waiters/party/...         the live waiters (ephemeral; kazoo SetPartitioner)
    /fusion/waiters/locks/<n>/...     the waiter that owns bucket n (ephemeral lock)
    /fusion/exclusive/<job>/...       jobs that run in one place at a time, e.g. the reaper

A wait goes to bucket ``crc32(id) % fusion_registry_partitions``.  The waiters
divide the buckets among themselves with kazoo's ``SetPartitioner``: each one
locks its share, follows its buckets with children watches and reports their
waits to its :class:`~fusion_celery.waiter.Waiter`.  When a waiter leaves or its
session expires (``kill -9``: after ``fusion_zookeeper_session_timeout``), the
others release and divide the buckets again, so its waits get a new owner.

A lost connection (SUSPENDED) makes a waiter give up its buckets at once (it
cannot know whether it still holds them); it takes a share again once
reconnected.  While ZooKeeper is unreachable ``register`` fails within
``fusion_zookeeper_connect_timeout`` seconds with a
:class:`~fusion_celery.errors.ConfigurationError` naming the hosts, so new
waits fail clearly; waits already stored are completed once it is back.

Every process has its own :class:`~kazoo.client.KazooClient`, made on first use
(never at import, so a fork never inherits a live session) and closed by
:meth:`ZooKeeperRegistry.close`.

A wait names the task a waiter completes and the signatures it applies, so
whoever can write these znodes decides what the workers run.  With
``fusion_zookeeper_username`` and ``fusion_zookeeper_password`` set, the client
authenticates with ZooKeeper's ``digest`` scheme and every znode it creates
(the root path, buckets, waits, the waiters' party and locks, exclusive locks)
gets a digest ACL that admits that identity alone: other clients cannot list,
read, create, change or delete them.  The credentials come from settings, never
from the URL: Celery masks a setting named ``*password*`` where it shows the
configuration (``celery inspect conf``, Flower), not a URL.  The password is
never logged nor put in an error message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import quote, urlparse

from celery import Celery
from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, LockTimeout, NoAuthError, NodeExistsError, NoNodeError
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.serialization import Auth
from kazoo.protocol.states import KazooState
from kazoo.recipe.partitioner import SetPartitioner
from kazoo.retry import KazooRetry
from kazoo.security import ACL, make_digest_acl

from ..config import settings
from ..errors import ConfigurationError, FusionError
from ..registry import Change, Registry, Wait, Watcher

__all__ = ["ZooKeeperRegistry", "ZooKeeperWatcher", "bucket_of", "node_name", "share", "parse_url",
           "diff_children", "digest_auth", "MAX_NODE_BYTES"]

logger = logging.getLogger(__name__)

#: Largest wait stored (ZooKeeper's default ``jute.maxbuffer`` is 1 MiB per request, framing included).
MAX_NODE_BYTES = 1_000_000
#: Seconds between two full re-listings of the owned buckets (a safety net under the watches).
RESYNC_INTERVAL = 10.0
#: Seconds :meth:`ZooKeeperRegistry.exclusive` waits for a lock held elsewhere before giving up.
EXCLUSIVE_WAIT = 1.0
#: ZooKeeper errors a registry call turns into a FusionError.
ZK_ERRORS = (KazooException, KazooTimeoutError)


class _HideAuth(logging.Filter):
    """Masks the credentials of kazoo's ``Auth`` request, which kazoo logs at DEBUG on every connection
    (``Sending request(xid=-4): Auth(..., auth='user:password')``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, Auth) for a in record.args):
            record.args = tuple(a._replace(auth="***") if isinstance(a, Auth) else a for a in record.args)
        return True


#: The logger the registry's kazoo clients log to (kazoo's own), with the credentials masked.
kazoo_logger = logging.getLogger("kazoo.client")
kazoo_logger.addFilter(_HideAuth())


# -- pure helpers --------------------------------------------------------------------------------
def bucket_of(wait_id: str, buckets: int) -> int:
    """The bucket of a wait: the same in every process and Python version (CRC-32 of the id)."""
    return zlib.crc32(wait_id.encode()) % buckets


def node_name(wait_id: str) -> str:
    """The znode name of a wait: its id, percent-escaped so that no id can make a bad path."""
    return quote(wait_id, safe="-_@:").replace(".", "%2E")


def share(identifier: str, members: Iterable[str], buckets: Iterable[Any]) -> list[Any]:
    """The buckets ``identifier`` takes among ``members``: every len(members)-th one, from its rank.

    Every member computes the same division from the same membership, whatever
    order it lists the members in; each bucket goes to exactly one member and
    shares differ by at most one bucket.
    """
    ranked = sorted(members)
    return sorted(buckets)[ranked.index(identifier)::len(ranked)]


def diff_children(known: dict[str, str], children: Sequence[str]) -> tuple[list[str], list[str]]:
    """Compare a bucket's znodes with what was reported: (names to read and add, names that are gone)."""
    present = set(children)
    return sorted(present - known.keys()), sorted(known.keys() - present)


def parse_url(url: str, default_hosts: str) -> tuple[str, str]:
    """``zookeeper://h1:2181,h2:2181/fusion`` -> (hosts, root path); hosts default to ``default_hosts``.

    Credentials in the URL (``zookeeper://user:password@host/path``) are refused: Celery shows
    ``fusion_registry_url`` unmasked, so they belong in ``fusion_zookeeper_username`` and
    ``fusion_zookeeper_password``.  Error messages show the URL without its userinfo.
    """
    parsed = urlparse(url)
    _userinfo, at, hostinfo = parsed.netloc.rpartition("@")
    shown = parsed._replace(netloc=f"***@{hostinfo}" if at else hostinfo).geturl()
    if parsed.scheme != "zookeeper":
        raise ConfigurationError(f"fusion_registry_url={shown!r}: not a zookeeper:// URL")
    if at:
        raise ConfigurationError(f"fusion_registry_url={shown!r}: credentials do not go in the URL (Celery shows "
                                 f"it unmasked); set fusion_zookeeper_username and fusion_zookeeper_password")
    hosts = parsed.netloc or default_hosts
    path = "/" + parsed.path.strip("/") if parsed.path.strip("/") else "/fusion"
    if not hosts:
        raise ConfigurationError(f"fusion_registry_url={shown!r} names no ZooKeeper host and "
                                 f"fusion_zookeeper_hosts is empty")
    if any(part in ("", ".", "..") for part in path.split("/")[1:]) or parsed.query or parsed.fragment:
        raise ConfigurationError(f"fusion_registry_url={shown!r}: bad ZooKeeper path {parsed.path!r} "
                                 f"(use zookeeper://host:port/some/path)")
    return hosts, path


def digest_auth(username: str, password: str) -> tuple[list[tuple[str, str]], list[ACL] | None]:
    """kazoo's ``auth_data`` and ``default_acl`` for ZooKeeper digest authentication as ``username``.

    The ACL gives that identity every permission and nobody else any.  Without a username: no
    authentication and kazoo's default ACL (open to every client).  A username without a password (or
    the reverse) is refused, as is a ``:`` in the username (the digest scheme splits ``user:password``
    at the first one); the messages never show the password.
    """
    if not username and not password:
        return [], None
    if not username or not password:
        missing = "fusion_zookeeper_password" if username else "fusion_zookeeper_username"
        raise ConfigurationError(f"ZooKeeper digest authentication needs both fusion_zookeeper_username and "
                                 f"fusion_zookeeper_password; {missing} is empty")
    if ":" in username:
        raise ConfigurationError(f"fusion_zookeeper_username={username!r}: a digest user name cannot contain ':'")
    return [("digest", f"{username}:{password}")], [make_digest_acl(username, password, all=True)]


# -- the registry --------------------------------------------------------------------------------
class ZooKeeperRegistry(Registry):
    """Pending waits as znodes (``zookeeper://host:port[,host:port]/path``).

    Connects on first use, never here.

    Parameters:
        app: the app (its ``fusion_zookeeper_*`` settings, ``fusion_registry_partitions``).
        url: ``zookeeper://host:port[,host:port]/path``; without hosts, ``fusion_zookeeper_hosts``.

    Raises:
        ConfigurationError: the URL or the settings are invalid (see :func:`parse_url`,
            :func:`digest_auth`).
    """

    def __init__(self, app: Celery, url: str) -> None:
        self.app = app
        self.url = url
        conf = settings(app)
        self.hosts, self.path = parse_url(url, str(conf.zookeeper_hosts or ""))
        self.buckets = conf.registry_partitions
        if self.buckets < 1:
            raise ConfigurationError(f"fusion_registry_partitions={self.buckets}: must be at least 1")
        self.session_timeout = conf.zookeeper_session_timeout
        self.connect_timeout = conf.zookeeper_connect_timeout
        self.time_boundary = conf.zookeeper_time_boundary
        self.username = str(conf.zookeeper_username or "")
        # The password lives only in these two (kazoo sends auth_data on every connection).
        self._auth_data, self.acl = digest_auth(self.username, str(conf.zookeeper_password or ""))
        self._zk: KazooClient | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._closing = threading.Event()
        self._backlog: set[str] = set()  # znodes to delete once connected again
        self._backlog_lock = threading.Lock()

    # -- paths ---------------------------------------------------------------------------------
    def bucket_path(self, bucket: int) -> str:
        return f"{self.path}/buckets/{bucket}"

    def wait_path(self, wait_id: str) -> str:
        return f"{self.bucket_path(bucket_of(wait_id, self.buckets))}/{node_name(wait_id)}"

    @property
    def where(self) -> str:
        """Where the waits are, for messages: the hosts, the path and the user (never the password)."""
        user = f", user {self.username}" if self.username else ""
        return f"ZooKeeper at {self.hosts} (path {self.path}{user})"

    def refused(self, exc: KazooException) -> str:
        """``exc`` as a message, saying what a refusal by the znodes' ACL means here."""
        text = f"{type(exc).__name__} {exc}".rstrip()
        if isinstance(exc, NoAuthError):
            who = f"user {self.username!r}" if self.username else "an unauthenticated client"
            text += (f" (the znodes' ACL does not admit {who}: check fusion_zookeeper_username and "
                     f"fusion_zookeeper_password)")
        return text

    # -- the client ----------------------------------------------------------------------------
    def client(self) -> KazooClient:
        """This process's client, made and started (in the background) on first use."""
        with self._lock:
            if self._closing.is_set():
                raise FusionError(f"the registry in {self.where} is closed")
            if self._zk is None or self._pid != os.getpid():
                # Retries: reconnect every second at most (kazoo's default backs off to an hour), and
                # stop retrying recipe commands once the registry is closing.
                conn_retry = KazooRetry(max_tries=-1, delay=0.1, backoff=2, max_delay=1.0)
                cmd_retry = KazooRetry(max_tries=-1, delay=0.1, backoff=2, max_delay=1.0,
                                       interrupt=self._closing.is_set)
                zk = KazooClient(hosts=self.hosts, timeout=self.session_timeout, connection_retry=conn_retry,
                                 command_retry=cmd_retry, auth_data=self._auth_data or None,
                                 default_acl=self.acl, logger=kazoo_logger)
                zk.add_listener(self._on_state)
                self._pid = os.getpid()
                self._connected.clear()
                zk.start_async()
                self._zk = zk
            return self._zk

    def _on_state(self, state: str) -> None:
        # Runs on kazoo's connection thread: never block here.
        if state == KazooState.CONNECTED:
            self._connected.set()
            with self._backlog_lock:
                pending = bool(self._backlog)
            if pending:
                threading.Thread(target=self._flush_backlog, name="fusion-zk-backlog", daemon=True).start()
        else:
            self._connected.clear()
            if not self._closing.is_set():
                logger.warning("registry: %s: connection %s", self.where, state.lower())

    def connected(self, doing: str) -> KazooClient:
        """The client once connected; a :class:`ConfigurationError` after ``connect_timeout`` s."""
        zk = self.client()
        if not self._connected.wait(self.connect_timeout):
            raise ConfigurationError(f"cannot {doing}: {self.where} is unreachable "
                                     f"(no connection within {self.connect_timeout:g}s)")
        return zk

    def _call(self, doing: str, async_result: Any) -> Any:
        try:
            return async_result.get(timeout=self.connect_timeout)
        except KazooTimeoutError:
            raise ConfigurationError(f"cannot {doing}: {self.where} did not answer within "
                                     f"{self.connect_timeout:g}s") from None

    # -- Registry ------------------------------------------------------------------------------
    def register(self, wait: Wait) -> None:
        data = wait.to_json()
        doing = f"register the wait for {wait.label}"
        if len(data) > MAX_NODE_BYTES:
            raise FusionError(f"cannot {doing}: it is {len(data)} bytes, more than the {MAX_NODE_BYTES} a "
                              f"ZooKeeper znode holds (results carried along are part of it)")
        zk = self.connected(doing)
        path = self.wait_path(wait.id)
        try:
            try:
                self._call(doing, zk.create_async(path, data, makepath=True))
            except NodeExistsError:  # the same task registered again (a redelivery): keep the latest
                self._call(doing, zk.set_async(path, data))
        except KazooException as exc:
            raise ConfigurationError(f"cannot {doing} in {self.where}: {self.refused(exc)}") from None

    def remove(self, wait: Wait) -> None:
        path = self.wait_path(wait.id)
        try:
            self._delete(path)
        except (FusionError, *ZK_ERRORS) as exc:
            logger.warning("registry: cannot remove the wait for %s now (%s); will retry once %s is back",
                           wait.label, exc, self.where)
            with self._backlog_lock:
                self._backlog.add(path)
            if self._connected.is_set():  # it came back meanwhile
                threading.Thread(target=self._flush_backlog, name="fusion-zk-backlog", daemon=True).start()

    def _delete(self, path: str) -> None:
        zk = self.client()
        if not self._connected.is_set():
            raise ConfigurationError(f"{self.where} is unreachable")
        try:
            self._call(f"delete {path}", zk.delete_async(path))
        except NoNodeError:
            pass

    def _flush_backlog(self) -> None:
        with self._backlog_lock:
            paths, self._backlog = self._backlog, set()
        failed = set()
        for path in sorted(paths):
            try:
                self._delete(path)
            except (FusionError, *ZK_ERRORS):
                failed.add(path)
        if failed:
            with self._backlog_lock:
                self._backlog |= failed
        logger.info("registry: did %d wait removal(s) postponed by a ZooKeeper outage", len(paths) - len(failed))

    def pending(self) -> list[Wait]:
        doing = "list the pending waits"
        zk = self.connected(doing)
        try:
            try:
                buckets = self._call(doing, zk.get_children_async(f"{self.path}/buckets"))
            except NoNodeError:
                return []
            listings = [(b, zk.get_children_async(f"{self.path}/buckets/{b}")) for b in buckets]
            reads = []
            for b, listing in listings:
                try:
                    names = self._call(doing, listing)
                except NoNodeError:
                    continue
                reads.extend(zk.get_async(f"{self.path}/buckets/{b}/{name}") for name in names)
            waits = []
            for read in reads:
                try:
                    data, _stat = self._call(doing, read)
                except NoNodeError:  # removed meanwhile
                    continue
                with contextlib.suppress(ValueError, TypeError):
                    waits.append(Wait.from_json(data))
            return waits
        except KazooException as exc:
            raise ConfigurationError(f"cannot {doing} in {self.where}: {self.refused(exc)}") from None

    def watch(self, name: str) -> ZooKeeperWatcher:
        return ZooKeeperWatcher(self, name)

    def open_znodes(self) -> list[str]:
        """The registry's structural znodes whose ACL is not exactly this registry's ACL.

        Only meaningful with authentication on: znodes made before it was turned on (or by
        another identity) keep the ACL they were made with, and a bucket other clients may
        write lets them plant waits.  Checks the root, ``buckets`` and each bucket, and the
        waiters' and exclusive locks' parents that exist; znodes this client may not even
        read the ACL of are listed too.
        """
        if not self.acl:
            return []
        zk = self.connected("check the registry's ACLs")
        paths = [self.path, f"{self.path}/buckets", *(self.bucket_path(b) for b in range(self.buckets)),
                 f"{self.path}/waiters", f"{self.path}/waiters/party", f"{self.path}/waiters/locks",
                 f"{self.path}/exclusive"]
        reads = [(path, zk.get_acls_async(path)) for path in paths]
        found = []
        for path, read in reads:
            try:
                acls, _stat = self._call("check the registry's ACLs", read)
            except NoNodeError:
                continue
            except NoAuthError:
                found.append(path)
                continue
            if sorted(acls) != sorted(self.acl):
                found.append(path)
        return found

    @contextlib.contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        """A ZooKeeper lock on ``<path>/exclusive/<name>``: ``False`` if held elsewhere (after a short wait)."""
        lock, mine = None, False
        try:
            zk = self.connected(f"take the {name!r} lock")
            lock = zk.Lock(f"{self.path}/exclusive/{node_name(name)}",
                           identifier=f"{socket.gethostname()}:{os.getpid()}")
            # Not blocking=False: kazoo then retries a lost connection forever; a short wait is bounded.
            mine = bool(lock.acquire(timeout=EXCLUSIVE_WAIT))
        except LockTimeout:
            mine = False
        except (FusionError, *ZK_ERRORS) as exc:
            logger.warning("registry: %s; %r skipped this round", exc, name)
        try:
            yield mine
        finally:
            if mine and lock is not None:
                try:
                    lock.release()
                except ZK_ERRORS as exc:  # the session ends with the lock anyway
                    logger.warning("registry: cannot release the %r lock: %s", name, exc)

    def close(self) -> None:
        self._closing.set()
        with self._lock:
            zk, self._zk = self._zk, None
        if zk is not None and self._pid == os.getpid():
            try:
                zk.stop()
                zk.close()
            except Exception as exc:  # closing must not fail a shutdown
                logger.debug("registry: closing the ZooKeeper client: %s", exc)


# -- the watcher ---------------------------------------------------------------------------------
class ZooKeeperWatcher(Watcher):
    """A waiter's share of the buckets, reported as changes (see the module docstring).

    A thread of its own runs the SetPartitioner state machine and reads the
    buckets; kazoo's watches only queue the new child lists for it.  The waiter
    thread reads the resulting changes from a thread-safe queue with
    :meth:`poll`, so nothing in the waiter ever blocks on ZooKeeper.
    """

    def __init__(self, registry: ZooKeeperRegistry, name: str) -> None:
        self.registry = registry
        # Party members must be unique: a restarted worker reuses its name while its dead
        # predecessor's session may still be alive.
        self.identifier = f"{name.replace('/', '_')}-{uuid.uuid4().hex[:8]}"
        self.changes: queue.Queue[Change] = queue.Queue()
        self._events: queue.Queue[tuple[int, list[str]] | None] = queue.Queue()
        self._stop = threading.Event()
        self._owned: dict[int, dict[str, str]] = {}  # bucket -> {znode name: wait id ("" if unreadable)}
        self._watched: set[int] = set()
        self._partitioner: SetPartitioner | None = None
        self._paths_ready = False
        self._resync_at = 0.0
        self._warned = False
        self._thread = threading.Thread(target=self._run, name="fusion-zk-watcher", daemon=True)
        self._thread.start()

    # -- Watcher -------------------------------------------------------------------------------
    def poll(self, timeout: float) -> list[Change]:
        changes: list[Change] = []
        try:
            changes.append(self.changes.get(timeout=timeout) if timeout > 0 else self.changes.get_nowait())
            while True:
                changes.append(self.changes.get_nowait())
        except queue.Empty:
            pass
        return changes

    def close(self) -> None:
        self._stop.set()
        self._events.put(None)
        self._thread.join(max(10.0, 2 * self.registry.connect_timeout))
        if self._thread.is_alive():
            logger.warning("waiter: the ZooKeeper watcher did not stop in time; its session ends with the process")

    @property
    def buckets(self) -> list[int]:
        """The buckets this watcher owns now."""
        return sorted(list(self._owned))  # list() copies the keys under the GIL, in one step

    def owned(self) -> list[int]:
        return self.buckets

    # -- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception as exc:  # ZooKeeper errors: keep what we own, look again soon
                logger.warning("waiter: ZooKeeper registry: %s", self.registry.refused(exc)
                               if isinstance(exc, KazooException) else f"{type(exc).__name__}: {exc}")
                self._resync_at = time.monotonic() + 1.0
                self._stop.wait(0.5)
        self._leave()

    def _step(self) -> None:
        reg = self.registry
        zk = reg.client()
        p = self._partitioner
        if p is None:
            if not reg._connected.wait(0.5):
                if not self._warned:
                    logger.warning("waiter: %s is unreachable; waits will be followed once it is back", reg.where)
                    self._warned = True
                return
            self._warned = False
            if not self._paths_ready:
                for b in range(reg.buckets):
                    zk.ensure_path(reg.bucket_path(b))
                self._paths_ready = True
                exposed = reg.open_znodes()
                if exposed:
                    logger.warning("waiter: %s: %d znode(s) do not have the registry's ACL (made before "
                                   "authentication was on, or by another identity), so other clients may "
                                   "write waits into them: %s; let the waits drain and delete the path, or "
                                   "give them the ACL (zkCli setAcl -R)", reg.where, len(exposed),
                                   ", ".join(exposed[:5]) + (" ..." if len(exposed) > 5 else ""))
            self._partitioner = SetPartitioner(zk, f"{reg.path}/waiters", tuple(range(reg.buckets)),
                                               partition_func=share, identifier=self.identifier,
                                               time_boundary=reg.time_boundary)
            logger.info("waiter: joined the ZooKeeper waiters as %s", self.identifier)
            return
        if p.failed:
            logger.warning("waiter: ZooKeeper session lost; its buckets are dropped and it joins again")
            self._drop(list(self._owned))
            self._partitioner = None
            return
        if p.release:
            # Membership changed, or the connection is suspended: stop reporting ownership first.
            self._drop(list(self._owned))
            if reg._connected.is_set():
                p.release_set()
            else:
                self._stop.wait(0.1)
            return
        if p.acquired:
            mine = set(p)
            new = sorted(mine - self._owned.keys())
            for b in new:
                self._acquire(b)
            if new:
                self._resync_at = time.monotonic() + RESYNC_INTERVAL
                logger.info("waiter: owns ZooKeeper buckets %s", self.buckets)
            gone = self._owned.keys() - mine
            if gone:
                self._drop(sorted(gone))
            if mine and time.monotonic() >= self._resync_at:
                self._resync()
        self._process_events(0.1)

    def _acquire(self, bucket: int) -> None:
        self._owned[bucket] = {}
        if bucket in self._watched:
            names = self.registry._call("list a bucket", self.registry.client().get_children_async(
                self.registry.bucket_path(bucket)))
            self._events.put((bucket, names))
        else:
            self._watched.add(bucket)
            # One watch per bucket for the watcher's life: its first call (on this thread) queues the
            # current children, later ones (on kazoo's threads) every change; unowned buckets are ignored.
            self.registry.client().ChildrenWatch(self.registry.bucket_path(bucket),
                                                 func=lambda children, b=bucket: self._on_children(b, children))

    def _on_children(self, bucket: int, children: list[str]) -> bool | None:
        if self._stop.is_set():
            return False  # ends the watch
        self._events.put((bucket, list(children)))
        return None

    def _drop(self, buckets: list[int]) -> None:
        ids: list[str] = []
        for b in buckets:
            ids.extend(i for i in self._owned.pop(b, {}).values() if i)
        if buckets:
            self.changes.put(Change("drop", ids=tuple(ids)))
            logger.info("waiter: released ZooKeeper buckets %s (%d waits)", sorted(buckets), len(ids))

    def _resync(self) -> None:
        zk = self.registry.client()
        listings = [(b, zk.get_children_async(self.registry.bucket_path(b))) for b in sorted(self._owned)]
        for b, listing in listings:
            self._events.put((b, self.registry._call("list a bucket", listing)))
        self._resync_at = time.monotonic() + RESYNC_INTERVAL

    def _process_events(self, timeout: float) -> None:
        try:
            first = self._events.get(timeout=timeout)
        except queue.Empty:
            return
        latest: dict[int, list[str]] = {}
        item = first
        while True:
            if item is not None:
                latest[item[0]] = item[1]  # each list is a full snapshot: the last one is enough
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                break
        for bucket, children in latest.items():
            if bucket in self._owned and not self._stop.is_set():
                self._sync(bucket, children)

    def _sync(self, bucket: int, children: list[str]) -> None:
        reg = self.registry
        known = self._owned[bucket]
        new, gone = diff_children(known, children)
        if gone:
            ids = tuple(i for i in (known.pop(name) for name in gone) if i)
            if ids:
                self.changes.put(Change("remove", ids=ids))
        if not new:
            return
        zk = reg.client()
        reads = [(name, zk.get_async(f"{reg.bucket_path(bucket)}/{name}")) for name in new]
        for name, read in reads:
            try:
                data, _stat = reg._call("read a wait", read)
            except NoNodeError:  # completed and removed meanwhile
                continue
            try:
                wait = Wait.from_json(data)
            except (ValueError, TypeError) as exc:
                logger.error("waiter: unreadable wait %s/%s: %s", reg.bucket_path(bucket), name, exc)
                known[name] = ""
                continue
            known[name] = wait.id
            self.changes.put(Change("add", wait=wait))

    def _leave(self) -> None:
        """Give the buckets back at once (instead of after the session timeout)."""
        self._drop(list(self._owned))
        p, self._partitioner = self._partitioner, None
        if p is not None and self.registry._connected.is_set():
            try:
                p.finish()
            except Exception as exc:
                logger.debug("waiter: leaving the ZooKeeper waiters: %s", exc)
