"""The book of waits a waiter holds (fusion_celery.waitbook): no services, time moved by hand."""

from __future__ import annotations

import pytest
from support.clock import Clock

from fusion_celery.registry import Wait
from fusion_celery.waitbook import PRUNE_SLACK, TAKEOVER_GRACE_MS, Added, WaitBook, retry_delay


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def book(clock: Clock) -> WaitBook:
    return WaitBook(now_ms=clock.now_ms, monotonic=clock.monotonic)


def make_wait(clock: Clock, wait_id: str = "w1", topic: str = "rt.1", *, in_s: float = 60.0,
              service: str = "svc") -> Wait:
    now = clock.now_ms()
    return Wait(id=wait_id, return_topic=topic, topic=service, deadline=now + int(in_s * 1000), request={},
                created=now)


# -- holding waits ---------------------------------------------------------------------------------
def test_an_added_wait_is_found_by_id_and_by_return_topic(book, clock):
    wait = make_wait(clock)
    assert book.add(wait) == Added(True, None)
    assert len(book) == 1 and "w1" in book and bool(book)
    assert book.get("w1") is wait
    assert book.for_topic("rt.1") is wait
    assert list(book) == [wait]
    assert book.get("nope") is None and book.for_topic("rt.nope") is None


def test_a_wait_reported_again_with_the_same_topic_changes_nothing(book, clock):
    wait = make_wait(clock)
    book.add(wait)
    book.done("w1")["stored"] = True
    again = make_wait(clock, in_s=600)
    assert book.add(again) == Added(False)
    assert book.get("w1") is wait, "the wait held first stays"
    assert book.done("w1") == {"stored": True}
    assert book.deadline_entries == 1


def test_a_wait_registered_again_with_another_topic_replaces_the_one_held(book, clock):
    old = make_wait(clock, topic="rt.old", in_s=10)
    book.add(old)
    book.done("w1")["stored"] = True
    book.failed("w1", result=1)
    new = make_wait(clock, topic="rt.new", in_s=100)
    added = book.add(new)
    assert added.added and added.replaced is old, "the old wait is handed back: its topic is to be deleted"
    assert book.get("w1") is new and len(book) == 1
    assert book.for_topic("rt.old") is None and book.for_topic("rt.new") is new
    assert not book.retrying("w1") and book.done("w1") == {}, "the old attempt's retry and steps went with it"
    clock.advance(11)
    assert book.expired() == [], "the old registration's deadline does not expire the new one"
    clock.advance(90)
    assert book.expired() == [new]


def test_forget_drops_every_trace_of_a_wait(book, clock):
    wait = make_wait(clock)
    book.add(wait)
    book.done("w1")["stored"] = True
    book.failed("w1", exc=RuntimeError("x"))
    assert book.forget("w1") is wait
    assert len(book) == 0 and "w1" not in book and not book
    assert book.for_topic("rt.1") is None
    assert not book.retrying("w1") and book.retries == 0
    assert book.forget("w1") is None, "forgetting twice is harmless"
    clock.advance(3600)
    assert book.expired() == []
    assert book.done("w1") == {}


# -- deadlines -------------------------------------------------------------------------------------
def test_a_wait_expires_once_at_its_deadline_earliest_first(book, clock):
    late, early = make_wait(clock, "late", "rt.late", in_s=20), make_wait(clock, "early", "rt.early", in_s=10)
    book.add(late)
    book.add(early)
    clock.advance(9.999)
    assert book.expired() == []
    clock.advance(10.001)
    assert book.expired() == [early, late]
    assert book.expired() == [], "each wait is returned once"
    assert book.get("early") is early, "an expired wait stays held until its timeout is completed"


def test_a_forgotten_wait_never_expires(book, clock):
    book.add(make_wait(clock, in_s=1))
    book.forget("w1")
    clock.advance(2)
    assert book.expired() == []


def test_a_wait_past_its_deadline_on_arrival_gets_the_takeover_grace(book, clock):
    """Taken over from a dead worker after its deadline: its reply may be on its topic, so it is read first."""
    wait = make_wait(clock, in_s=-30)
    book.add(wait)
    assert book.expired() == []
    clock.advance(TAKEOVER_GRACE_MS / 1000 - 0.001)
    assert book.expired() == []
    clock.advance(0.001)
    assert book.expired() == [wait]


