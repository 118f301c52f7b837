"""Consumer groups of the in-memory broker: membership, rebalancing and committed offsets.

A group divides the partitions of the topics its members subscribe to among
them, as Kafka's coordinator does, in two phases so that no partition is ever
read by two members at once:

1. **revoke**: every member gives back what it must (under the eager protocol all
   it holds, under the cooperative one only what goes elsewhere), in its own
   thread, at its next ``poll``/``consume`` (its ``on_revoke`` runs there);
2. **assign**: once all have given back, each member is handed its new share at
   its next poll (``on_assign``: the whole share under eager, the partitions added
   under cooperative).

A rebalance starts when a member joins, leaves or changes its subscription, and
when a subscribed topic is created or deleted.  A member that does not give its
partitions back within its ``max.poll.interval.ms`` is removed from the group
(its consumer learns it at its next poll, through ``on_lost``, and joins again).
Everything here runs with the broker's condition variable held.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .broker import Broker

__all__ = ["Group", "Member", "TP", "assign_range", "assign_roundrobin", "assign_sticky"]

#: A partition of a topic.
TP = tuple[str, int]

_member_ids = itertools.count(1)


@dataclass
class Member:
    """One consumer in a group, as the coordinator sees it."""

    id: str
    subscription: tuple[str, ...]
    cooperative: bool
    assignor: str
    rebalance_timeout: float
    owned: set[TP] = field(default_factory=set)  # handed to the member and taken up by it
    holding: bool = False  # took up a share and has not given it back since (eager protocol)
    revoke: list[TP] | None = None  # to give back, not yet told (None: nothing asked)
    revoking: list[TP] | None = None  # told, its on_revoke has not returned yet
    assign: list[TP] | None = None  # handed out, not yet taken up
    deadline: float | None = None  # when it is removed if it has not given back what it was asked to


class Group:
    """A consumer group: members, the current division of partitions, and committed offsets."""

    def __init__(self, broker: Broker, group_id: str) -> None:
        self.broker, self.id = broker, group_id
        self.members: dict[str, Member] = {}
        self.committed: dict[TP, tuple[int, str | None]] = {}
        self.generation = 0
        self._target: dict[str, set[TP]] | None = None

    def __repr__(self) -> str:
        return f"<Group {self.id!r} generation {self.generation}, {len(self.members)} members>"

    # -- membership --------------------------------------------------------------------------------------------
    def join(self, subscription: list[str], *, cooperative: bool, assignor: str, rebalance_timeout: float,
             member_id: str | None = None) -> str:
        """Add a member (or change the subscription of ``member_id``); returns its member id."""
        member = self.members.get(member_id) if member_id else None
        if member is None:
            member_id = f"{self.id}-member-{next(_member_ids)}"
            member = self.members[member_id] = Member(member_id, tuple(subscription), cooperative, assignor,
                                                      rebalance_timeout)
        else:
            member.subscription = tuple(subscription)
        self.rebalance()
        return member.id

    def leave(self, member_id: str) -> None:
        """Remove a member; its partitions go to the others."""
        if self.members.pop(member_id, None) is not None:
            self.rebalance()

    def topics_changed(self) -> None:
        """A topic was created or deleted: divide the partitions again, when that changes the division (as
        Kafka does: a topic no member subscribes to, created or deleted, leaves the group alone)."""
        if not self.members:
            return
        settled = all(m.assign is None and m.revoke is None and m.revoking is None for m in self.members.values())
        if settled and self._divide() == {m.id: m.owned for m in self.members.values()}:
            return
        self.rebalance()

    # -- rebalancing -----------------------------------------------------------------------------------------
    def rebalance(self) -> None:
        """Start a rebalance: compute the new division and ask the members for what they must give back."""
        self.generation += 1
        self._target = self._divide()
        now = time.monotonic()
        for m in self.members.values():
            m.assign = None  # a share not taken up yet is void
            told = set(m.revoking or ())
            if m.cooperative:
                give_back = m.owned - self._target[m.id] - told
            else:
                give_back = m.owned - told
            if give_back or (not m.cooperative and m.holding and m.revoking is None):
                m.revoke = sorted(give_back)
                m.deadline = now + m.rebalance_timeout
            else:
                m.revoke = None
        self._complete()
        self.broker.cond.notify_all()

    def next_action(self, member_id: str) -> tuple[str, list[TP]] | None:
        """What the member must do at this poll: ``("revoke", parts)``, then :meth:`revoked` once its
        ``on_revoke`` returned; ``("assign", parts)`` (taken up at once); ``("lost", [])`` when the group
        removed it; or None."""
        m = self.members.get(member_id)
        if m is None:
            return "lost", []
        if m.revoke is not None and m.revoking is None:
            m.revoking, m.revoke = m.revoke, None
            return "revoke", list(m.revoking)
        if m.assign is not None and m.revoking is None:
            parts, m.assign = m.assign, None
            m.owned = set(parts) if not m.cooperative else m.owned | set(parts)
            m.holding = True
            return "assign", parts
        return None

    def revoked(self, member_id: str) -> None:
        """The member's ``on_revoke`` returned: what it was told to give back is free."""
        m = self.members.get(member_id)
        if m is None or m.revoking is None:
            return
        m.owned -= set(m.revoking)
        m.revoking = None
        if not m.cooperative:
            m.holding = False
        if m.revoke is None:
            m.deadline = None
        self._complete()
        self.broker.cond.notify_all()

    def _complete(self) -> None:
        """Hand out the new division once no member still holds a partition it must give back."""
        if self._target is None or any(m.revoke is not None or m.revoking is not None
                                       for m in self.members.values()):
            return
        for m in self.members.values():
            share = self._target.get(m.id, set())
            m.assign = sorted(share if not m.cooperative else share - m.owned)
        self._target = None

    def expire(self, now: float) -> None:
        """Remove the members that did not give their partitions back within their rebalance timeout."""
        late = [m.id for m in self.members.values() if m.deadline is not None and m.deadline <= now]
        for member_id in late:
            del self.members[member_id]
        if late:
            self.rebalance()

    def next_deadline(self) -> float | None:
        """When the next member is removed for not giving back its partitions (None: nobody is late)."""
        return min((m.deadline for m in self.members.values() if m.deadline is not None), default=None)

    def _divide(self) -> dict[str, set[TP]]:
        subscribed = {m.id: set(self.broker.matching(m.subscription)) for m in self.members.values()}
        counts = {t: len(self.broker.topics[t].partitions) for topics in subscribed.values() for t in topics}
        if not self.members:
            return {}
        first = next(iter(self.members.values()))
        if all(m.cooperative for m in self.members.values()):
            return assign_sticky(subscribed, counts, {m.id: m.owned for m in self.members.values()})
        if first.assignor == "roundrobin":
            return assign_roundrobin(subscribed, counts)
        return assign_range(subscribed, counts)

    # -- offsets ------------------------------------------------------------------------------------------------
    def commit(self, offsets: dict[TP, tuple[int, str | None]]) -> None:
        self.committed.update(offsets)

    def committed_offset(self, tp: TP) -> int | None:
        found = self.committed.get(tp)
        return None if found is None else found[0]


