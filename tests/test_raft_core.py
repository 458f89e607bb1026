"""The pure Raft core, scenario by scenario, with messages delivered by hand.

Each test drives RaftCore objects directly (no asyncio, no network): the
harness below persists each Ready into MemoryStorage, queues its messages,
and lets the test decide which messages are delivered, dropped or held back.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from agentd.cluster.raft.core import NotLeader, RaftCore
from agentd.cluster.raft.storage import MemoryStorage
from agentd.cluster.raft.types import (
    AppendRequest,
    ConfigChange,
    Entry,
    EntryKind,
    HardState,
    Heartbeat,
    Member,
    Membership,
    RaftConfig,
    Ready,
    Role,
    SnapshotRequest,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)
from agentd.errors import InvalidInput, NotAvailable

CFG = RaftConfig(heartbeat_ticks=1, election_ticks_min=10, election_ticks_max=20, max_append_entries=4,
                 failover_slot_ticks=2)


class Cluster:
    def __init__(self, voters: list[str], learners: list[str] = (), cfg: RaftConfig = CFG, seed: int = 1):
        self.cfg = cfg
        self.seed = seed
        membership = Membership(tuple([Member(v, v, True) for v in voters] + [Member(x, x, False) for x in learners]))
        self.storage: dict[str, MemoryStorage] = {}
        self.nodes: dict[str, RaftCore] = {}
        self.applied: dict[str, list[Entry]] = {}
        self.reads: list = []
        self.dropped_reads: list[int] = []
        self.queue: list = []
        self.down: set[str] = set()
        for nid in [*voters, *learners]:
            st = self.storage[nid] = MemoryStorage(nid)
            st.save(Ready(hard_state=HardState(1, None, 1), entries=(Entry(1, 1, EntryKind.CONFIG,
                                                                           membership.encode()),)))
            self.boot(nid)

    def boot(self, nid: str) -> RaftCore:
        st = self.storage[nid].load()
        core = RaftCore(nid, hard_state=st.hard_state, snapshot=st.snapshot, entries=st.entries, config=self.cfg,
                        rng=random.Random(f"{self.seed}{nid}"))
        self.nodes[nid] = core
        self.applied[nid] = []
        self.down.discard(nid)
        return core

    def crash(self, nid: str) -> None:
        self.down.add(nid)
        self.queue = [m for m in self.queue if m.to != nid and m.sender != nid]

    def add_node(self, nid: str) -> RaftCore:
        self.storage[nid] = MemoryStorage(nid)
        return self.boot(nid)

    def flush(self, nid: str) -> None:
        core = self.nodes[nid]
        while core.has_ready():
            rd = core.ready()
            self.storage[nid].save(rd)
            self.queue.extend(rd.messages)
            self.applied[nid].extend(rd.committed)
            self.reads.extend(rd.reads)
            self.dropped_reads.extend(rd.dropped_reads)

    def flush_all(self) -> None:
        for nid in self.nodes:
            if nid not in self.down:
                self.flush(nid)

    def deliver(self, allow=lambda m: True, rounds: int = 50) -> None:
        """Deliver queued messages (and the answers they cause) until quiet; others are dropped."""
        for _ in range(rounds):
            self.flush_all()
            batch, self.queue = self.queue, []
            if not batch:
                return
            for m in batch:
                if m.to in self.down or m.sender in self.down:
                    continue
                verdict = allow(m)
                if verdict is False or verdict is None:
                    continue
                self.nodes[m.to].step(m if verdict is True else verdict)  # the network may alter it
                self.flush(m.to)

    def tick(self, nid: str, n: int = 1) -> None:
        for _ in range(n):
            self.nodes[nid].tick()
        self.flush(nid)

    def elect(self, nid: str, allow=lambda m: True) -> RaftCore:
        """`nid` times out and campaigns among the nodes `allow` lets it reach."""
        core = self.nodes[nid]
        for _ in range(3):  # a rejected pre-vote teaches the candidate a newer term; then it wins
            for other, oc in self.nodes.items():
                if other != nid and other not in self.down and allow(VoteRequest(0, nid, other, 0, 0)):
                    # Time passes for them too: long enough that their leader lease ran
                    # out (check-quorum), not long enough for their own timer to fire.
                    oc._election_elapsed = max(oc._election_elapsed, self.cfg.election_ticks_min)
            self.tick(nid, self.cfg.election_ticks_max)
            self.deliver(allow)
            if core.role == Role.LEADER:
                return core
        raise AssertionError(f"{nid} did not win: {core.role}")

    def propose(self, nid: str, data: bytes, allow=lambda m: True) -> int:
        index, _ = self.nodes[nid].propose(data)
        self.deliver(allow)
        return index

    def heartbeat(self, nid: str, allow=lambda m: True) -> None:
        self.tick(nid, self.cfg.heartbeat_ticks)
        self.deliver(allow)

    def data(self, nid: str) -> list[bytes]:
        return [e.data for e in self.applied[nid] if e.kind == EntryKind.NORMAL]


def only(*names):
    group = set(names)
    return lambda m: m.sender in group and m.to in group


# ---------------------------------------------------------------- elections


def test_single_voter_elects_itself_and_commits_alone():
    c = Cluster(["a"])
    c.nodes["a"].campaign()
    c.flush("a")
    assert c.nodes["a"].role == Role.LEADER
    c.propose("a", b"x")
    assert c.data("a") == [b"x"]


def test_three_voters_elect_one_leader_and_replicate():
    c = Cluster(["a", "b", "c"])
    leader = c.elect("a")
    c.propose("a", b"x")
    c.propose("a", b"y")
    c.heartbeat("a")
    assert leader.term == 2
    for n in "abc":
        assert c.data(n) == [b"x", b"y"]
        assert c.nodes[n].leader == "a"


def test_pre_vote_keeps_a_partitioned_node_from_raising_the_term():
    c = Cluster(["a", "b", "c"])
    c.elect("a")
    term = c.nodes["a"].term
    # c is cut off and times out again and again: pre-votes fail, its term stays.
    for _ in range(5):
        c.tick("c", CFG.election_ticks_max)
        c.deliver(allow=lambda m: False)
    assert c.nodes["c"].term == term
    assert c.nodes["c"].role == Role.PRE_CANDIDATE
    # When it comes back it rejoins without deposing the leader.
    c.heartbeat("a")
    assert c.nodes["a"].role == Role.LEADER and c.nodes["a"].term == term
    assert c.nodes["c"].role == Role.FOLLOWER and c.nodes["c"].leader == "a"


def test_leader_lease_ignores_votes_while_the_leader_is_heard():
    c = Cluster(["a", "b", "c"])
    c.elect("a")
    b = c.nodes["b"]
    b.step(VoteRequest(term=9, sender="c", to="b", last_index=99, last_term=8))
    c.flush("b")
    assert b.term == 2 and b.vote == "a"  # not disrupted by a node with a bigger term
    assert not [m for m in c.queue if isinstance(m, VoteResponse) and m.granted]


def test_vote_is_durable_and_never_given_twice_in_a_term():
    c = Cluster(["a", "b", "c"])
    b = c.nodes["b"]
    b.step(VoteRequest(term=5, sender="a", to="b", last_index=1, last_term=1))
    c.flush("b")
    assert c.storage["b"].state.hard_state == HardState(5, "a", 1)
    b = c.boot("b")  # restart from storage
    b.step(VoteRequest(term=5, sender="c", to="b", last_index=1, last_term=1))
    rd = b.ready()
    assert [m.granted for m in rd.messages if isinstance(m, VoteResponse)] == [False]


def test_candidate_with_stale_log_loses():
    c = Cluster(["a", "b", "c"])
    c.elect("a")
    c.propose("a", b"x", allow=only("a", "b"))  # c misses it
    c.crash("a")
    c.tick("c", CFG.election_ticks_max)
    c.deliver()
    assert c.nodes["c"].role != Role.LEADER  # b's log is longer: no vote for c
    c.elect("b")
    c.heartbeat("b")
    assert c.data("c") == [b"x"]


def test_learner_never_campaigns_and_its_vote_does_not_count():
    c = Cluster(["a", "b", "c"], learners=["l"])
    c.tick("l", CFG.election_ticks_max * 5)
    assert c.nodes["l"].role == Role.FOLLOWER and not c.queue
    # a and l alone are not a quorum of the voters {a, b, c}
    c.tick("a", CFG.election_ticks_max)
    c.deliver(allow=only("a", "l"))
    assert c.nodes["a"].role != Role.LEADER


def test_learner_replicates_the_log():
    c = Cluster(["a", "b", "c"], learners=["l"])
    c.elect("a")
    c.propose("a", b"x")
    c.heartbeat("a")
    assert c.data("l") == [b"x"]


# ---------------------------------------------------------------- replication


def votes_among(*names):
    group = set(names)
    return lambda m: isinstance(m, VoteRequest | VoteResponse) and m.sender in group and m.to in group


def test_figure_8_an_old_term_entry_is_not_committed_by_counting_replicas():
    """Raft paper, Figure 8: replicating a previous term's entry to a majority does not commit it.

    Indices are shifted by one against the paper because index 1 holds the
    bootstrap configuration, and every new leader appends a no-op first.
    """
    one_at_a_time = RaftConfig(heartbeat_ticks=1, election_ticks_min=10, election_ticks_max=20,
                               max_append_entries=1)
    c = Cluster(["s1", "s2", "s3", "s4", "s5"], cfg=one_at_a_time)
    # (a) s1 leads term 2 (its no-op at 2 commits everywhere) and gets entry 3 onto s2 only.
    s1 = c.elect("s1")
    assert s1.term == 2 and s1.committed == 2
    c.propose("s1", b"term2-entry", allow=only("s1", "s2"))
    assert c.nodes["s2"].log.term(3) == 2 and s1.committed == 2  # no majority yet
    # (b) s1 crashes; s5 wins term 3 with s3 and s4 and appends its no-op at 3, then crashes
    # before replicating it.
    c.crash("s1")
    s5 = c.elect("s5", allow=votes_among("s3", "s4", "s5"))
    assert s5.term == 3 and s5.log.term(3) == 3
    c.crash("s5")
    # (c) s1 restarts, wins term 4 with s2 and s3, and copies its term-2 entry to s3. Its own
    # no-op (index 4) does not get through yet: now s1, s2, s3 (a majority) hold entry 3.
    c.boot("s1")
    group = {"s1", "s2", "s3"}

    def without_index_4(m):
        if m.sender not in group or m.to not in group:
            return False
        if isinstance(m, AppendRequest):
            return dataclasses.replace(m, entries=tuple(e for e in m.entries if e.index < 4))
        return True

    s1 = c.elect("s1", allow=without_index_4)
    assert s1.term == 4
    assert all(c.nodes[n].log.term(3) == 2 for n in group)
    assert s1.progress["s2"].match == 3 and s1.progress["s3"].match == 3
    assert s1.committed == 2, "Figure 8: a previous term's entry was committed by counting replicas"
    assert all(b"term2-entry" not in c.data(n) for n in c.nodes)
    # (d) s1 crashes again. s5 (last entry of term 3) wins with s2, s3 and s4 and overwrites
    # index 3 everywhere: allowed only because that entry never committed.
    c.crash("s1")
    c.boot("s5")
    without_s1 = lambda m: "s1" not in (m.sender, m.to)  # noqa: E731
    c.elect("s5", allow=without_s1)
    c.propose("s5", b"term5-entry", allow=without_s1)
    for _ in range(4):
        c.heartbeat("s5", allow=without_s1)
    for n in ("s2", "s3", "s4", "s5"):
        assert c.nodes[n].log.term(3) == 3
        assert c.data(n) == [b"term5-entry"]
    # (e) when s1 comes back, its uncommitted suffix is replaced by the leader's log.
    c.boot("s1")
    for _ in range(4):
        c.heartbeat("s5")
    assert c.data("s1") == [b"term5-entry"]


def test_figure_8_an_entry_of_the_current_term_commits_the_earlier_ones():
    c = Cluster(["s1", "s2", "s3", "s4", "s5"])
    c.elect("s1")
    c.propose("s1", b"old", allow=only("s1", "s2"))
    c.crash("s1")
    c.boot("s1")
    s1 = c.elect("s1", allow=only("s1", "s2", "s3"))  # the new noop carries "old" with it
    c.heartbeat("s1", allow=only("s1", "s2", "s3"))
    assert b"old" in c.data("s1") and b"old" in c.data("s3")
    assert s1.log.term(s1.committed) == s1.term


def test_follower_with_a_divergent_suffix_is_repaired():
    c = Cluster(["a", "b", "c", "d", "e"])
    a = c.elect("a")
    for k in range(6):
        a.propose(f"lost{k}".encode())
    c.flush("a")
    for m in [m for m in c.queue if m.to == "b"]:  # only b receives them; its acks are lost
        c.nodes["b"].step(m)
    c.queue = []
    c.flush("b")
    c.queue = []
    c.crash("a")
    b_log = c.nodes["b"].log
    assert b_log.last_index() > c.nodes["c"].log.last_index()
    cc = c.elect("c", allow=only("c", "d", "e"))
    c.propose("c", b"kept", allow=lambda m: "a" not in (m.sender, m.to))
    c.heartbeat("c", allow=lambda m: "a" not in (m.sender, m.to))
    assert [b_log.term(i) for i in range(1, b_log.last_index() + 1)] == \
        [cc.log.term(i) for i in range(1, cc.log.last_index() + 1)]
    assert c.data("b") == [b"kept"]


def test_leader_backs_up_over_a_long_conflicting_log_quickly():
    c = Cluster(["a", "b", "c"])
    c.elect("a")
    c.crash("b")
    c.crash("c")
    for k in range(20):  # uncommitted entries of term 2 on a only
        c.nodes["a"].propose(f"junk{k}".encode())
    c.flush("a")
    c.crash("a")
    c.boot("b")
    c.boot("c")
    b = c.elect("b", allow=only("b", "c"))
    for k in range(3):
        c.propose("b", f"real{k}".encode(), allow=only("b", "c"))
    c.boot("a")
    appends = []
    c.heartbeat("b", allow=lambda m: appends.append(m) or True)
    assert c.data("a") == [b"real0", b"real1", b"real2"]
    assert b.progress["a"].match == b.log.last_index()
    # The conflict hint skips the whole run of term-2 junk instead of one index per round trip.
    rejects = [m for m in appends if getattr(m, "success", True) is False]
    assert len(rejects) <= 3


# ---------------------------------------------------------------- check-quorum and stale leaders


def test_isolated_leader_steps_down_and_cannot_commit():
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    index, _ = a.propose(b"lonely")
    c.flush("a")
    c.queue = []
    ticks = 0
    while a.role == Role.LEADER:
        c.tick("a")
        c.queue = []  # the network is cut
        ticks += 1
        assert ticks <= 3 * CFG.election_ticks_min
    # About one election timeout after the cut: the append above went unanswered from the start.
    assert ticks == CFG.election_ticks_min
    assert a.committed < index
    with pytest.raises(NotLeader):
        a.propose(b"again")


def test_a_leader_whose_own_loop_stalled_does_not_step_down():
    """A stall of the leader's loop (SIGSTOP, a long callback) is no evidence against the followers: their
    answers are queued unread. Catching up on the missed ticks must not make it step down before it reads them."""
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    term = a.term
    c.tick("a", CFG.heartbeat_ticks)  # a heartbeat goes out; the answers arrive while a is stopped
    sent, c.queue = c.queue, []
    answers = []
    for m in sent:
        c.nodes[m.to].step(m)
        answers.extend(c.nodes[m.to].ready().messages)
    assert answers
    a.advance(10 * CFG.election_ticks_max)  # resumed: the clock says ten election timeouts passed
    assert a.role == Role.LEADER and a.term == term
    for m in answers:
        a.step(m)
    c.flush("a")
    c.deliver()
    for _ in range(3):  # and it leads on as before
        c.heartbeat("a")
    assert a.role == Role.LEADER and a.term == term


def test_a_leader_resumed_after_a_stall_heartbeats_at_once_and_learns_if_it_was_deposed():
    cfg = dataclasses.replace(CFG, heartbeat_ticks=4, election_ticks_min=16, election_ticks_max=24)
    c = Cluster(["a", "b", "c"], cfg=cfg)
    a = c.elect("a")
    c.tick("a")  # mid-way between two heartbeats
    c.deliver()
    c.elect("b", allow=only("b", "c"))  # while a was stopped
    a.advance(10 * cfg.election_ticks_max)
    c.flush("a")
    assert {m.to for m in c.queue if isinstance(m, Heartbeat) and m.sender == "a"} == {"b", "c"}
    c.deliver()
    assert a.role == Role.FOLLOWER and a.term == c.nodes["b"].term


def test_a_stalled_leader_that_is_also_cut_off_still_steps_down():
    """Check-quorum keeps its purpose: after the stall, fresh heartbeats nobody answers count again."""
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    a.advance(10 * CFG.election_ticks_max)
    c.flush("a")
    c.queue = []
    ticks = 0
    while a.role == Role.LEADER:
        a.advance(1)
        c.flush("a")
        c.queue = []  # the network is cut
        ticks += 1
        assert ticks <= 3 * CFG.election_ticks_max
    assert ticks <= CFG.election_ticks_min + CFG.heartbeat_ticks


def test_one_silent_follower_is_not_enough_to_step_down():
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    for _ in range(5):  # c is cut off for five election timeouts, b answers
        for _ in range(CFG.election_ticks_min // CFG.heartbeat_ticks):
            c.heartbeat("a", allow=lambda m: "c" not in (m.to, m.sender))
    assert a.role == Role.LEADER
    assert a.progress["c"].silent_ticks >= CFG.election_ticks_min and a.progress["b"].silent_ticks == 0


def test_a_follower_whose_own_loop_stalled_does_not_campaign():
    """A follower resumed after a stall first reads the leader's queued heartbeats instead of campaigning."""
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    b = c.nodes["b"]
    b.advance(10 * CFG.election_ticks_max)
    c.flush("b")
    assert b.role == Role.FOLLOWER and b.leader == "a"
    assert not [m for m in c.queue if isinstance(m, VoteRequest)]
    c.heartbeat("a")
    assert a.role == Role.LEADER and b.leader == "a"


