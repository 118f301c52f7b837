"""The ``shared`` reply channel: a few permanent reply topics, a reply finding its wait by its id.

No topic is created per request: a wait's request names the shared topic of the
registry slot its id falls in (``<prefix>shared.<slot>``, slot =
``crc32(id) % fusion_registry_partitions``, which is how the Kafka registry's
partitions and the ZooKeeper registry's buckets divide waits too), so a waiter
mostly reads the shared topics of the waits it holds.  A reply completes a wait
only through its ``fusion-id`` header, the request's ``id``: a fusion reactor
echoes it, and so must any other service used with this channel
(``docs/reference/protocol.md``).  A record without it, or with an id no wait
holds, completes nothing.

The topics are created on first use, with one partition and broker-side
timestamps (``message.timestamp.type=LogAppendTime``), so that a waiter that takes
over a wait can find where to read from by time.  They are never deleted by
fusion-celery (the reaper leaves names without a creation time alone); records go
with ``fusion_return_topic_retention_ms``.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

from ..clients import clients
from ..config import settings
from ..returntopics import topic_config
from . import Opened, ReplyChannel

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["SharedChannel", "shared_topic", "shared_topics", "is_shared_topic"]


def shared_topics(app: Celery) -> list[str]:
    """Every shared reply topic of ``app``: one per registry slot."""
    conf = settings(app)
    return [f"{conf.return_topic_prefix}shared.{slot}" for slot in range(max(1, conf.registry_partitions))]


def shared_topic(app: Celery, wait_id: str) -> str:
    """The shared reply topic of the wait ``wait_id``."""
    conf = settings(app)
    slot = zlib.crc32(wait_id.encode()) % max(1, conf.registry_partitions)
    return f"{conf.return_topic_prefix}shared.{slot}"


def is_shared_topic(name: str, prefix: str) -> bool:
    """Whether ``name`` is a shared reply topic."""
    return name.startswith(f"{prefix}shared.")


class SharedChannel(ReplyChannel):
    """The shared topic of a wait's slot (all of them created in one request when first needed); nothing to
    do when a wait ends."""

    name = "shared"
    by_id = True

    def open(self, wait_id: str, deadline_ms: int, owner: str = "") -> Opened:
        topic = shared_topic(self.app, wait_id)
        c = clients(self.app)
        if not c.topic_exists(topic):
            config = {**topic_config(self.app), "message.timestamp.type": "LogAppendTime"}
            c.create_topics(shared_topics(self.app), partitions=1, config=config, visible=True)
        return Opened(topic, self.name)

    def end(self, wait_id: str, opened: Opened, next_offset: int | None) -> None:
        return None
