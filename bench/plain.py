"""Plain Celery, no Kafka: the same DAGs as chains/chords of no-op tasks over Redis.

Run by its own worker (``celery -A bench.plain worker -Q bench-plain``).  It uses
the broker and result backend of the environment (the same Redis as the fusion
worker) on its own queue.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, chain, group

from .common import DATA

__all__ = ["QUEUE", "app", "canvas"]

QUEUE = "bench-plain"

app = Celery("bench.plain")
app.conf.update(task_default_queue=QUEUE, task_serializer="json", result_serializer="json",
                accept_content=["json"], broker_connection_retry_on_startup=True, result_expires=3600)


@app.task(name="bench.plain.dep")
def dep(prior: Any = None, *, name: str, args: Any = None) -> Any:
    """A no-op dependency: answers a small value at once."""
    return {name: args if prior is None else len(repr(prior))}


@app.task(name="bench.plain.process")
def process(prior: Any = None, *, data: Any = None) -> Any:
    """The no-op processing step."""
    return data if prior is None else prior


def canvas(shape: str, data: Any = DATA):
    """The Celery canvas of ``shape``, structured as fusion-celery compiles that deps-map."""
    body = process.s(data=data)
    if shape == "nodeps":
        return body
    if shape == "onedep":
        return chain(dep.s(name="one", args=data), body)
    if shape == "math":
        return chain(dep.s(name="one", args=data), dep.s(name="two", args=[2]), body)
    if shape == "diamond":
        return chain(dep.s(name="a", args=data), group(dep.s(name="b"), dep.s(name="c")), dep.s(name="d"), body)
    raise ValueError(f"unknown shape {shape!r}")


@app.task(name="bench.plain.done")
def done(prior: Any = None, *, token: str, key: str) -> None:
    """The last step of a throughput request: tell the driver it completed (a push on a Redis list)."""
    app.backend.client.rpush(key, token)


def closed_loop(app_: Celery, shape: str, in_flight: int, *, window_s: float, warmup_completions: int,
                warmup_timeout: float, drain_timeout: float, on_window: tuple[Any, Any] | None = None) -> Any:
    """Plain Celery's throughput: keep ``in_flight`` canvases of ``shape`` running, each completion starting
    the next, and count completions per second over a window (as :func:`bench.clients.closed_loop` does).

    Each canvas ends with :func:`done`, which pushes its token on a Redis list that this
    driver pops, so that no result is polled per request.
    """
    import time
    import uuid

    from .clients import LoopResult

    res = LoopResult(in_flight)
    client = app_.backend.client
    key = f"bench-plain-done-{uuid.uuid4().hex}"
    started: dict[str, float] = {}

    def submit() -> None:
        token = uuid.uuid4().hex
        started[token] = time.perf_counter()
        chain(canvas(shape), done.s(token=token, key=key)).apply_async()

    t_start = time.perf_counter()
    for _ in range(in_flight):
        submit()
    done_count, measuring, running = 0, False, True
    window_start = window_end = None
    warm_deadline = time.monotonic() + warmup_timeout
    drain_deadline = None
    while started:
        now = time.perf_counter()
        if not measuring and running and (done_count >= warmup_completions or time.monotonic() > warm_deadline):
            if done_count < warmup_completions:
                res.note = f"warm-up: {done_count} of {warmup_completions} completions within {warmup_timeout:.0f}s"
            res.warmup_s = now - t_start
            measuring, window_start = True, now
            if on_window:
                on_window[0]()
        if measuring and window_start is not None and now - window_start >= window_s:
            measuring, running, window_end = False, False, now
            drain_deadline = time.monotonic() + drain_timeout
            if on_window:
                on_window[1]()
        if drain_deadline is not None and time.monotonic() > drain_deadline:
            break
        popped = client.blpop([key], timeout=1)
        if popped is None:
            continue
        t = started.pop(popped[1].decode(), None)
        if t is None:
            continue
        done_count += 1
        if measuring:
            res.completed += 1
            res.latencies.append(time.perf_counter() - t)
        if running:
            submit()
    res.window_s = (window_end or time.perf_counter()) - (window_start or t_start)
    res.drained = not started
    res.lost = len(started)
    res.total = done_count
    client.delete(key)
    return res