def test_a_follower_whose_leader_went_silent_still_campaigns_after_an_election_timeout():
    c = Cluster(["a", "b", "c"])
    c.elect("a")
    c.crash("a")
    b = c.nodes["b"]
    ticks = 0
    while b.role == Role.FOLLOWER:  # a driver waking every tick on time: every tick counts
        b.advance(1)
        ticks += 1
        assert ticks <= CFG.election_ticks_max
    assert b.role == Role.PRE_CANDIDATE


def test_majority_side_elects_a_new_leader_and_the_old_one_steps_down_when_healed():
    c = Cluster(["a", "b", "c"])
    c.elect("a")
    c.elect("b", allow=only("b", "c"))  # a is partitioned away (and, say, SIGSTOPped)
    c.propose("b", b"new", allow=only("b", "c"))
    old = c.nodes["a"]
    assert old.role == Role.LEADER and old.term < c.nodes["b"].term
    # a resumes and sends its stale heartbeat: the answer carries the newer term.
    c.tick("a", CFG.heartbeat_ticks)
    c.deliver()
    assert old.role == Role.FOLLOWER and old.term == c.nodes["b"].term
    c.heartbeat("b")
    assert c.data("a") == [b"new"]


def test_stale_leader_proposal_is_overwritten_not_applied():
    c = Cluster(["a", "b", "c"])
    c.elect("a")
    idx, term = c.nodes["a"].propose(b"stale")
    c.flush("a")
    c.queue = []
    c.elect("b", allow=only("b", "c"))
    c.propose("b", b"fresh", allow=only("b", "c"))
    c.heartbeat("b")
    assert [e.term for e in c.applied["a"] if e.index == idx] != [term]
    assert c.data("a") == [b"fresh"]


