"""A dependency service written with confluent-kafka alone (no fusion-celery, no Celery)."""
