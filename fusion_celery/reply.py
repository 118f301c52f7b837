"""Putting a reactor's answer on its caller's return topic, once."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery

from . import claims
from .config import setting
from .errors import FusionError, ProtocolError
from .kafka import clients
from .protocol import check_return_topic, check_size, encode_error, encode_reply, reply_headers
from .returntopics import name_times
from .signals import reactor_result

__all__ = ["send_reply", "reply_once"]

logger = logging.getLogger(__name__)


def _error_text(exc: BaseException) -> tuple[str, str]:
    return type(exc).__name__, str(exc)


#: Seconds a missing return topic is looked for again before the reply is dropped: long for a
#: topic whose name says it was created within the last minute, short for any other.
NEW_TOPIC_PATIENCE = 10.0
OTHER_TOPIC_PATIENCE = 1.0


def _patience(app: Celery, topic: str) -> float:
    """Seconds to look again for a missing return topic before the reply is dropped.

    The controller confirms a creation before the brokers' metadata lists the
    topic; a fast service would otherwise drop its reply to a return topic its
    caller just made (librdkafka's ``topic.metadata.propagation.max.ms`` makes
    the same allowance for produce).  Return topics carry their creation time in
    their name (``<prefix><created ms>.<deadline ms>.<random>``, or
    ``<prefix><created ms>.<unique>``; see :func:`~fusion_celery.returntopics.name_times`),
    so only young ones get the long wait and a reply to a topic its caller
    deleted does not hold a worker slot long.
    """
    created, _ = name_times(topic, setting(app, "fusion_return_topic_prefix"))
    young = created is not None and abs(time.time() * 1000 - created) < 60_000
    return NEW_TOPIC_PATIENCE if young else OTHER_TOPIC_PATIENCE


def send_reply(app: Celery, return_topic: str, corr_id: str | None, *, result: Any = None,
               exc: BaseException | None = None) -> Any:
    """Send a success (``result``) or error (``exc``) reply; return the delivery record or None.

    A result too large or not JSON becomes an error reply that says so.  A return
    topic that no longer exists (the caller gave up) is logged, not raised: the
    result is still in the result backend.
    """
    check_return_topic(return_topic, setting(app, "fusion_return_topic_prefix"),
                       setting(app, "fusion_reply_allowlist"))
    limit = int(setting(app, "fusion_max_message_bytes"))
    status = "ok"
    if exc is None:
        try:
            body = encode_reply(result)
            check_size(body, limit, "the reply")
        except ProtocolError as bad:
            exc = bad
    if exc is not None:
        status = "error"
        body = encode_error(*_error_text(exc))[:limit] if limit else encode_error(*_error_text(exc))
    c = clients(app)
    if not c.topic_exists(return_topic, ttl=0, wait=_patience(app, return_topic)):
        logger.warning("return topic %s no longer exists (the caller gave up?); reply dropped", return_topic)
        return None
    return c.produce(return_topic, body, key=corr_id, headers=reply_headers(status, corr_id))


def reply_once(app: Celery, task_id: str, message: dict[str, Any], *, result: Any = None,
               exc: BaseException | None = None, sender: Any = None, strict: bool = False) -> bool:
    """Reply for reactor run ``task_id`` unless it already replied; tell the ``reactor_result`` hook.

    Returns False when another path (for example a failing dependency) replied first.
    A reply that could not be sent (Kafka stayed away longer than
    ``fusion_kafka_retry_timeout``) gives its claim back, so that a later attempt
    may send it; the error is raised for a result (the run fails) or with ``strict``
    (the caller retries), and logged otherwise.
    """
    if not claims.claim(app, f"reply-{task_id}", claims.lifetime(app)):
        return False
    return_topic = message.get("return_topic")
    if return_topic:
        try:
            send_reply(app, return_topic, message.get("id"), result=result, exc=exc)
        except FusionError as err:
            logger.error("reactor %s: cannot reply to %s: %s", task_id, return_topic, err)
            claims.release(app, f"reply-{task_id}")
            if exc is None or strict:
                raise
    reactor_result.send(sender=sender, task_id=task_id, message=message, result=result, exception=exc)
    return True