# ---------------------------------------------------------------- fast failover hint


def test_leader_lost_hint_lets_the_first_voter_campaign_within_a_few_ticks():
    c = Cluster(["a", "b", "c"])
    c.elect("a")
    c.crash("a")
    for n in "bc":
        c.nodes[n].report_leader_lost("a")
    ticks = 0
    while not any(c.nodes[n].role == Role.LEADER for n in "bc"):
        for n in "bc":
            c.tick(n)
        c.deliver()
        ticks += 1
        assert ticks < CFG.election_ticks_min, "the hint did not shorten the election"
    assert c.nodes["b"].role == Role.LEADER  # rank 0 among the remaining voters
    assert ticks <= 3


def test_false_leader_lost_hint_does_not_disrupt_a_live_leader():
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    term = a.term
    c.nodes["b"].report_leader_lost("a")  # b's connection blipped, a is fine
    for _ in range(5):
        c.tick("b")
        c.deliver()
    assert a.role == Role.LEADER and a.term == term
    c.heartbeat("a")
    assert c.nodes["b"].leader == "a" and c.nodes["b"].role == Role.FOLLOWER


# ---------------------------------------------------------------- reads


def test_read_index_is_served_after_heartbeat_quorum():
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    c.propose("a", b"x")
    a.read_index(7)
    rd = a.ready()
    assert rd.reads == ()
    for m in rd.messages:
        assert isinstance(m, Heartbeat)
        c.nodes[m.to].step(m)
    got = []
    for n in "bc":
        for m in c.nodes[n].ready().messages:
            a.step(m)
            got.extend(a.ready().reads)
    assert [(r.ctx, r.index) for r in got] == [(7, a.committed)]


