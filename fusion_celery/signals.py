"""Signals for in-process observers (the successor of fusion-clj's result channel).

``reactor_result`` is sent in the process that finished a reactor run, once per
run, with ``task_id``, ``message`` (the request as a dict), and either
``result`` or ``exception``::

    from fusion_celery.signals import reactor_result

    @reactor_result.connect
    def seen(sender, task_id, message, result, exception, **kw):
        ...
"""

from celery.utils.dispatch import Signal

__all__ = ["reactor_result"]

reactor_result = Signal(name="fusion_reactor_result",
                        providing_args={"task_id", "message", "result", "exception"})
