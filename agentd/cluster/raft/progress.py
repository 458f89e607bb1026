"""What the leader knows about one follower's log (etcd-raft's Progress).

PROBE sends one append at a time until the follower's position is found,
REPLICATE pipelines up to `max_inflight` appends, SNAPSHOT waits for a
snapshot transfer to finish. Keeping the three apart is what lets a leader
back up over a diverged follower cheaply and still stream to healthy ones.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field


class ProgressState(enum.Enum):
    PROBE = "probe"
    REPLICATE = "replicate"
    SNAPSHOT = "snapshot"


@dataclass
class Progress:
    match: int = 0
    next: int = 1
    state: ProgressState = ProgressState.PROBE
    paused: bool = False  # PROBE: an append is out, wait for its answer (or a heartbeat answer)
    pending_snapshot: int = 0
    snapshot_elapsed: int = 0
    recent_active: bool = False  # answered since the last round of election_ticks_min (the leader's seat decisions)
    # Check-quorum judges a peer only on what the leader sent it: `awaiting` is set by a send, and
    # `silent_ticks` counts the leader's ticks since the oldest message it has not answered yet.
    awaiting: bool = False
    silent_ticks: int = 0
    acked_seq: int = 0  # highest read-index round it confirmed
    inflight: deque[int] = field(default_factory=deque)  # last index of each unacknowledged append

    def become_probe(self) -> None:
        if self.state == ProgressState.SNAPSHOT:
            self.next = max(self.match + 1, self.pending_snapshot + 1)
        else:
            self.next = self.match + 1
        self.state = ProgressState.PROBE
        self.paused = False
        self.pending_snapshot = 0
        self.inflight.clear()

    def become_replicate(self) -> None:
        self.state = ProgressState.REPLICATE
        self.next = self.match + 1
        self.paused = False
        self.inflight.clear()

    def become_snapshot(self, index: int) -> None:
        self.state = ProgressState.SNAPSHOT
        self.pending_snapshot = index
        self.snapshot_elapsed = 0
        self.inflight.clear()

    def update(self, index: int) -> bool:
        """A success up to `index`; False when it tells us nothing new (a stale reply)."""
        self.paused = False
        while self.inflight and self.inflight[0] <= index:
            self.inflight.popleft()
        if index <= self.match:
            return False
        self.match = index
        self.next = max(self.next, index + 1)
        return True

    def is_paused(self, max_inflight: int) -> bool:
        if self.state == ProgressState.PROBE:
            return self.paused
        if self.state == ProgressState.REPLICATE:
            return len(self.inflight) >= max_inflight
        return True
