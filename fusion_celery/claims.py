"""Once-only markers in the result backend, so that duplicates do no harm.

Deferred completion is at-least-once: a wait may be completed twice (a waiter
died after completing but before removing the wait) and a Celery message may be
delivered twice.  The receivers are therefore idempotent: a reactor run, its
processing step and a dispatching subtask each run under :func:`once`, and a
reply holds a lease (:func:`acquire`) until Kafka took it.  Claims and leases are
keys in the Redis result backend; the leases of a live holder are renewed
(:mod:`fusion_celery.keepalive`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery, Task
from celery.exceptions import Ignore
from kombu.exceptions import OperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import keepalive
from .config import settings
from .errors import ConfigurationError

logger = logging.getLogger(__name__)

__all__ = ["claim", "extend", "release", "is_claimed", "once", "started", "lease", "lifetime", "with_retry",
           "Later", "acquire", "attempt", "finish", "give_back", "key_of", "first", "TRANSIENT", "RUN_OPTIONS"]


def _client(app: Celery) -> Any:
    client = getattr(app.backend, "client", None)
    if client is None or not hasattr(client, "set"):
        raise ConfigurationError(
            f"fusion-celery needs the Redis result backend (result_backend=redis://...), "
            f"got {type(app.backend).__name__}")
    return client


def lifetime(app: Celery) -> float:
    """Seconds a claim that guarded finished work is kept: as long as the results it guards.

    Parameters:
        app: the app (``result_expires``).

    Returns:
        ``result_expires`` in seconds; a day when results never expire.
    """
    value = app.conf.result_expires
    seconds = value.total_seconds() if hasattr(value, "total_seconds") else value
    return float(seconds or 86400)


def _key(name: str) -> str:
    return f"fusion-claim-{name}"


def key_of(name: str) -> str:
    """The Redis key of the claim or lease ``name``."""
    return _key(name)


def with_retry(app: Celery, fun: Callable[..., Any], *args: Any) -> Any:
    """Run ``fun(client, *args)`` on the backend's Redis client, retrying while Redis is unreachable.

    Retries follow the backend's own ``retry_policy`` (about a minute in the fusion
    app), as Celery does for results, so a claim rides out a Redis restart as a
    result does.

    Parameters:
        app: the app whose result backend holds the claims.
        fun: called with the Redis client, then ``args``.
        args: passed on.

    Returns:
        What ``fun`` returned.

    Raises:
        ConfigurationError: the result backend is not Redis.
    """
    client = _client(app)
    ensure = getattr(app.backend, "ensure", None)
    if ensure is None:
        return fun(client, *args)
    return ensure(fun, (client, *args))


def _set_nx(client: Any, key: str, token: str, ttl: int) -> bool:
    # A retried SET whose first try went through (its reply lost with the connection) finds its own token.
    return bool(client.set(key, token, nx=True, ex=ttl)) or client.get(key) == token.encode()


def claim(app: Celery, name: str, ttl: float) -> bool:
    """Take the marker ``name`` for ``ttl`` seconds.

    Parameters:
        app: the app.
        name: the marker.
        ttl: seconds (at least 1).

    Returns:
        True when taken now (or by an earlier try of this very call); False when
        somebody holds it already.
    """
    return with_retry(app, _set_nx, _key(name), uuid.uuid4().hex, max(1, int(ttl)))


def extend(app: Celery, name: str, ttl: float) -> None:
    """Keep a taken marker for ``ttl`` seconds from now."""
    with_retry(app, lambda c, k, t: c.expire(k, t), _key(name), max(1, int(ttl)))


def release(app: Celery, name: str) -> None:
    """Drop the marker (the claimed work failed before it did anything visible)."""
    with_retry(app, lambda c, k: c.delete(k), _key(name))


def is_claimed(app: Celery, name: str) -> bool:
    """Whether somebody holds the marker ``name`` now."""
    return bool(with_retry(app, lambda c, k: c.exists(k), _key(name)))


#: Errors of the Celery broker or the result backend being away (kombu's, redis-py's): a step that fails with
#: one did not fail on its own account (see :func:`once`'s ``watched``).
TRANSIENT: tuple[type[BaseException], ...] = (OperationalError, RedisConnectionError, RedisTimeoutError)


#: Takes a step's claim for one attempt: free, ours already (a retried call), or held by an earlier
#: attempt (a lower retry count, which Celery only sends after that attempt ended) -> taken.
#: Returns {1} when taken, {0, "done"} when the step finished, {0, "lease", ttl} when an attempt
#: with the same retry count holds it (running, or died holding it).
_TAKE = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then return {1} end
if cur == 'done' then return {0, 'done'} end
if cur then
  local held = tonumber(string.match(cur, '^lease:(%d+):'))
  if held == nil or held >= tonumber(ARGV[3]) then return {0, 'lease', redis.call('TTL', KEYS[1])} end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return {1}
"""


