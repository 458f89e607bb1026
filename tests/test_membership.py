"""The seat policy of agentd/cluster/raft/membership.py (docs/cluster.md, "Who holds the log, who watches"): pure."""

from __future__ import annotations

from agentd.cluster.raft.membership import Seats
from agentd.cluster.raft.types import Member, Membership


def ms(voters: str, learners: str = "") -> Membership:
    return Membership(tuple(Member(n, f"{n}:1", True) for n in voters.split()) +
                      tuple(Member(n, f"{n}:1", False) for n in learners.split()))


def test_joiners_take_the_voter_and_standby_seats_in_join_order_then_watch():
    seats = Seats(max_voters=3, standby_learners=1)
    assert seats.wants_member(ms("a b"), "c") and seats.should_vote(ms("a b"), "c")
    assert seats.wants_member(ms("a b c"), "d") and not seats.should_vote(ms("a b c"), "d")
    assert not seats.wants_member(ms("a b c", "d"), "e")  # every seat taken: it watches
    assert seats.should_vote(ms("a b c"), "a")  # a voter keeps its vote


def test_named_voters_vote_whatever_the_count_and_others_stand_by_or_watch():
    seats = Seats(voters=("v1", "v2"), max_voters=3, standby_learners=1)
    assert seats.wants_member(ms("a b c d"), "v2") and seats.should_vote(ms("a"), "v2")
    assert not seats.should_vote(ms("v1"), "x")
    assert seats.wants_member(ms("v1"), "x") and not seats.wants_member(ms("v1", "x"), "y")
    assert seats.wanted_voters(ms("v1", "v2 x")) == ["v2"]
    assert seats.dead_voters(ms("v1 v2"), {"v2": 99.0}, 5.0, "v1") == []  # the operator's voters stay


def test_learners_are_promoted_while_voter_seats_are_free():
    seats = Seats(max_voters=3, standby_learners=2)
    assert seats.wanted_voters(ms("a b", "c d")) == ["c", "d"]
    assert seats.wanted_voters(ms("a b c", "d")) == []


def test_a_dead_voter_is_demoted_never_the_leader_nor_the_last_one():
    seats = Seats(max_voters=5)
    silent = {"a": 60.0, "b": 60.0, "c": 1.0, "d": 31.0}
    assert seats.dead_voters(ms("a b c d e"), silent, 30.0, me="a") == ["b", "d"]
    assert seats.dead_voters(ms("a"), {"a": 60.0}, 30.0, me="b") == []


def test_spare_learners_of_a_release_that_can_watch_leave_one_at_a_time():
    seats = Seats(max_voters=3, standby_learners=1)
    m = ms("a b c", "d e f g")
    assert seats.spare_learners(m, [], lambda n: n != "d") == ["e"]
    assert seats.spare_learners(m, [], lambda n: False) == []  # agentd 0.1.0 learners cannot watch: they stay
    assert seats.spare_learners(ms("a b c", "d"), [], lambda n: True) == []  # the standby seat is kept
    assert seats.spare_learners(ms("a b", "d e"), ["d", "e"], lambda n: True) == []  # wanted as voters
    # A learner the leader does not hear from goes before a newcomer (an invited watcher is not sent back).
    assert seats.spare_learners(ms("a b c", "d z"), [], lambda n: True, active=lambda n: n != "z") == ["z"]