def assign_range(subscribed: dict[str, set[str]], counts: dict[str, int]) -> dict[str, set[TP]]:
    """Kafka's ``range`` assignor: each topic's partitions cut in consecutive runs, one per member."""
    out: dict[str, set[TP]] = {m: set() for m in subscribed}
    for topic, count in sorted(counts.items()):
        members = sorted(m for m, topics in subscribed.items() if topic in topics)
        share, extra = divmod(count, len(members))
        start = 0
        for i, m in enumerate(members):
            n = share + (1 if i < extra else 0)
            out[m].update((topic, p) for p in range(start, start + n))
            start += n
    return out


def assign_roundrobin(subscribed: dict[str, set[str]], counts: dict[str, int]) -> dict[str, set[TP]]:
    """Kafka's ``roundrobin`` assignor: every partition in turn to the next member that subscribes to it."""
    out: dict[str, set[TP]] = {m: set() for m in subscribed}
    members = sorted(subscribed)
    turn = itertools.cycle(members)
    for topic, count in sorted(counts.items()):
        for p in range(count):
            for _ in members:
                m = next(turn)
                if topic in subscribed[m]:
                    out[m].add((topic, p))
                    break
    return out


def assign_sticky(subscribed: dict[str, set[str]], counts: dict[str, int],
                  owned: dict[str, set[TP]]) -> dict[str, set[TP]]:
    """``cooperative-sticky``: members keep what they hold up to an even share; the rest goes to the least loaded."""
    every = sorted((t, p) for t, n in counts.items() for p in range(n))
    quota = math.ceil(len(every) / len(subscribed)) if subscribed else 0
    out: dict[str, set[TP]] = {m: set() for m in subscribed}
    placed: set[TP] = set()
    for m in sorted(subscribed):
        for tp in sorted(owned.get(m, ())):
            if tp[0] in subscribed[m] and tp[0] in counts and tp[1] < counts[tp[0]] and tp not in placed \
                    and len(out[m]) < quota:
                out[m].add(tp)
                placed.add(tp)
    for tp in every:
        if tp in placed:
            continue
        takers = [m for m in sorted(subscribed) if tp[0] in subscribed[m]]
        if takers:
            out[min(takers, key=lambda m: len(out[m]))].add(tp)
    return out
