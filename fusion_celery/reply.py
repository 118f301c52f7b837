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
from .signals import reactor_result

__all__ = ["send_reply", "reply_once"]

logger = logging.getLogger(__name__)


def _error_text(exc: BaseException) -> tuple[str, str]:
    return type(exc).__name__, str(exc)


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
    if not _exists_soon(c, return_topic):
        logger.warning("return topic %s no longer exists (the caller gave up?); reply dropped", return_topic)
        return None
    return c.produce(return_topic, body, key=corr_id, headers=reply_headers(status, corr_id))


def _exists_soon(c: Any, topic: str, patience: float = 2.0) -> bool:
    """Whether ``topic`` exists, giving a brand-new topic ``patience`` seconds to show up in the metadata.

    A caller creates its return topic just before it sends the request; a fast
    reactor may answer before the broker's metadata lists the new topic, and must
    not take that for a caller that gave up.
    """
    deadline, pause = time.monotonic() + patience, 0.02
    while not c.topic_exists(topic, ttl=0):
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.5)
    return True


def reply_once(app: Celery, task_id: str, message: dict[str, Any], *, result: Any = None,
               exc: BaseException | None = None, sender: Any = None) -> bool:
    """Reply for reactor run ``task_id`` unless it already replied; tell the ``reactor_result`` hook.

    Returns False when another path (for example a failing dependency) replied first.
    """
    ttl = float(app.conf.result_expires.total_seconds() if hasattr(app.conf.result_expires, "total_seconds")
                else app.conf.result_expires or 86400)
    if not claims.claim(app, f"reply-{task_id}", ttl):
        return False
    return_topic = message.get("return_topic")
    if return_topic:
        try:
            send_reply(app, return_topic, message.get("id"), result=result, exc=exc)
        except FusionError as err:
            logger.error("reactor %s: cannot reply to %s: %s", task_id, return_topic, err)
            if exc is None:
                raise
    reactor_result.send(sender=sender, task_id=task_id, message=message, result=result, exception=exc)
    return True
