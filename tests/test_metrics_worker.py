"""A real `celery worker` (prefork) serving Prometheus metrics, scraped while requests are in flight.

The worker has a deployment of its own (topics, registry, Celery databases), so every count is
what this test did; replies are sent by its pool's children and reach ``/metrics`` through
prometheus-client's multiprocess mode.
"""

from __future__ import annotations

import os
import tempfile
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.kafka import return_topic_name
from support.ports import free_port
from support.waiting import wait_for
from support.workers import REGISTRIES, isolated_env

pytestmark = pytest.mark.integration


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the worker's ``/metrics``: ``{(name, sorted labels): value}``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for (n, found), v in samples.items()
               if n == name and all(dict(found).get(k) == want for k, want in labels.items()))


@pytest.mark.parametrize("registry", REGISTRIES)
def test_a_workers_metrics_count_what_the_test_did(worker_factory, kit, gates, registry):
    port = free_port()
    env = {**isolated_env(registry), "FUSION_METRICS_PORT": str(port), "FUSION_METRICS_ADDRESS": "127.0.0.1",
           "FUSION_MAX_IN_FLIGHT": "2"}
    run = env["FUSION_TEST_RUN"]
    w = worker_factory(name="metrics", env=env, concurrency=2)
    gate = gates()
    silent = kit.topic()
    back = kit.topic(return_topic_name())
    generic, boom, add = f"{run}.generic", f"{run}.boom", f"{run}.add"

    def ask(topic: str, data, rid: str) -> None:
        kit.send(topic, {"data": data, "return-topic": back, "id": rid})

    # Three runs of the generic reactor wait on the gate; at most two are in flight, the third lags.
    for i in range(3):
        ask(generic, {"deps": {"g": {"topic": gate.topic, "args": [i]}}}, f"g{i}")
    wait_for(lambda: len(gate.held) == 2, 60, "two dependency requests held by the gate")

    def parked_and_lagging():
        s = scrape(port)
        return (value(s, "fusion_waits_pending", topic=gate.topic) == 2
                and total(s, "fusion_intake_lag", topic=generic) == 1 and s)

    s = wait_for(parked_and_lagging, 60, "2 waits pending on the gate and 1 record of lag")
    assert value(s, "fusion_registry_partitions_owned") == 12  # the only waiter of its registry: every partition
    assert value(s, "fusion_return_topics_leased_total") == 2

    # Two answers: two ok replies from the pool's children; the third run starts and parks.
    assert gate.release() == 2
    kit.read(back, 2, timeout=60)
    wait_for(lambda: len(gate.held) == 1, 60, "the third dependency request")

    # An error reply, a timeout (whose reactor then replies with an error) and a dead letter.
    ask(boom, 7, "b0")
    ask(generic, {"deps": {"s": {"topic": silent, "timeout": 1}}}, "t0")
    kit.send(add, b"{not json")
    assert gate.release() == 1
    kit.read(back, 5, timeout=60)

    def all_counted():
        s = scrape(port)
        return value(s, "fusion_dead_letters_total", topic=add, reason="not-json") == 1 and \
            value(s, "fusion_dependency_timeouts_total", topic=silent) == 1 and \
            value(s, "fusion_replies_total", topic=generic, status="ok") == 3 and s

    s = wait_for(all_counted, 60, "the dead letter, the timeout and the replies in the metrics")
    assert value(s, "fusion_replies_total", topic=generic, status="error") == 1  # the timed-out dependency's run
    assert value(s, "fusion_replies_total", topic=boom, status="error") == 1
    assert value(s, "fusion_wait_duration_seconds_count", topic=gate.topic, outcome="ok") == 3
    assert value(s, "fusion_wait_duration_seconds_bucket", topic=gate.topic, outcome="ok", le="+Inf") == 3
    assert value(s, "fusion_return_topics_leased_total") == 4  # one per dependency request
    assert value(s, "fusion_return_topics_created_total", channel="leased") >= 1
    assert total(s, "fusion_intake_lag", topic=generic) == 0
    # The waiter removes a wait after it sent what follows it, which may answer the test first.
    wait_for(lambda: total(scrape(port), "fusion_waits_pending") == 0, 60, "no wait pending")

    # A warm shutdown closes the server.
    assert w.stop() == 0
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    log = w.log()
    assert f"metrics on http://127.0.0.1:{port}/metrics (the pool's processes write their counts to " in log
    made = log.split("write their counts to ", 1)[1].split(")", 1)[0]
    assert made.startswith(tempfile.gettempdir()) and not os.path.exists(made), "the worker removes the directory"
