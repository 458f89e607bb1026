"""The process state machine: every legal edge, every illegal one refused, restart counting."""

from __future__ import annotations

import itertools

import pytest

from agentd.runtime.states import EDGES, RESTART_EDGES, Event, IllegalTransition, ProcState, State, transition

ALL = list(State)


@pytest.mark.parametrize(("old", "new"), sorted(EDGES, key=lambda e: (e[0].value, e[1].value)),
                         ids=lambda s: s.value)
def test_each_legal_edge_moves_and_emits_one_event(old, new):
    cur = ProcState(key="inst-r0-g1/main", state=old, reason="before", since=1.0, restarts=2)
    nxt, event = transition(cur, new, "because", now=5.0)
    assert (nxt.state, nxt.reason, nxt.since, nxt.key) == (new, "because", 5.0, cur.key)
    restarted = (old, new) in RESTART_EDGES
    assert nxt.restarts == 2 + restarted
    assert event == Event(key=cur.key, old=old, new=new, reason="because", at=5.0, restarts=nxt.restarts)
    assert event.sentence == f"inst-r0-g1/main: {old} -> {new}: because"
    assert cur.state is old  # values are never mutated


ILLEGAL = [(a, b) for a, b in itertools.product(ALL, ALL) if (a, b) not in EDGES]


@pytest.mark.parametrize(("old", "new"), ILLEGAL, ids=lambda s: s.value)
def test_every_other_edge_is_refused(old, new):
    with pytest.raises(IllegalTransition, match=f"{old} -> {new} is not a legal transition"):
        transition(ProcState(key="k", state=old), new, "x", now=0.0)


def test_the_table_covers_the_issue_lifecycle():
    # PENDING -> STARTING -> RUNNING -> BACKOFF -> ... -> FATAL, and STOPPING -> STOPPED.
    path = [State.PENDING, State.STARTING, State.RUNNING, State.BACKOFF, State.PENDING, State.STARTING,
            State.FATAL, State.PENDING, State.STARTING, State.RUNNING, State.STOPPING, State.STOPPED]
    ps = ProcState(key="k")
    events = []
    for i, s in enumerate(path[1:]):
        ps, e = transition(ps, s, f"step {i}", now=float(i))
        events.append(e)
    assert [e.new for e in events] == path[1:]
    assert ps.restarts == 1  # BACKOFF -> PENDING; the explicit FATAL -> PENDING retry is not a crash restart


def test_nothing_but_stop_leaves_stopping_and_stopped_only_restarts():
    assert {b for a, b in EDGES if a is State.STOPPING} == {State.STOPPED}
    assert {b for a, b in EDGES if a is State.STOPPED} == {State.PENDING}
    # Every state can reach STOPPED (a delete always completes).
    reach = {State.STOPPED}
    changed = True
    while changed:
        changed = False
        for a, b in EDGES:
            if b in reach and a not in reach:
                reach.add(a)
                changed = True
    assert reach == set(State)
