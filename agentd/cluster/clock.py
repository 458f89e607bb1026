"""The cluster's clock: each agent's wall clock, corrected to the median of the members' clocks.

Key and join-token expiry are absolute times: the leader stamps a record with
its clock (`created_at`, `expires_at`), and every agent checks it against its
own. So one host with a wrong clock moved every key's lifetime: with the
leader a day ahead, a 1-minute key lived a day on the other agents; with a
follower behind, expired keys kept working there (issue 14).

Here every agent reports its wall clock to the leader with each report (gRPC
metadata on Agent/Report, once a second). The leader takes the median of the
offsets it saw in the last `FRESH` seconds, its own (0) included: with three
or more members, one host's clock, the leader's included, cannot move the
median. The leader answers each report with that median ("cluster time") and
uses it itself; each agent then reads time as its own clock plus the last
correction it was told. Everything time-stamped uses `now()`: key and token
creation, token consumption, certificate revocation, and verification on every
request. So with one host's clock off by any amount, every agent's `now()`
stays within the report delay and `MAX_ERROR` of the others'.

An agent with no fresh answer (partitioned, no leader, a single member) uses
its own clock; once its last correction is older than `STALE`, it falls back
to its raw clock, and one whose raw clock is then off has the error of that
clock. With two members the median is the mean of both clocks: each is off by
half their difference. See docs/security.md, "Time".
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable

CLOCK_METADATA = "x-agentd-wall-time"  # a reporter's wall clock, seconds since the epoch
CLUSTER_TIME_METADATA = "x-agentd-cluster-time"  # the leader's answer: the members' median clock
FRESH = 10.0  # seconds a reported offset counts for the median
STALE = 60.0  # seconds an agent keeps using the last correction it was told
MAX_ERROR = 1.0  # a report's network delay bounds the error of one observation; documented as 1 s
# Seconds the leader reuses the median it took: every report asks for it, and at 2,048 reporters taking it
# cost 0.24 ms a report (issue 16). A new reporter, or a change of members, takes it again at once.
MEDIAN_EVERY = 1.0


class ClusterClock:
    def __init__(self, wall: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic):
        self._wall = wall
        self._mono = monotonic
        self._offsets: dict[str, tuple[float, float]] = {}  # node -> (their clock - ours, when seen: monotonic)
        self._correction: tuple[float, float] | None = None  # (seconds to add, when told: monotonic)
        self.leading = False
        self.members = 3  # Raft members, this one included (the daemon keeps it current)
        self._median: tuple[tuple, float, float | None] | None = None  # (what it depends on, when, the value)

    # ------------------------------------------------------------ reading

    def now(self) -> float:
        return self._wall() + self.correction()

    def correction(self) -> float:
        """Seconds to add to this host's clock."""
        if self.leading:
            return self._leader_correction() or 0.0
        if self._correction is not None and self._mono() - self._correction[1] <= STALE:
            return self._correction[0]
        return 0.0

    def _leader_correction(self) -> float | None:
        """The median of the members' fresh clocks, once the leader has heard enough of them (all the others,
        or two). Until then (just elected, reports on their way) the correction it was told as a follower, so
        a newly elected leader with a wrong clock does not stamp with it; None when it knows neither.
        Taken again after MEDIAN_EVERY seconds, or at once when a reporter or the members changed."""
        now = self._mono()
        key = (len(self._offsets), self.members, self._correction)
        cached = self._median
        if cached is not None and cached[0] == key and 0.0 <= now - cached[1] < MEDIAN_EVERY:
            return cached[2]
        value = self._take_median()
        self._median = (key, now, value)
        return value

    def _take_median(self) -> float | None:
        fresh = self._fresh()
        if len(fresh) >= min(2, max(self.members - 1, 0)):
            return statistics.median([0.0, *fresh])
        if self._correction is not None and self._mono() - self._correction[1] <= STALE:
            return self._correction[0]
        return None

    def _fresh(self) -> list[float]:
        cutoff = self._mono() - FRESH
        return [off for off, seen in self._offsets.values() if seen >= cutoff]

    # ------------------------------------------------------------ the leader

    def observe(self, node: str, reported: float) -> None:
        """A report from `node` said its clock read `reported` (a moment ago)."""
        if reported == reported and abs(reported) != float("inf"):  # not NaN or inf
            self._offsets[node] = (reported - self._wall(), self._mono())

    def on_report(self, node: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> tuple[tuple[str, str], ...]:
        """Leader side of Agent/Report: note the reporter's clock; the trailing metadata to answer with."""
        for k, v in metadata or ():
            if k == CLOCK_METADATA:
                try:
                    self.observe(node, float(v))
                except (TypeError, ValueError):
                    pass
        correction = self._leader_correction()
        if correction is None:
            return ()  # not enough clocks heard yet: the reporter keeps what it has
        return ((CLUSTER_TIME_METADATA, f"{self._wall() + correction:.6f}"),)

    def forget(self, keep: Iterable[str]) -> None:
        keep = set(keep)
        for node in [n for n in self._offsets if n not in keep]:
            del self._offsets[node]

    # ------------------------------------------------------------ a reporter

    def report_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((CLOCK_METADATA, f"{self._wall():.6f}"),)

    def on_reply(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> None:
        """Reporter side: the leader's answer gives the cluster time; remember the correction to ours."""
        for k, v in metadata or ():
            if k == CLUSTER_TIME_METADATA:
                try:
                    t = float(v)
                except (TypeError, ValueError):
                    return
                if t == t and abs(t) != float("inf"):
                    self._correction = (t - self._wall(), self._mono())
