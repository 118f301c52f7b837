"""Helpers of the test suite, by concept; ``tests/conftest.py`` holds only fixtures and hooks.

* :mod:`support.stack`: where the local stack is (endpoints, this run's id, the checkout);
* :mod:`support.waiting`: polling until a condition holds;
* :mod:`support.kafka`: topics, records and stand-in dependency services over confluent-kafka;
* :mod:`support.workers`: real ``celery worker`` processes and the environments that isolate them;
* :mod:`support.ports` and :mod:`support.redis_server`: a private Redis on a free port;
* :mod:`support.reliability`: stack faults, loads of requests with waits pending, and their check.

Importing :mod:`support.stack` (every helper module does) exports the stack's
endpoints into ``os.environ``, so that the apps and workers a test makes use them.
"""
