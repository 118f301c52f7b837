"""The fusion-celery reactors of a benchmark run (the worker imports this module: ``FUSION_IMPORTS=bench.apps``).

One reactor per shape of :data:`bench.common.SHAPES`, on ``bench.<run>.r.<shape>``,
whose deps are the confluent-kafka services of :mod:`bench.service`.
"""

from __future__ import annotations

from fusion_celery import reactor

from .common import SHAPES, deps_map, process, reactor_topic

__all__ = ["REACTORS"]


def _make(shape: str):
    def deps(message):
        return deps_map(shape, message.data)

    def proc(message, results):
        return process(shape, message.data, results)

    return reactor(reactor_topic(shape), deps=deps if shape != "nodeps" else None,
                   name=f"bench.reactor.{shape}")(proc)


REACTORS = {shape: _make(shape) for shape in SHAPES}
