"""Registry backends, one module per implementation (see :mod:`fusion_celery.registry`)."""