def test_the_takeover_grace_is_configurable(clock):
    book = WaitBook(now_ms=clock.now_ms, monotonic=clock.monotonic, takeover_grace_ms=100)
    wait = make_wait(clock, in_s=-1)
    book.add(wait)
    clock.advance(0.1)
    assert book.expired() == [wait]


def test_the_heap_drops_finished_entries_once_they_outnumber_the_waits_held(book, clock):
    keep = make_wait(clock, "keep", "rt.keep", in_s=3600)
    book.add(keep)
    for i in range(3 * PRUNE_SLACK):
        book.add(make_wait(clock, f"w{i}", f"rt.{i}", in_s=3600))
        book.forget(f"w{i}")
        assert book.deadline_entries <= 2 * len(book) + PRUNE_SLACK + 1
    assert book.deadline_entries < PRUNE_SLACK + 2, "pruned down to the entries of the waits held"
    clock.advance(3600)
    assert book.expired() == [keep], "pruning kept the entries of the waits held"


def test_pruning_keeps_only_the_current_entry_of_a_wait_registered_again(book, clock):
    book.add(make_wait(clock, "w", "rt.a", in_s=10))
    new = make_wait(clock, "w", "rt.b", in_s=50)
    book.add(new)
    for i in range(2 * PRUNE_SLACK + 8):
        book.add(make_wait(clock, f"x{i}", f"rt.x{i}", in_s=5))
        book.forget(f"x{i}")
    assert book.deadline_entries <= 2 * len(book) + PRUNE_SLACK + 1
    clock.advance(10)
    assert book.expired() == [], "the replaced registration's entry, pruned or not, does not count"
    clock.advance(40)
    assert book.expired() == [new]


# -- completions to retry --------------------------------------------------------------------------
def test_the_backoff_doubles_from_one_second_up_to_thirty():
    assert [retry_delay(a) for a in range(1, 9)] == [1, 2, 4, 8, 16, 30, 30, 30]


def test_a_failed_completion_is_due_again_after_its_backoff_with_the_same_outcome(book, clock):
    wait = make_wait(clock)
    book.add(wait)
    err = RuntimeError("the reply's error")
    retry = book.failed("w1", result=None, exc=err)
    assert retry.attempt == 1 and retry.due == clock.monotonic() + 1
    assert book.retrying("w1") and book.retries == 1
    assert book.retries_due() == []
    clock.advance(1)
    [(due_wait, due)] = book.retries_due()
    assert due_wait is wait and due.exc is err and due.result is None
    assert book.retries_due(), "a due retry stays until it succeeds (forget) or fails again"
    again = book.failed("w1", result=None, exc=err)
    assert again.attempt == 2 and again.due == clock.monotonic() + 2
    clock.advance(1.999)
    assert book.retries_due() == []
    clock.advance(0.001)
    assert [w for w, _ in book.retries_due()] == [wait]


def test_a_retry_keeps_the_result_it_was_completing_with(book, clock):
    book.add(make_wait(clock))
    book.failed("w1", result={"x": 1})
    clock.advance(1)
    [(_, retry)] = book.retries_due()
    assert retry.result == {"x": 1} and retry.exc is None


def test_a_wait_being_retried_does_not_expire(book, clock):
    """Its completion has an outcome (a reply read before the deadline): the retry completes it with that."""
    book.add(make_wait(clock, in_s=1))
    book.failed("w1", result=1)
    clock.advance(2)
    assert book.expired() == []
    assert book.retrying("w1")


def test_failing_a_wait_not_held_raises(book):
    with pytest.raises(KeyError):
        book.failed("ghost", result=1)


def test_the_steps_done_are_kept_per_wait_until_it_is_forgotten(book, clock):
    book.add(make_wait(clock, "a", "rt.a"))
    book.add(make_wait(clock, "b", "rt.b"))
    done = book.done("a")
    done["stored"] = True
    assert book.done("a") is done and book.done("a") == {"stored": True}
    assert book.done("b") == {}
    book.forget("a")
    book.add(make_wait(clock, "a", "rt.a"))
    assert book.done("a") == {}


# -- status ----------------------------------------------------------------------------------------
def test_oldest_and_count_by_topic(book, clock):
    assert book.oldest() is None and book.count_by_topic() == {}
    first = make_wait(clock, "a", "rt.a", service="pay")
    book.add(first)
    clock.advance(1)
    book.add(make_wait(clock, "b", "rt.b", service="pay"))
    book.add(make_wait(clock, "c", "rt.c", service="ship"))
    assert book.oldest() is first
    assert book.count_by_topic() == {"pay": 2, "ship": 1}
