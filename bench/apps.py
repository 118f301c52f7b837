"""The fusion-celery reactors of a benchmark run (the worker imports this module: ``FUSION_IMPORTS=bench.apps``).

One reactor per shape of :data:`bench.common.SHAPES` and reply channel of
:data:`bench.common.CHANNELS`, on ``bench.<run>.r[-<channel>].<shape>``, whose deps
are the confluent-kafka services of :mod:`bench.service`.
"""

from __future__ import annotations

from fusion_celery import reactor

from .common import CHANNELS, SHAPES, deps_map, process, reactor_topic

__all__ = ["REACTORS"]


def _make(shape: str, channel: str | None):
    def deps(message):
        return deps_map(shape, message.data)

    def proc(message, results):
        return process(shape, message.data, results)

    return reactor(reactor_topic(shape, channel=channel), deps=deps if shape != "nodeps" else None,
                   name=f"bench.reactor.{channel or 'default'}.{shape}", reply=channel)(proc)


REACTORS = {(shape, channel): _make(shape, channel) for shape in SHAPES for channel in CHANNELS}
