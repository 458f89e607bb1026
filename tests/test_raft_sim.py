"""Raft safety under a seeded, hostile, in-process network (agentd.testing.raft_simulation).

Every seed runs thousands of steps with drops, duplicates, delays and
reordering, partitions, crashes (also between persisting and sending),
restarts from storage alone, membership changes, snapshots, ReadIndex reads
and leadership transfers, checking after every step: one leader per term, log
matching, committed entries never lost or changed, state machines agreeing,
linearizable reads. Then the network heals and a new entry must commit on
every member (liveness). RAFT_SIM_SEEDS=N runs N seeds per profile instead.

The mutation tests at the end break the core on purpose and require the
checker to notice, so a silent checker cannot pass for a safe Raft.
"""

from __future__ import annotations

import logging
import os

import pytest

from agentd.cluster.raft.core import RaftCore
from agentd.cluster.raft.log import RaftLog
from agentd.cluster.raft.types import RaftConfig
from agentd.testing import raft_simulation as sim_module
from agentd.testing.raft_simulation import Faults, SafetyViolation, Simulation

SEEDS = int(os.environ.get("RAFT_SIM_SEEDS", "6"))
STEPS = 2000

PROFILES = {
    "three-voters": dict(voters=3, spares=2, faults=Faults()),
    "five-voters": dict(voters=5, spares=1, faults=Faults(compact_every=15)),
    "chaos": dict(voters=5, spares=0, faults=Faults(
        drop=0.1, crash=0.02, restart=0.1, partition=0.02, heal=0.05, max_delay=8, propose=0.5,
        crash_mid_ready=0.01, compact_every=50)),
}


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


@pytest.mark.parametrize("seed", range(SEEDS))
@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_safety_and_liveness_under_faults(profile, seed):
    sim = Simulation(seed * 7919 + len(profile), **PROFILES[profile])
    sim.run(STEPS)
    sim.settle()
    assert sim.stats["commits"] > 50, sim.stats
    assert sim.stats["elections"] >= 1


def test_the_simulation_exercises_every_fault_and_feature():
    totals: dict[str, int] = {}
    for seed in range(4):
        sim = Simulation(seed, voters=3, spares=2, faults=Faults(config_change=0.01))
        sim.run(STEPS)
        sim.settle()
        for k, v in sim.stats.items():
            totals[k] = totals.get(k, 0) + v
    for key in ("crashes", "dropped", "snapshots_installed", "reads", "config_changes"):
        assert totals[key] > 0, f"no {key} happened: {totals}"
    assert totals["elections"] > 8


def test_a_seed_reproduces_exactly():
    a, b = Simulation(42), Simulation(42)
    a.run(500)
    b.run(500)
    assert a.stats == b.stats and a.committed == b.committed


# ---------------------------------------------------------------- the checker catches broken cores
# Election churn (no pre-vote, no check-quorum, tight timeouts) makes the
# dangerous interleavings frequent, so a broken core fails within a few seeds.
# (The Figure 8 rule has its own named scenario in test_raft_core.py.)

CHURN = RaftConfig(heartbeat_ticks=2, election_ticks_min=6, election_ticks_max=8, max_append_entries=1,
                   max_inflight=2, pre_vote=False, check_quorum=False)
CHURN_FAULTS = Faults(drop=0.1, crash=0.03, restart=0.2, partition=0.02, heal=0.1, max_delay=4, propose=0.5,
                      hint_on_crash=0.0, read=0)


def _violation(monkeypatch, core_cls) -> str:
    monkeypatch.setattr(sim_module, "RaftCore", core_cls)
    for seed in range(3):
        sim = Simulation(seed, voters=5, spares=0, faults=CHURN_FAULTS, config=CHURN)
        try:
            sim.run(STEPS)
        except SafetyViolation as exc:
            return str(exc)
    pytest.fail("the checker missed a broken Raft core")


def test_checker_catches_a_second_vote_in_one_term(monkeypatch):
    class VotesTwice(RaftCore):
        def _handle_vote_request(self, m):
            self.vote, self.leader = None, None
            super()._handle_vote_request(m)

    assert "two leaders in term" in _violation(monkeypatch, VotesTwice)


def test_checker_catches_votes_for_stale_logs(monkeypatch):
    monkeypatch.setattr(RaftLog, "is_up_to_date", lambda self, index, term: True)
    assert "lacks committed entry" in _violation(monkeypatch, RaftCore)
