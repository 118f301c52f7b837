"""The services of the document enrichment example, and ``enrich``, the reactor that combines them.

``enrich`` receives ``{"id": "<document id>"}`` and runs this deps-map::

    fetch ──┬── stats ──────┐
            ├── keywords ───┤
            ├── sentiment ──┼── summary ── enrich's own step (the report)
            └── language ───┘        (summary also reads fetch)

``fetch`` first; then four analyses of its text side by side (``language`` is
not a fusion-celery reactor: it is :mod:`examples.plain_service.language`, a
plain confluent-kafka program); then ``summary`` with all of their results;
then ``enrich`` itself combines everything into one report.

The document is injected into each analysis with a custom ``arg_in_fn``
(registered below, by name): ``text`` replaces the args with the document's
text, ``with_text`` adds it to the args' options.  ``summary`` uses the default
``conj``, so its data is the list of its deps' results in the order its
``deps`` names them.

Serve them with::

    FUSION_IMPORTS=examples.enrich.services,examples.enrich.pipelines celery -A fusion_celery worker
    python -m examples.plain_service.language
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from examples import topic
from examples.enrich.corpus import DOCUMENTS
from fusion_celery import Message, reactor, register_arg_in_fn

STOPWORDS = set("""a about after all an and are as at be but by can could for from had has have he her his i in
into is it its no not of on or our so that the their them then there they this to up us was we were what when
which who will with would you your
le la les un une des du de et est sont dans pour par sur au aux y on ce qui que""".split())
POSITIVE = set("welcomed new wider success great cheerful busy easier simple worth full early good".split())
NEGATIVE = set("failed stopped lost overwhelmed apologised poor failure slow blocks not".split())

_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


# -- injection: how fetch's document reaches the analyses --------------------------------------
@register_arg_in_fn("text")
def _text(args: Any, document: dict[str, Any]) -> str:
    """The dependency's data becomes the document's text (its own args are not used)."""
    return document["text"]


@register_arg_in_fn("with_text")
def _with_text(args: dict[str, Any], document: dict[str, Any]) -> dict[str, Any]:
    """The dependency's options plus the document's text."""
    return {**args, "text": document["text"]}


# -- the services ------------------------------------------------------------------------------
@reactor(topic("fetch"))
def fetch(message: Message) -> dict[str, str]:
    """The document ``{"id", "title", "text"}`` named by ``data["id"]``."""
    doc_id = (message.data or {}).get("id")
    if doc_id not in DOCUMENTS:
        raise LookupError(f"no document {doc_id!r} (known: {', '.join(sorted(DOCUMENTS))})")
    return {"id": doc_id, **DOCUMENTS[doc_id]}


@reactor(topic("stats"))
def stats(message: Message) -> dict[str, Any]:
    """Word and sentence counts of a text, and its reading time at 200 words a minute."""
    text = message.data
    n = len(words(text))
    return {"words": n, "sentences": len(re.findall(r"[.!?](?:\s|$)", text)), "reading_minutes": round(n / 200, 1)}


@reactor(topic("keywords"))
def keywords(message: Message) -> list[str]:
    """The ``top`` most frequent words of ``text`` that are not stopwords (ties: the longer word first)."""
    options = message.data
    counts = Counter(w for w in words(options["text"]) if w not in STOPWORDS and len(w) > 2)
    ranked = sorted(counts, key=lambda w: (-counts[w], -len(w), w))
    return ranked[:int(options.get("top", 5))]


@reactor(topic("sentiment"))
def sentiment(message: Message) -> dict[str, Any]:
    """A lexicon score in [-1, 1] and its label (a toy, like every analysis here)."""
    ws = words(message.data)
    pos, neg = sum(w in POSITIVE for w in ws), sum(w in NEGATIVE for w in ws)
    score = 0.0 if pos + neg == 0 else round((pos - neg) / (pos + neg), 2)
    label = "positive" if score > 0.2 else "negative" if score < -0.2 else "neutral"
    return {"score": score, "label": label}


@reactor(topic("summary"))
def summary(message: Message) -> str:
    """One line about the document, from ``[document, stats, keywords, sentiment, language]``."""
    document, st, kw, se, lang = message.data
    return (f"{document['title']!r}: {se['label']} ({se['score']:+.2f}), {lang['language']}, "
            f"{st['words']} words, about {', '.join(kw[:3])}")


# --8<-- [start:enrich]
def enrich_deps(message: Message) -> dict[str, Any]:
    """The deps-map for one document: fetch, then four analyses in parallel, then the summary."""
    return {
        "fetch": {"topic": topic("fetch"), "args": {"id": (message.data or {}).get("id")}},
        "stats": {"topic": topic("stats"), "deps": ["fetch"], "arg_in_fn": "text"},
        "keywords": {"topic": topic("keywords"), "args": {"top": 5}, "deps": ["fetch"], "arg_in_fn": "with_text"},
        "sentiment": {"topic": topic("sentiment"), "deps": ["fetch"], "arg_in_fn": "text"},
        "language": {"topic": topic("language"), "deps": ["fetch"], "arg_in_fn": "text", "timeout": 30},
        "summary": {"topic": topic("summary"), "args": [],
                    "deps": ["fetch", "stats", "keywords", "sentiment", "language"]},
    }


@reactor(topic("enrich"), deps=enrich_deps)
def enrich(message: Message, results: dict[str, Any]) -> dict[str, Any]:
    """The report: the summary line plus every analysis, keyed by name."""
    document = results["fetch"]
    return {
        "id": document["id"],
        "title": document["title"],
        "summary": results["summary"],
        "language": results["language"]["language"],
        "sentiment": results["sentiment"],
        "keywords": results["keywords"],
        "stats": results["stats"],
    }
# --8<-- [end:enrich]