def test_partitioned_leader_cannot_serve_a_linearizable_read():
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    a.read_index(1)
    c.flush("a")
    c.queue = []
    for _ in range(3 * CFG.election_ticks_min):
        c.tick("a")
        c.queue = []
    assert c.reads == []
    assert a.role != Role.LEADER  # stepped down (and, cut off, may be campaigning in vain since)
    assert c.dropped_reads == [1]  # the driver fails the waiting reader instead of hanging


def test_single_voter_serves_reads_at_once():
    c = Cluster(["a"])
    c.nodes["a"].campaign()
    c.flush("a")
    c.propose("a", b"x")
    c.nodes["a"].read_index(3)
    c.flush("a")
    assert [(r.ctx, r.index) for r in c.reads] == [(3, c.nodes["a"].committed)]


def test_read_on_follower_is_refused_with_the_leader_named():
    c = Cluster(["a", "b", "c"])
    c.elect("a")
    c.heartbeat("a")
    with pytest.raises(NotLeader) as exc:
        c.nodes["b"].read_index(1)
    assert exc.value.leader == "a"
    assert "leader is a" in str(exc.value)


# ---------------------------------------------------------------- membership


def test_add_learner_then_promote_after_catch_up():
    c = Cluster(["a"])
    c.nodes["a"].campaign()
    c.flush("a")
    for k in range(10):
        c.propose("a", f"x{k}".encode())
    c.add_node("b")
    a = c.nodes["a"]
    a.propose_config(ConfigChange("add_learner", "b", "b"))
    with pytest.raises(NotAvailable, match="not caught up"):
        a.propose_config(ConfigChange("promote", "b"))
    c.deliver()
    c.heartbeat("a")
    assert c.data("b") == c.data("a")
    a.propose_config(ConfigChange("promote", "b"))
    c.deliver()
    assert a.membership.voters == ("a", "b")
    assert c.nodes["b"].membership.voters == ("a", "b")


