"""Values the Raft core consumes and produces.

Everything here is immutable so the pure core can hand values to the driver,
the storage thread and the transport without defensive copies, and so the
simulator can keep in-flight messages around while the sender mutates on.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass


class EntryKind(enum.IntEnum):
    NORMAL = 0  # a state-machine command
    CONFIG = 1  # a new membership (the full member list, JSON)
    NOOP = 2  # appended by a new leader to commit earlier terms' entries


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre-candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True, slots=True)
class Entry:
    index: int
    term: int
    kind: EntryKind = EntryKind.NORMAL
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class Member:
    id: str
    address: str
    voter: bool = True


@dataclass(frozen=True)
class Membership:
    """One cluster configuration; voters form quorums, learners only follow."""

    members: tuple[Member, ...] = ()

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.members, key=lambda m: m.id))
        if len({m.id for m in ordered}) != len(ordered):
            raise ValueError("duplicate member id in membership")
        object.__setattr__(self, "members", ordered)

    @property
    def voters(self) -> tuple[str, ...]:
        return tuple(m.id for m in self.members if m.voter)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(m.id for m in self.members)

    def get(self, member_id: str) -> Member | None:
        for m in self.members:
            if m.id == member_id:
                return m
        return None

    def is_voter(self, member_id: str) -> bool:
        m = self.get(member_id)
        return m is not None and m.voter

    def with_member(self, member: Member) -> Membership:
        return Membership((*tuple(m for m in self.members if m.id != member.id), member))

    def without(self, member_id: str) -> Membership:
        return Membership(tuple(m for m in self.members if m.id != member_id))

    def encode(self) -> bytes:
        return json.dumps(
            [{"id": m.id, "address": m.address, "voter": m.voter} for m in self.members], separators=(",", ":")
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> Membership:
        """Parse a CONFIG entry; ValueError names what is wrong."""
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"membership is not JSON: {exc}") from None
        if not isinstance(raw, list):
            raise ValueError("membership must be a JSON list")
        members = []
        for item in raw:
            if (
                not isinstance(item, dict)
                or not isinstance(item.get("id"), str)
                or not item["id"]
                or not isinstance(item.get("address", ""), str)
                or not isinstance(item.get("voter", True), bool)
            ):
                raise ValueError(f"bad member {item!r}")
            members.append(Member(item["id"], item.get("address", ""), item.get("voter", True)))
        return cls(tuple(members))


@dataclass(frozen=True, slots=True)
class HardState:
    """What must be on disk before any reply that depends on it."""

    term: int = 0
    vote: str | None = None
    commit: int = 0


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    index: int
    term: int
    membership: Membership


@dataclass(frozen=True, slots=True)
class Snapshot:
    meta: SnapshotMeta
    data: bytes


@dataclass(frozen=True, slots=True)
class SoftState:
    """Volatile view the driver publishes (leadership changes)."""

    role: Role
    leader: str | None
    term: int


@dataclass(frozen=True, slots=True)
class ReadState:
    """A linearizable read may be served once the state machine applied `index`."""

    ctx: int
    index: int


# ---------------------------------------------------------------- messages
# Every message carries the sender's term; the core decides what a stale or a
# newer term means, never the transport.


@dataclass(frozen=True, slots=True)
class VoteRequest:
    term: int
    sender: str
    to: str
    last_index: int
    last_term: int
    pre_vote: bool = False
    transfer: bool = False  # leadership transfer: ignore the leader lease


@dataclass(frozen=True, slots=True)
class VoteResponse:
    term: int
    sender: str
    to: str
    granted: bool
    pre_vote: bool = False


@dataclass(frozen=True, slots=True)
class AppendRequest:
    term: int
    sender: str
    to: str
    prev_index: int
    prev_term: int
    entries: tuple[Entry, ...]
    commit: int


@dataclass(frozen=True, slots=True)
class AppendResponse:
    """`index`: the follower's match on success, the rejected prev_index on failure.

    On failure `hint_index`/`hint_term` let the leader skip a whole term of
    conflicting entries at once, and `last_index` reveals a follower that lost
    its disk (its log is shorter than what it once acknowledged).
    """

    term: int
    sender: str
    to: str
    success: bool
    index: int
    hint_index: int = 0
    hint_term: int = 0
    last_index: int = 0


@dataclass(frozen=True, slots=True)
class Heartbeat:
    term: int
    sender: str
    to: str
    commit: int
    seq: int  # read-index round; echoed so the leader can confirm it still leads


@dataclass(frozen=True, slots=True)
class HeartbeatResponse:
    term: int
    sender: str
    to: str
    seq: int


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    term: int
    sender: str
    to: str
    snapshot: Snapshot


@dataclass(frozen=True, slots=True)
class TimeoutNow:
    """Leadership transfer: the target campaigns at once, skipping pre-vote."""

    term: int
    sender: str
    to: str


Message = (
    VoteRequest
    | VoteResponse
    | AppendRequest
    | AppendResponse
    | Heartbeat
    | HeartbeatResponse
    | SnapshotRequest
    | TimeoutNow
)


@dataclass(frozen=True)
class Ready:
    """One batch of the core's output, in the order the driver must handle it.

    1. persist `hard_state`, `entries` (replacing any stored entry at the same
       or a later index) and `snapshot`, and fsync;
    2. only then send `messages`;
    3. restore the state machine from `snapshot` when `install` is true, then
       apply `committed` in order, then serve `reads` once applied.
    """

    hard_state: HardState | None = None
    entries: tuple[Entry, ...] = ()
    snapshot: Snapshot | None = None
    install: bool = False
    messages: tuple[Message, ...] = ()
    committed: tuple[Entry, ...] = ()
    reads: tuple[ReadState, ...] = ()
    soft_state: SoftState | None = None
    dropped_reads: tuple[int, ...] = ()  # read contexts that can no longer be served here

    @property
    def must_persist(self) -> bool:
        return self.hard_state is not None or bool(self.entries) or self.snapshot is not None


@dataclass(frozen=True)
class ConfigChange:
    """One membership change; the core refuses anything changing more than one voter."""

    op: str  # add_learner | promote | demote | remove | set_address
    member_id: str
    address: str = ""


@dataclass(frozen=True)
class RaftConfig:
    """Timing in ticks and replication limits; the driver maps ticks to seconds."""

    heartbeat_ticks: int = 5
    election_ticks_min: int = 40
    election_ticks_max: int = 60
    max_append_entries: int = 512
    max_append_bytes: int = 1 << 20
    max_inflight: int = 64
    check_quorum: bool = True
    pre_vote: bool = True
    # After the transport reports the leader's connection broke, voters campaign
    # in id order, one slot apart, instead of waiting for a full election timeout.
    fast_failover: bool = True
    failover_slot_ticks: int = 5

    def __post_init__(self) -> None:
        if self.heartbeat_ticks < 1:
            raise ValueError("heartbeat_ticks must be >= 1")
        if not self.heartbeat_ticks < self.election_ticks_min <= self.election_ticks_max:
            raise ValueError("need heartbeat_ticks < election_ticks_min <= election_ticks_max")
        if self.max_inflight < 1 or self.max_append_entries < 1 or self.max_append_bytes < 1:
            raise ValueError("replication limits must be positive")
