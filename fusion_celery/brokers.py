"""Which Celery broker transport a worker talks to, for the workarounds that only one transport needs.

kombu's Redis transport keeps a worker's unacknowledged messages in Redis itself (the ``unacked`` hash),
puts them back when the channel closes and, failing that, after the visibility timeout; a worker that
loses its connection must help it (:class:`fusion_celery.worker.Consumer`,
:class:`fusion_celery.worker.RestorePrefetched`).  An AMQP broker (RabbitMQ) puts a channel's
unacknowledged messages back on their queue itself as the connection closes, and the workarounds would
only reach into a transport that has none of those internals.
"""

from __future__ import annotations

from typing import Any

__all__ = ["REDIS_DRIVERS", "broker_driver", "needs_redis_workarounds"]

#: kombu driver types of the transports that keep unacknowledged messages in Redis (``redis://``,
#: ``rediss://`` and ``sentinel://`` URLs).
REDIS_DRIVERS = frozenset({"redis"})


def broker_driver(app: Any) -> str:
    """The kombu driver type of ``app``'s broker transport (``"redis"``, ``"amqp"``, ``"memory"``, ...).

    Makes the connection object and its transport without connecting: a broker that is away does
    not change the answer."""
    conn = app.connection_for_read()
    try:
        return str(conn.transport.driver_type)
    finally:
        conn.release()


def needs_redis_workarounds(app: Any) -> bool:
    """Whether ``app``'s broker is kombu's Redis transport, whose prefetched messages a worker restores itself."""
    return broker_driver(app) in REDIS_DRIVERS