#: Options of fusion's tasks (users may override them per reactor): a task's message is acknowledged
#: after it ran, so a worker killed mid-run gives it back to the broker; a pool child lost mid-run
#: makes Celery send it again at once as a new attempt (Celery 5.7's ``retry_on_worker_lost``; older
#: versions requeue it).  Either way :func:`once` keeps the copies from running twice.
RUN_OPTIONS: dict[str, Any] = {"acks_late": True, "reject_on_worker_lost": True, "retry_on_worker_lost": True,
                               "default_retry_delay": 1}


def _take(client: Any, key: str, token: str, ttl: int, retries: int) -> list[Any]:
    return client.eval(_TAKE, 1, key, token, ttl, retries)


#: Takes a lease: free or ours -> {1}; held by a lease of another holder -> {0, "lease", ttl}; anything
#: else (``done``, or a plain claim's token) -> {0, "done"}.
_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then return {1} end
if cur and string.sub(cur, 1, 6) == 'lease:' then return {0, 'lease', redis.call('TTL', KEYS[1])} end
if cur then return {0, 'done'} end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return {1}
"""

#: Deletes ``KEYS[1]`` if it holds ``ARGV[1]`` (a lease given back by its holder only).
_GIVE_BACK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Later(Exception):
    """This attempt cannot finish now: raised in a :func:`once` block, it gives the step's claim back
    and sends a copy of the task ``countdown`` seconds later (the block ran nothing that must not run
    again, or stored what it did)."""

    def __init__(self, countdown: float, why: str) -> None:
        super().__init__(why)
        self.countdown = max(1, int(countdown))


def acquire(app: Celery, name: str, ttl: float) -> tuple[str, str, int]:
    """Take the lease ``name`` for ``ttl`` seconds, unless it is held or done.

    Parameters:
        app: the app.
        name: the lease.
        ttl: seconds it lasts unless renewed (see :mod:`fusion_celery.keepalive`).

    Returns:
        ``("taken", token, ttl)``; ``("held", "", seconds it has left)`` while another
        holder has it; ``("done", "", 0)`` once its holder finished (:func:`finish`).
    """
    token = f"lease:0:{uuid.uuid4().hex}"
    seconds = max(1, int(ttl))
    got = with_retry(app, lambda c, k: c.eval(_ACQUIRE, 1, k, token, seconds), _key(name))
    if got[0]:
        return "taken", token, seconds
    if got[1] == b"lease":
        return "held", "", max(1, int(got[2]))
    return "done", "", 0


def first(app: Celery, name: str, owner: str) -> str:
    """Name ``owner`` the first holder of the marker ``name`` unless somebody is already; keep it as long as
    the results.

    Parameters:
        app: the app.
        name: the marker.
        owner: who asks (e.g. a run's task id).

    Returns:
        The first holder: ``owner`` when it is the first (or asked before), another one otherwise.
    """
    def take(client: Any, key: str) -> Any:
        if client.set(key, owner, nx=True, ex=int(lifetime(app))):
            return owner.encode()
        return client.get(key)
    held = with_retry(app, take, _key(name))
    return held.decode() if isinstance(held, bytes) else (held or owner)


def finish(app: Celery, name: str) -> None:
    """Mark the lease ``name`` done: what it guarded happened; nobody takes it again."""
    with_retry(app, lambda c, k: c.set(k, "done", ex=int(lifetime(app))), _key(name))


def attempt(app: Celery, name: str) -> int | None:
    """Note that an attempt at what the lease ``name`` guards starts now; say when an earlier one started.

    Called by the holder of the lease before it does what the lease guards: an earlier attempt that
    is still noted when a later one holds the lease ran out of it before it could :func:`finish`, and
    may have done the work (e.g. Kafka took a reply just before its worker was killed).

    Parameters:
        app: the app.
        name: the lease.

    Returns:
        The epoch milliseconds at which the earlier attempt started, or None when this is the first.
    """
    now = int(time.time() * 1000)

    def note(client: Any, key: str) -> Any:
        with client.pipeline() as pipe:
            pipe.getset(key, now)
            pipe.expire(key, int(lifetime(app)))
            return pipe.execute()[0]

    earlier = with_retry(app, note, f"{_key(name)}-attempt")
    return None if earlier is None else int(earlier)


def give_back(app: Celery, name: str, token: str) -> None:
    """End the lease ``name`` if ``token`` still holds it (what it guarded did not happen)."""
    with_retry(app, lambda c, k: c.eval(_GIVE_BACK, 1, k, token), _key(name))


def lease(app: Celery, task: Task | None = None) -> float:
    """Seconds a started step holds its claim.

    Parameters:
        app: the app (``task_time_limit``, ``fusion_run_lease``).
        task: the step's task (its ``time_limit``).

    Returns:
        The task's hard time limit, else ``task_time_limit``, else ``fusion_run_lease``.
    """
    limit = getattr(task, "time_limit", None) or app.conf.task_time_limit
    if limit:
        return float(limit)
    return settings(app).run_lease


@contextmanager
def once(task: Task, step: str, lease_s: float | None = None,
         on_done: Callable[[], Any] | None = None, watched: bool = False) -> Iterator[None]:
    """Run the body at most once per attempt of ``task``, however often its message is delivered.

    A run's message can arrive more than once: the intake hands a record over again
    after a crash, the broker gives a killed worker's messages back, the intake sends
    a run again that showed no progress.  The claim ``<step>-<task id>-<retries>``
    decides.  While the body runs it is a lease of ``lease_s`` seconds (default
    :func:`lease`); when the body ends, by returning or raising (``Ignore`` after
    ``replace``, ``Retry``, a failure: each ends this attempt), it is marked done for
    as long as the results live.  A copy that finds it done is dropped (``Ignore``).
    A copy that finds a lease is sent again once the lease runs out, then dropped.  The
    holder renews its lease while it runs (:mod:`fusion_celery.keepalive`), so the lease
    runs out only when the holder died, and the copy then runs; while the holder lives,
    the copy comes back once per lease until the step is done.  A Celery retry is a new
    attempt with a claim of its own, and a retry after a lost worker
    (``retry_on_worker_lost``) takes over the lease the lost attempt held.  A body that
    raises :class:`Later` gives the claim back and has a copy sent then.  ``on_done``
    runs before a copy that finds the step done is dropped (see
    :func:`fusion_celery.completion.resume_stored`).  A ``watched`` step (a reactor's:
    its intake sends a run that shows no progress again) whose body fails because Redis
    or the broker was away (:data:`TRANSIENT`) gives its claim back and ends without a
    state (``Ignore``), so that its caller is not answered with the outage and the
    intake's copy runs it.

    Parameters:
        task: the running task (its request's id and retries name the claim).
        step: what runs (``run``, ``process``, ``dispatch``...).
        lease_s: seconds the lease lasts; None: :func:`lease`.
        on_done: called when this copy finds the step done already.
        watched: the run is watched by its intake (see above).

    Raises:
        Ignore: this copy must not run (done already, or sent again for later).
    """
    app = task.app
    retries = int(task.request.retries or 0)
    name = f"{step}-{task.request.id}-{retries}"
    seconds = max(1, int(lease_s or lease(app, task)))
    token = f"lease:{retries}:{uuid.uuid4().hex}"
    taken = with_retry(app, _take, _key(name), token, seconds, retries)
    if not taken[0]:
        if taken[1] == b"done":
            logger.info("%s %s: already done; duplicate delivery ignored", step, task.request.id)
            if on_done is not None:
                on_done()
        else:
            countdown = max(1, int(taken[2])) + 1
            logger.info("%s %s: another copy holds it for %ds more; sending this copy again then", step,
                        task.request.id, countdown - 1)
            task.signature_from_request(task.request, countdown=countdown).apply_async()
        raise Ignore()
    try:
        with keepalive.held(app, _key(name), token, seconds):
            yield
    except Later as later:
        give_back(app, name, token)
        logger.info("%s %s: %s; sending it again in %ds", step, task.request.id, later, later.countdown)
        task.signature_from_request(task.request, countdown=later.countdown).apply_async()
        raise Ignore() from None
    except TRANSIENT as exc:
        if not watched:
            finish(app, name)
            raise
        give_back(app, name, token)
        logger.warning("%s %s: Redis or the broker was away (%s); claim given back, the run's intake sends it "
                       "again", step, task.request.id, exc)
        raise Ignore() from None
    except BaseException:
        finish(app, name)
        raise
    finish(app, name)


def started(app: Celery, step: str, task_ids: list[str]) -> set[str]:
    """Which of ``task_ids`` took the claim of ``step`` in their first attempt (one MGET).

    Parameters:
        app: the app.
        step: the step (as given to :func:`once`).
        task_ids: the tasks.

    Returns:
        The ids whose first attempt started.
    """
    if not task_ids:
        return set()
    keys = [_key(f"{step}-{i}-0") for i in task_ids]
    found = with_retry(app, lambda c, k: c.mget(k), keys)
    return {i for i, value in zip(task_ids, found, strict=True) if value is not None}