def test_one_membership_change_at_a_time():
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    c.add_node("d")
    a.propose_config(ConfigChange("add_learner", "d", "d"))
    with pytest.raises(NotAvailable, match="another membership change"):
        a.propose_config(ConfigChange("remove", "c"))
    c.deliver()
    a.propose_config(ConfigChange("remove", "c"))


def test_promote_refused_until_the_learner_caught_up():
    c = Cluster(["a", "b", "c"], learners=["l"])
    c.elect("a", allow=lambda m: "l" not in (m.sender, m.to))
    for k in range(20):
        c.propose("a", f"x{k}".encode(), allow=lambda m: "l" not in (m.sender, m.to))
    with pytest.raises(NotAvailable, match="not caught up"):
        c.nodes["a"].propose_config(ConfigChange("promote", "l"))


def test_membership_changes_are_validated():
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    with pytest.raises(InvalidInput, match="already a member"):
        a.propose_config(ConfigChange("add_learner", "b", "b"))
    with pytest.raises(InvalidInput, match="not a member"):
        a.propose_config(ConfigChange("remove", "zz"))
    with pytest.raises(InvalidInput, match="unknown membership change"):
        a.propose_config(ConfigChange("add_voter", "d", "d"))
    with pytest.raises(NotLeader):
        c.nodes["b"].propose_config(ConfigChange("remove", "c"))


