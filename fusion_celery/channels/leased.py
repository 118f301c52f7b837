"""The ``leased`` reply channel: long-lived return topics, each leased to exactly one wait at a time.

Each worker (its waiter's process) runs a pool, named by a random id per worker
start.  Its state lives next to the results, in the Redis result backend, so that
the worker's pool children lease topics and any worker's waiter gives them back:

- ``fusion-lease-current-<worker name>``: the id of the worker's pool;
- ``fusion-lease-<pool>``: the pool is alive (a key the worker's waiter keeps
  alive, :data:`ALIVE_SECONDS`);
- ``fusion-lease-<pool>-owner``: the worker the pool is (or was) of, kept
  :data:`LEASES_KEPT_SECONDS` after the pool's end: a reaper that finds it and no
  alive key knows the pool ended;
- ``fusion-lease-<pool>-free``: the topics ready for a lease, most recently
  used first, as ``<topic> <offset> <released ms>`` (the offset after the topic's
  last record: where the next wait reads from);
- ``fusion-lease-<pool>-all``: every topic of the pool, ready or leased (its size is
  bounded by ``fusion_lease_pool_max``);
- ``fusion-lease-<pool>-holders``: the wait each leased topic is leased to.  Only
  that wait's end gives the topic back or retires it, so a wait ended twice (a
  completion replayed after a crash) can never hand out a topic leased since.

A dispatch pops a ready topic (one Redis round trip); with none ready the pool
grows by ``fusion_lease_batch`` topics (one CreateTopics) up to its bound, past
which a wait gets an ephemeral topic.  The wait is registered with the topic, its
start offset and its pool, so that it survives its worker as an ephemeral one
does.  When the wait got its reply, the waiter that held it gives the topic back
after ``fusion_lease_cooldown`` seconds, having checked that no record came after
the reply; a topic whose wait timed out or failed, or that received a record it
should not have, is *retired*: deleted and never leased again, so a late reply
can never reach a later wait.  Topics unused for ``fusion_lease_idle`` seconds
are deleted, the ready ones when the worker stops, and the reaper deletes those of
a pool that ended (:func:`pool_states`).  A pool its Redis knows nothing of (one of
another app that shares the Kafka cluster and the prefix) is left alone.

Topic names: ``<prefix>lease.<pool>.<random>``.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from ..claims import with_retry
from ..clients import clients
from ..clock import now_ms
from ..config import settings
from ..errors import FusionError
from ..returntopics import topic_config
from ..transport import transient
from . import Opened, ReplyChannel

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["LeasedChannel", "LeasePool", "ALIVE_SECONDS", "pool_of_topic", "pool_states", "lease_counts"]

logger = logging.getLogger(__name__)

#: Seconds a pool counts as alive after its waiter last said so (it says so every third of that).
ALIVE_SECONDS = 30
#: Seconds a pool's topic lists and leases are kept after its worker last said it is alive (longer than any
#: wait: a wait's end still finds whom its topic is leased to).
LEASES_KEPT_SECONDS = 7 * 24 * 3600
#: Seconds between two rounds of giving back topics whose cooldown is over.
GIVE_BACK_EVERY_SECONDS = 0.1
#: Seconds a worker's pool id is cached by the processes that lease from it.
POOL_ID_CACHE_SECONDS = 5.0
_POOL_RE = re.compile(r"lease\.([0-9a-f]{12})\.")


def _k(pool: str, what: str = "") -> str:
    return f"fusion-lease-{pool}{'-' + what if what else ''}"


def _current(worker: str) -> str:
    return f"fusion-lease-current-{worker}"


#: KEYS: free, holders.  ARGV: wait id.  Leases the most recently given back topic to the wait.
_TAKE = """
local entry = redis.call('LPOP', KEYS[1])
if entry then redis.call('HSET', KEYS[2], string.match(entry, '^[^ ]+'), ARGV[1]) end
return entry
"""
#: KEYS: alive, all, holders.  ARGV: bound, wait id, then candidate names.  Adds as many names as the bound
#: allows (the first one leased to the wait) and returns how many (-1: the pool is not alive).
_GROW = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local room = tonumber(ARGV[1]) - redis.call('SCARD', KEYS[2])
local n = 0
for i = 3, #ARGV do
  if n >= room then break end
  redis.call('SADD', KEYS[2], ARGV[i])
  n = n + 1
end
if n > 0 then redis.call('HSET', KEYS[3], ARGV[3], ARGV[2]) end
return n
"""
#: KEYS: alive, free.  ARGV: entries.  Puts new topics in the pool; 0: the pool is gone.
_ADD_READY = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 1, #ARGV do redis.call('LPUSH', KEYS[2], ARGV[i]) end
return 1
"""
#: KEYS: alive, free, holders, all.  ARGV: wait id, entry.  Gives a topic back when the wait holds it:
#: 1 given back; 0 the wait held it but the pool is gone (the caller deletes it); -1 not the wait's.
_RELEASE = """
local topic = string.match(ARGV[2], '^[^ ]+')
if redis.call('HGET', KEYS[3], topic) ~= ARGV[1] then return -1 end
redis.call('HDEL', KEYS[3], topic)
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SREM', KEYS[4], topic)
  return 0
