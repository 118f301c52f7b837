"""The documents ``fetch`` serves (a stand-in for a database or an HTTP fetch)."""

from __future__ import annotations

DOCUMENTS: dict[str, dict[str, str]] = {
    "harbour": {
        "title": "The harbour reopens",
        "text": (
            "After two years of repairs the old harbour reopened on Saturday. Fishermen welcomed the new quay "
            "and the wider channel, and the first ferry arrived early and full. Traders said the market was "
            "busy and cheerful, and the mayor called the work a great success for the whole town."
        ),
    },
    "outage": {
        "title": "Payment outage",
        "text": (
            "A failed database upgrade stopped card payments for three hours on Monday. Customers could not "
            "pay, shops lost sales and the support lines were overwhelmed. The company apologised for the "
            "poor communication and promised a full report on the failure and the slow recovery."
        ),
    },
    "kafka": {
        "title": "Why we moved to Kafka",
        "text": (
            "Our services used to call each other over HTTP and poll for results. Moving the traffic to Kafka "
            "topics made the system easier to scale: every service reads its own topic, replays are simple, "
            "and a slow consumer no longer blocks the producer. The move was not free, but it was worth it."
        ),
    },
    "marche": {
        "title": "Le marché du samedi",
        "text": (
            "Le marché du samedi est le plus grand de la région. Les producteurs viennent de tous les villages "
            "et les habitants y font leurs courses pour la semaine. On y trouve des fromages, des fruits et "
            "du pain, et les cafés de la place sont pleins jusqu'à midi."
        ),
    },
}
