"""Document enrichment: fetch a document, analyse it in parallel, summarise, combine.

Services in :mod:`examples.enrich.services` (one worker can serve them all, or
each its own), the ``language`` service in :mod:`examples.plain_service`
(confluent-kafka only), a fan-out pipeline in :mod:`examples.enrich.pipelines`
and a client in :mod:`examples.enrich.client`.
"""