end
redis.call('LPUSH', KEYS[2], ARGV[2])
return 1
"""
#: KEYS: holders, all.  ARGV: wait id, topic.  Takes a topic out of the pool when the wait holds it:
#: 1 (the caller deletes it), or 0 (not the wait's: somebody else's lease, or ended already).
_RETIRE = """
if redis.call('HGET', KEYS[1], ARGV[2]) ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[2])
redis.call('SREM', KEYS[2], ARGV[2])
return 1
"""
#: KEYS: free, all.  ARGV: the entry at the tail.  Takes it out of the pool if it still is the tail.
_DROP_TAIL = """
if redis.call('LINDEX', KEYS[1], -1) ~= ARGV[1] then return 0 end
redis.call('RPOP', KEYS[1])
redis.call('SREM', KEYS[2], string.match(ARGV[1], '^[^ ]+'))
return 1
"""
#: KEYS: current, alive, free, all, holders.  ARGV: pool id, seconds the leases are remembered.  Ends the
#: pool; returns the topics that were ready (the leased ones are retired by their waits' ends).
_CLOSE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('DEL', KEYS[2])
local free = redis.call('LRANGE', KEYS[3], 0, -1)
redis.call('DEL', KEYS[3])
for _, entry in ipairs(free) do redis.call('SREM', KEYS[4], string.match(entry, '^[^ ]+')) end
redis.call('EXPIRE', KEYS[4], ARGV[2])
redis.call('EXPIRE', KEYS[5], ARGV[2])
return free
"""


def pool_of_topic(name: str, prefix: str) -> str | None:
    """The pool a leased topic belongs to (its name ``<prefix>lease.<pool>.<random>``), or None."""
    if not name.startswith(prefix):
        return None
    found = _POOL_RE.match(name, len(prefix))
    return found.group(1) if found else None


def pool_states(app: Celery, pools: list[str]) -> dict[str, str]:
    """What ``app``'s result backend says of each of ``pools``: ``alive`` (its worker's waiter runs),
    ``ended`` (it ran, and no longer does) or ``unknown`` (not a pool of this app's, or ended long ago)."""
    if not pools:
        return {}

    def check(client: Any) -> list[int]:
        with client.pipeline() as pipe:
            for p in pools:
                pipe.exists(_k(p))
                pipe.exists(_k(p, "owner"))
            return pipe.execute()
    found = with_retry(app, check)
    return {p: "alive" if found[2 * i] else "ended" if found[2 * i + 1] else "unknown" for i, p in enumerate(pools)}


def lease_counts(app: Celery, pool: str) -> tuple[int, int]:
    """``(ready, total)`` topics of ``pool``."""
    def count(client: Any) -> list[int]:
        with client.pipeline() as pipe:
            pipe.llen(_k(pool, "free"))
            pipe.scard(_k(pool, "all"))
            return pipe.execute()
    ready, total = with_retry(app, count)
    return int(ready), int(total)


def _entry(topic: str, offset: int) -> str:
    return f"{topic} {offset} {now_ms()}"


def _parse(entry: bytes | str) -> tuple[str, int, int]:
    text = entry.decode() if isinstance(entry, bytes) else entry
    topic, offset, released = text.split(" ")
    return topic, int(offset), int(released)


