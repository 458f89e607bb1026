"""Restart backoff: capped, exponential, jittered, reset after a stable run; deterministic with a seeded rng."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentd.runtime.backoff import Backoff, BackoffPolicy


class FixedRandom(random.Random):
    def __init__(self, u: float):
        super().__init__(0)
        self.u = u

    def uniform(self, a, b):
        return a + (b - a) * self.u


def test_doubles_from_one_second_and_caps_at_five_minutes_without_jitter():
    b = Backoff(BackoffPolicy(jitter=0.0), random.Random(0))
    delays = [b.next_delay(now=0.0) for _ in range(12)]
    assert delays == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]


def test_jitter_spreads_each_delay_within_its_band_and_never_below_initial():
    pol = BackoffPolicy(jitter=0.2)
    assert pol.delay(3, FixedRandom(0.0)) == pytest.approx(8 * 0.8)
    assert pol.delay(3, FixedRandom(1.0)) == pytest.approx(8 * 1.2)
    assert pol.delay(0, FixedRandom(0.0)) == 1.0  # 0.8 s would undercut the floor
    assert pol.delay(20, FixedRandom(1.0)) == 300.0  # 360 s would exceed the cap
    seen = {round(pol.delay(4, random.Random(seed)), 6) for seed in range(50)}
    assert len(seen) > 40  # replicas do not restart in lockstep


def test_stable_run_resets_the_sequence_and_short_runs_do_not():
    b = Backoff(BackoffPolicy(jitter=0.0, stable_after=60), random.Random(0))
    b.started(0.0)
    assert b.next_delay(now=10.0) == 1  # crashed after 10 s
    b.started(11.0)
    assert b.next_delay(now=20.0) == 2  # again quickly: grows
    b.started(22.0)
    assert b.next_delay(now=30.0) == 4
    b.started(34.0)
    assert b.next_delay(now=34.0 + 61.0) == 1  # ran stable for 61 s: starts over
    assert b.attempt == 1


def test_seeded_rng_gives_the_same_delays():
    a = Backoff(BackoffPolicy(), random.Random(7))
    b = Backoff(BackoffPolicy(), random.Random(7))
    assert [a.next_delay(0) for _ in range(8)] == [b.next_delay(0) for _ in range(8)]


@pytest.mark.parametrize("kw", [{"initial": 0}, {"initial": 10, "maximum": 5}, {"factor": 0.5}, {"jitter": 1.0},
                                {"stable_after": -1}])
def test_bad_policies_are_refused(kw):
    with pytest.raises(ValueError):
        BackoffPolicy(**kw)


@given(attempt=st.integers(0, 10_000), seed=st.integers(0, 2**32), jitter=st.floats(0, 0.99),
       initial=st.floats(0.01, 10), cap=st.floats(10, 1000))
def test_every_delay_is_within_initial_and_maximum(attempt, seed, jitter, initial, cap):
    d = BackoffPolicy(initial=initial, maximum=cap, jitter=jitter).delay(attempt, random.Random(seed))
    assert initial <= d <= cap