def test_new_leader_must_commit_in_its_term_before_changing_membership():
    c = Cluster(["a", "b", "c"])
    c.tick("a", CFG.election_ticks_max)
    c.deliver(allow=lambda m: not isinstance(m, AppendRequest))  # elected, but its noop does not replicate
    a = c.nodes["a"]
    assert a.role == Role.LEADER and not a.committed_in_term()
    with pytest.raises(NotAvailable, match="not committed an entry in its term"):
        a.propose_config(ConfigChange("remove", "c"))


def test_removed_leader_hands_over_and_steps_down():
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    c.propose("a", b"x")
    a.propose_config(ConfigChange("remove", "a"))
    c.deliver()
    assert a.role == Role.FOLLOWER
    assert not a.promotable()
    leaders = [n for n in "bc" if c.nodes[n].role == Role.LEADER]
    assert leaders, "the removed leader should have sent TimeoutNow to a caught-up voter"
    c.propose(leaders[0], b"after")
    assert c.data("b")[-1] == b"after" and c.data("c")[-1] == b"after"


def test_removed_node_cannot_disrupt_the_cluster():
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    a.propose_config(ConfigChange("remove", "c"))
    c.deliver(allow=lambda m: m.to != "c")  # c never learns it was removed
    assert a.membership.voters == ("a", "b")
    term = a.term
    for _ in range(5):
        c.tick("c", CFG.election_ticks_max)
        c.heartbeat("a")
    assert a.role == Role.LEADER and a.term == term