class LeasedChannel(ReplyChannel):
    """Leases pooled topics in any process (:meth:`open`); gives them back in the waiter's (:meth:`end`).

    Attributes:
        counts: ``leased`` (from the ready topics), ``grown`` (topics created for the pool),
            ``overflow`` (waits given an ephemeral topic: the pool was at its bound, or the worker runs
            no pool), ``released`` and ``retired`` (topics given back, and deleted).
    """

    name = "leased"

    def __init__(self, app: Celery) -> None:
        super().__init__(app)
        conf = settings(app)
        self.prefix, self.bound, self.batch = conf.return_topic_prefix, conf.lease_pool_max, conf.lease_batch
        self.cooldown = conf.lease_cooldown
        self._pools: dict[str, tuple[str | None, float]] = {}  # worker -> (pool id, when looked up)
        self._cooling: list[tuple[float, str, Opened, int]] = []  # (due, wait id, topic, next offset)
        self._retired: list[str] = []
        self._unsure: dict[str, float] = {}  # topic -> when its end offset was first unknown
        self._last_tick = float("-inf")
        self._lock = threading.Lock()
        self._scripts: dict[str, Any] = {}
        self.counts = {"leased": 0, "grown": 0, "overflow": 0, "released": 0, "retired": 0}

    # -- Redis ---------------------------------------------------------------------------------------
    def _script(self, client: Any, source: str, keys: list[str], args: list[Any]) -> Any:
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = client.register_script(source)
        return script(keys=keys, args=args, client=client)

    def _run(self, source: str, keys: list[str], args: list[Any]) -> Any:
        return with_retry(self.app, lambda c: self._script(c, source, keys, args))

    def pool_of(self, worker: str) -> str | None:
        """The id of the pool ``worker`` runs now, or None (cached for :data:`POOL_ID_CACHE_SECONDS`).

        A task that runs in its worker's own process (a threads, gevent or solo pool) and
        names a worker that runs no pool (an embedded test worker names its tasks' host
        differently) uses the pool of that process's waiter.
        """
        found = self._pools.get(worker)
        if found is None or time.monotonic() - found[1] >= POOL_ID_CACHE_SECONDS:
            raw = with_retry(self.app, lambda c: c.get(_current(worker))) if worker else None
            found = (raw.decode() if isinstance(raw, bytes) else raw, time.monotonic())
            self._pools[worker] = found
        if found[0] is None:
            local = getattr(getattr(self.app, "_fusion_waiter", None), "lease_pool", None)
            if local is not None:
                return local.id
        return found[0]

    # -- leasing ------------------------------------------------------------------------------------
    def open(self, wait_id: str, deadline_ms: int, owner: str = "") -> Opened:
        pool = self.pool_of(owner)
        if pool is None:
            return self._overflow(deadline_ms, f"worker {owner!r} runs no lease pool")
        raw = self._run(_TAKE, [_k(pool, "free"), _k(pool, "holders")], [wait_id])
        if raw is not None:
            topic, offset, _ = _parse(raw)
            self.counts["leased"] += 1
            return Opened(topic, self.name, offset, pool)
        return self._grow(pool, wait_id, deadline_ms)

    def _grow(self, pool: str, wait_id: str, deadline_ms: int) -> Opened:
        names = [f"{self.prefix}lease.{pool}.{secrets.token_hex(8)}" for _ in range(max(1, self.batch))]
        added = int(self._run(_GROW, [_k(pool), _k(pool, "all"), _k(pool, "holders")], [self.bound, wait_id, *names]))
        if added <= 0:
            self._pools.pop(next((w for w, (p, _) in self._pools.items() if p == pool), ""), None)
            return self._overflow(deadline_ms, "the pool is at fusion_lease_pool_max" if added == 0
                                  else f"pool {pool} is gone")
        names = names[:added]
        try:
            clients(self.app).create_topics(names, partitions=1, config=topic_config(self.app), visible=True)
        except FusionError:
            def forget(c: Any) -> None:
                c.srem(_k(pool, "all"), *names)
                c.hdel(_k(pool, "holders"), names[0])
            with_retry(self.app, forget)
            clients(self.app).delete_topics(names)
            raise
        self.counts["grown"] += added
        if added > 1:
            self._run(_ADD_READY, [_k(pool), _k(pool, "free")], [_entry(n, 0) for n in names[1:]])
        logger.info("lease pool %s: grew by %d topic(s)", pool, added)
        return Opened(names[0], self.name, 0, pool)

    def _overflow(self, deadline_ms: int, why: str) -> Opened:
        from ..returntopics import take
        self.counts["overflow"] += 1
        logger.debug("leased reply channel: an ephemeral topic for this wait (%s)", why)
        return Opened(take(self.app, deadline_ms, registered=True), "ephemeral")

    # -- giving back ----------------------------------------------------------------------------------
    def end(self, wait_id: str, opened: Opened, next_offset: int | None) -> None:
        if next_offset is None or opened.pool is None:
            self.retire(wait_id, opened)
            return
        with self._lock:
            self._cooling.append((time.monotonic() + self.cooldown, wait_id, opened, next_offset))

    def retire(self, wait_id: str, opened: Opened) -> None:
        """Take ``opened``'s topic out of its pool and delete it (with the next :meth:`tick`), if it is still
        leased to ``wait_id`` (a topic given to no pool, an overflow, is deleted as it is)."""
        if opened.pool is not None:
            pool = opened.pool
            try:
                mine = self._run(_RETIRE, [_k(pool, "holders"), _k(pool, "all")], [wait_id, opened.return_topic])
            except Exception as exc:  # the reaper deletes it once its pool is gone
                logger.warning("lease pool %s: cannot retire %s: %s", pool, opened.return_topic, exc)
                return
            if not mine:
                logger.info("lease pool %s: %s is no longer leased to %s; left alone", pool, opened.return_topic,
                            wait_id)
                return
        self.counts["retired"] += 1
        with self._lock:
            self._retired.append(opened.return_topic)

    def tick(self, force: bool = False) -> None:
        """Give back the topics whose cooldown is over (their end offsets read in one request per
        :data:`GIVE_BACK_EVERY_SECONDS` at most), and delete the retired ones."""
        now = time.monotonic()
        if not force and now - self._last_tick < GIVE_BACK_EVERY_SECONDS:
            return
        self._last_tick = now
        with self._lock:
            split = len(self._cooling) if force else next(
                (i for i, entry in enumerate(self._cooling) if entry[0] > now), len(self._cooling))
            due, self._cooling = self._cooling[:split], self._cooling[split:]
        if due:
            self._give_back(due)
        with self._lock:
            retired, self._retired = self._retired, []
        if retired:
            try:
                clients(self.app).delete_topics(retired, wait=force)
            except Exception as exc:
                logger.warning("lease pool: cannot delete %d retired topic(s) now (%s); the reaper will",
                               len(retired), exc)

    def _give_back(self, due: list[tuple[float, str, Opened, int]]) -> None:
        """Give back each topic that received nothing since its wait's reply; retire the others.

        A topic whose end offset cannot be read now (its partition has no leader while Kafka elects one)
        cools again, for up to ``fusion_kafka_retry_timeout`` seconds; then it is retired."""
        ends = self._end_offsets([o.return_topic for _, _, o, _ in due])
        now = time.monotonic()
        for _, wait_id, opened, next_offset in due:
            topic = opened.return_topic
            end = ends.get(topic, -1)
            if end is None:
                first = self._unsure.setdefault(topic, now)
                if now - first < settings(self.app).kafka_retry_timeout:
                    with self._lock:
                        self._cooling.append((now + max(self.cooldown, 1.0), wait_id, opened, next_offset))
                    continue
                logger.warning("lease pool %s: the end offset of %s stayed unknown for %.0fs; retired",
                               opened.pool, topic, now - first)
            self._unsure.pop(topic, None)
            if end != next_offset:
                if end is not None and end >= 0:
                    logger.warning("lease pool %s: %s received %d record(s) after its wait's reply; retired",
                                   opened.pool, topic, end - next_offset)
                self.retire(wait_id, opened)
                continue
            pool = opened.pool or ""
            try:
                given = self._run(_RELEASE, [_k(pool), _k(pool, "free"), _k(pool, "holders"), _k(pool, "all")],
                                  [wait_id, _entry(opened.return_topic, next_offset)])
            except Exception as exc:  # it stays leased to the ended wait: the pool's end or the reaper deletes it
                logger.warning("lease pool %s: cannot give back %s: %s", pool, opened.return_topic, exc)
                continue
            if given == 1:
                self.counts["released"] += 1
            elif given == 0:  # the pool ended (its worker stopped): nobody leases it any more
                self.counts["retired"] += 1
                with self._lock:
                    self._retired.append(opened.return_topic)

    def _end_offsets(self, topics: list[str]) -> dict[str, int | None]:
        """The end offset of each topic's partition 0: None where it is unknown for now (Kafka unreachable,
        or the partition without a leader), absent where it cannot be had (e.g. the topic is gone)."""
        from confluent_kafka.admin import OffsetSpec
        admin = clients(self.app).admin
        out: dict[str, int | None] = {}
        try:
            futures = admin.list_offsets({TopicPartition(t, 0): OffsetSpec.latest() for t in topics},
                                         request_timeout=10)
        except Exception as exc:  # a transient Kafka error leaves them unknown for now; anything else retires them
            unknown = isinstance(exc, KafkaException) and _transient(exc)
            logger.warning("lease pool: cannot read end offsets now (%s)%s", exc,
                           "" if unknown else f"; retiring {len(topics)} topic(s)")
            return dict.fromkeys(topics) if unknown else out
        for tp, fut in futures.items():
            try:
                offset = fut.result(timeout=15).offset
                out[tp.topic] = offset if offset >= 0 else None
            except KafkaException as exc:
                logger.debug("lease pool: end offset of %s: %s", tp.topic, exc)
                if _transient(exc):
                    out[tp.topic] = None
            except Exception as exc:  # the request itself timed out: unknown for now
                logger.debug("lease pool: end offset of %s: %s", tp.topic, exc)
                out[tp.topic] = None
        return out

    def close(self) -> None:
        self.tick(force=True)


