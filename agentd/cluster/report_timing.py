"""The report path's timeouts, derived from `node_down_grace` (docs/cluster.md, "Reports through a voter",
"Timing").

A relayed host's lease is renewed on the leader only by its voter's batches. When that voter stalls (its
leader does not answer, or the voter itself hangs), the host must notice and reach the leader directly
before the leader marks it down. The longest a relayed host's lease can go unrenewed because of its voter
(`RelayTimings.gap`) is, in the worst case:

- the voter's last answered batch renewed the lease; its next batch waits up to `renew` (+ `COALESCE`) and
  its answer up to `reply_timeout`, so after `healthy` = renew + COALESCE + reply_timeout without an
  answer the voter stops serving hosts;
- the host's next message comes within its report interval (`HOST_INTERVAL` + COALESCE) and is refused,
  or, when the voter itself hangs, is given up after the host's own `host_timeout`;
- the host then opens a stream to another voter at once, or to the leader after a random delay of at most
  `jitter` (once per departure: a stalled leader's voters send all their hosts away together, and
  thousands of them reaching the leader in the same instant starved it), whose first message renews the
  lease (COALESCE).

    gap = healthy + HOST_INTERVAL + 2 × COALESCE + host_timeout + jitter   must be ≤ 0.8 × node_down_grace

(the last fifth of the grace covers the leader's own delays in taking that first message). `renew` is
min(1 s, grace/12), `host_timeout` min(5 s, grace/6), `live` min(3 s, grace/2), `reply_timeout` takes
90 % of what the budget leaves before the jitter, at most 10 s, and `jitter` 90 % of what is left then, at
most 5 s. With the default grace of 30 s: renew 1 s, reply_timeout 10 s, healthy 11.05 s, live 3 s,
host_timeout 5 s, jitter 5 s, gap 22.15 s ≤ 24 s. With a grace of 3 s (the smallest the tests use): renew
0.25 s, reply_timeout 0.45 s, healthy 0.75 s, live 1.5 s, host_timeout 0.5 s, jitter 0.045 s, gap
2.395 s ≤ 2.4 s: a short grace leaves no room to spread a departure. The rule holds for every grace from
2.5 s up; `agentd.config` refuses a shorter one. The rule budgets one `host_timeout`: a host whose second
voter hangs as well, after its first, may go one more `host_timeout` unheard.

Pure: no I/O, nothing imported, so the settings' validation can use it.
"""

from __future__ import annotations

from dataclasses import dataclass

HOST_INTERVAL = 1.0  # seconds between a host's messages (agentd.agent.reporter.REPORT_INTERVAL)
COALESCE = 0.05  # seconds a change waits for others to share its batch (the relay) or report (the host)
FORGET = 60.0  # a host silent this long is forgotten by its voter (memory only: no lease depends on it)
GAP_SHARE = 0.8  # of node_down_grace: the most a relayed host's lease may go unrenewed because of its voter
JITTER_MAX = 5.0  # seconds: the longest a host that leaves its voter waits first (RelayTimings.jitter)


@dataclass(frozen=True)
class RelayTimings:
    grace: float  # node_down_grace
    renew: float  # between a voter's batches when nothing changed: the lease summary (and its own liveness)
    reply_timeout: float  # for the leader's answer to one batch
    live: float  # a host heard within this long is vouched for in the lease summary
    host_timeout: float  # a host's wait for the answer to one message of its report stream
    jitter: float  # a host that leaves its voter waits a random delay up to this long (once per departure)

    @classmethod
    def for_grace(cls, grace: float) -> RelayTimings:
        if not grace > 0:
            raise ValueError(f"node_down_grace ({grace:g}s) must be positive")
        # A host's wait on its voter or leader: long enough to ride out a starved event loop (a host that
        # gives up goes to the leader with a full report), short enough to leave a hung voter in time.
        renew, host_timeout = min(1.0, grace / 12), min(5.0, grace / 6)
        # The leader's answer gets 90 % of what the budget leaves (at most 10 s): under CPU starvation a
        # leader answers late, and a voter that gives up on it sends its hosts to that same leader, each with
        # a full report.
        spare = GAP_SHARE * grace - (HOST_INTERVAL + 3 * COALESCE) - renew - host_timeout
        reply_timeout = max(0.1, min(10.0, 0.9 * spare))
        # What the rule leaves then spreads a departure: 90 % of it, so that a host that waits its longest
        # still renews its lease within GAP_SHARE of the grace; never below 0 (check() refuses such a grace).
        jitter = max(0.0, min(JITTER_MAX, 0.9 * (spare - reply_timeout)))
        return cls(grace=grace, renew=renew, reply_timeout=reply_timeout, live=min(3.0, grace / 2),
                   host_timeout=host_timeout, jitter=jitter)

    @property
    def healthy(self) -> float:
        """A voter serves hosts while the leader answered its last batch at most this long ago."""
        return self.renew + COALESCE + self.reply_timeout

    @property
    def gap(self) -> float:
        """The longest a relayed host's lease goes unrenewed when its voter stalls (see the module's rule)."""
        return self.healthy + HOST_INTERVAL + 2 * COALESCE + self.host_timeout + self.jitter

    def check(self) -> None:
        """Raise ValueError when this grace is too short for a host to leave a stalled voter in time."""
        if not self.gap <= GAP_SHARE * self.grace:
            raise ValueError(
                f"node_down_grace ({self.grace:g}s) is too short for reports through a voter: a host whose "
                f"voter stalls may go {self.gap:.2f}s unheard before it reaches the leader directly, which "
                f"must be at most {GAP_SHARE:g} × node_down_grace; use at least 2.5s (docs/cluster.md)")


DEFAULT = RelayTimings.for_grace(30.0)
