"""Restart delays: capped exponential with jitter, reset after a stable run.

A model server that crashes on load would otherwise be restarted in a tight
loop, hammering the GPU driver and the log; one that crashed once after a day
of service should come back at once. Jitter keeps the replicas of a
deployment (or every server on a host after a driver hiccup) from restarting
in lockstep. The random source and the clock are injected so tests are exact.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BackoffPolicy:
    initial: float = 1.0  # seconds before the first restart
    maximum: float = 300.0  # cap: 5 minutes
    factor: float = 2.0
    jitter: float = 0.2  # each delay is scaled by a uniform factor in [1 - jitter, 1 + jitter]
    stable_after: float = 60.0  # a run at least this long resets the delay to `initial`

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError("backoff needs 0 < initial <= maximum")
        if self.factor < 1 or not 0 <= self.jitter < 1 or self.stable_after < 0:
            raise ValueError("backoff needs factor >= 1, 0 <= jitter < 1 and stable_after >= 0")

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Delay before restart number `attempt` (0-based), always within [initial, maximum]."""
        raw = self.initial * self.factor ** min(attempt, 64)
        jittered = min(raw, self.maximum) * rng.uniform(1 - self.jitter, 1 + self.jitter)
        return max(self.initial, min(self.maximum, jittered))


@dataclass
class Backoff:
    """The restart history of one process: which attempt comes next, and when its last run began."""

    policy: BackoffPolicy = field(default_factory=BackoffPolicy)
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0
    run_started: float | None = None

    def started(self, now: float) -> None:
        self.run_started = now

    def next_delay(self, now: float) -> float:
        """The delay before the next start; a stable last run starts the sequence over."""
        if self.run_started is not None and now - self.run_started >= self.policy.stable_after:
            self.attempt = 0
        self.run_started = None
        d = self.policy.delay(self.attempt, self.rng)
        self.attempt += 1
        return d

    def reset(self) -> None:
        self.attempt = 0
        self.run_started = None