def test_reused_name_with_empty_disk_does_not_vote_for_a_stale_node():
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    a.propose_config(ConfigChange("remove", "c"))
    c.deliver(allow=lambda m: m.to != "c")
    a.propose_config(ConfigChange("remove", "b"))
    c.deliver(allow=lambda m: m.to != "c")
    # "b" comes back as a brand new machine and is re-added as a learner.
    c.add_node("b")
    a.propose_config(ConfigChange("add_learner", "b", "b"))
    # stale c still believes in {a, b, c}; the fresh b must not hand it a quorum.
    c.tick("c", CFG.election_ticks_max)
    c.deliver(allow=lambda m: "a" not in (m.sender, m.to))
    assert c.nodes["c"].role != Role.LEADER


# ---------------------------------------------------------------- snapshots and transfer


def test_lagging_follower_gets_a_snapshot():
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    for k in range(12):
        c.propose("a", f"x{k}".encode(), allow=lambda m: "c" not in (m.sender, m.to))
    applied = a.log.applied
    a.compact(applied, b"state-at-%d" % applied)
    c.flush("a")
    sent = []
    c.heartbeat("a", allow=lambda m: sent.append(m) or True)
    snaps = [m for m in sent if isinstance(m, SnapshotRequest)]
    assert len(snaps) == 1 and snaps[0].to == "c"
    assert c.storage["c"].state.snapshot.data == b"state-at-%d" % applied
    c.propose("a", b"after")
    assert c.nodes["c"].log.last_index() == a.log.last_index()
    assert c.data("c") == [b"after"]  # the earlier ones arrived inside the snapshot


def test_transfer_leadership_to_a_caught_up_voter():
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    c.propose("a", b"x")
    a.transfer_leadership("c")
    sent = []
    c.deliver(allow=lambda m: sent.append(m) or True)
    assert any(isinstance(m, TimeoutNow) for m in sent)
    assert c.nodes["c"].role == Role.LEADER and a.role == Role.FOLLOWER
    with pytest.raises(InvalidInput):
        c.nodes["c"].transfer_leadership("nobody")


def test_proposals_are_refused_during_a_transfer():
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    a.transfer_leadership("b")
    with pytest.raises(NotLeader, match="moving to b"):
        a.propose(b"x")
