"""A fan-out pipeline: enrich several documents at once and combine their reports into a digest.

``digest`` is a deps-map pipeline (:class:`fusion_celery.Pipeline` with
``deps=`` and ``combine=``): one ``enrich`` request per document, all in
parallel, then ``combine`` ranks them.  Its Celery task is
``fusion.pipeline.digest``, so the workers must import this module
(``FUSION_IMPORTS=examples.enrich.services,examples.enrich.pipelines``); any
Celery client can then start it by name::

    app.send_task("fusion.pipeline.digest", kwargs={"data": ["harbour", "outage"]}).get()
"""

from __future__ import annotations

from typing import Any

# --8<-- [start:digest]
from examples import topic
from fusion_celery import Pipeline


def digest_deps(ids: list[str]) -> dict[str, Any]:
    """One ``enrich`` request per document id (the dep is named after the id)."""
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
        raise ValueError(f"digest takes a non-empty list of document ids, got {ids!r}")
    return {doc_id: {"topic": topic("enrich"), "args": {"id": doc_id}} for doc_id in ids}


def combine(ids: list[str], reports: dict[str, Any]) -> dict[str, Any]:
    """The reports in the order asked, and the ids from most to least positive."""
    ranked = sorted(ids, key=lambda i: reports[i]["sentiment"]["score"], reverse=True)
    return {"summaries": [reports[i]["summary"] for i in ids], "most_positive_first": ranked}


digest = Pipeline(deps=digest_deps, combine=combine, name=topic("digest"), timeout=120)
# --8<-- [end:digest]