def _transient(exc: KafkaException) -> bool:
    err = exc.args[0] if exc.args else None
    return isinstance(err, KafkaError) and transient(err)


class LeasePool:
    """A worker's pool of leased topics: made when its waiter starts, kept alive and trimmed by it, ended
    when it stops (the ready topics are deleted; leased ones are retired by whoever ends their waits).

    Parameters:
        app: the app.
        worker: the worker's name (the owner its dispatches register waits with).
    """

    def __init__(self, app: Celery, worker: str) -> None:
        self.app, self.worker = app, worker
        self.id = secrets.token_hex(6)
        conf = settings(app)
        self.idle_ms = int(conf.lease_idle * 1000)
        self.keep = conf.lease_batch
        self._last_beat = float("-inf")
        self.trimmed = 0

    def start(self) -> None:
        """Make the pool and name it the worker's current one."""
        self._beat(force=True)
        logger.info("lease pool %s: started for %s", self.id, self.worker)

    def _beat(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_beat < ALIVE_SECONDS / 3:
            return
        self._last_beat = now
        pool, ttl = self.id, ALIVE_SECONDS

        def beat(client: Any) -> None:
            with client.pipeline() as pipe:
                pipe.set(_current(self.worker), pool, ex=ttl)
                pipe.hset(_k(pool), mapping={"worker": self.worker, "beat": now_ms()})
                pipe.expire(_k(pool), ttl)
                pipe.set(_k(pool, "owner"), self.worker, ex=LEASES_KEPT_SECONDS)
                pipe.expire(_k(pool, "free"), LEASES_KEPT_SECONDS)
                pipe.expire(_k(pool, "all"), LEASES_KEPT_SECONDS)
                pipe.expire(_k(pool, "holders"), LEASES_KEPT_SECONDS)
                pipe.execute()
        with_retry(self.app, beat)
        self._trim()

    def _trim(self) -> None:
        """Delete ready topics unused for ``fusion_lease_idle`` seconds, keeping ``fusion_lease_batch``."""
        channel = _leased(self.app)
        free, every = _k(self.id, "free"), _k(self.id, "all")
        horizon = now_ms() - self.idle_ms
        while True:
            length, tail = with_retry(self.app, lambda c: (c.llen(free), c.lindex(free, -1)))
            if tail is None or length <= self.keep or _parse(tail)[2] > horizon:
                return
            if channel._run(_DROP_TAIL, [free, every], [tail.decode() if isinstance(tail, bytes) else tail]):
                channel.counts["retired"] += 1
                self.trimmed += 1
                with channel._lock:
                    channel._retired.append(_parse(tail)[0])

    def tick(self) -> None:
        """Say the pool is alive (every :data:`ALIVE_SECONDS` / 3) and trim it."""
        try:
            self._beat()
        except Exception as exc:
            logger.warning("lease pool %s: %s", self.id, exc)

    def close(self) -> None:
        """End the pool: delete its ready topics; its leased ones are retired when their waits end."""
        channel = _leased(self.app)
        free = channel._run(_CLOSE, [_current(self.worker), _k(self.id), _k(self.id, "free"), _k(self.id, "all"),
                                     _k(self.id, "holders")], [self.id, LEASES_KEPT_SECONDS])
        names = [_parse(e)[0] for e in free or []]
        with channel._lock:
            channel._retired.extend(names)
        channel.tick(force=True)
        logger.info("lease pool %s: closed (%s; %d ready topic(s) deleted)", self.id, channel.counts, len(names))


def _leased(app: Celery) -> LeasedChannel:
    from . import channel
    found = channel(app, "leased")
    assert isinstance(found, LeasedChannel)
    return found
