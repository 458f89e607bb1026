"""Core messages <-> protobuf, with validation of everything a peer sends.

The core trusts its inputs' shape (indices consecutive, terms ordered), so a
peer's message is checked here, at the edge, and a bad one becomes
InvalidInput naming the field; the transport turns that into
INVALID_ARGUMENT and the core never sees it.
"""

from __future__ import annotations

from collections.abc import Iterator

from agentd.cluster.raft.types import (
    AppendRequest,
    AppendResponse,
    Entry,
    EntryKind,
    Heartbeat,
    HeartbeatResponse,
    Member,
    Membership,
    Message,
    Snapshot,
    SnapshotMeta,
    SnapshotRequest,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)
from agentd.errors import InvalidInput
from agentd.v1 import raft_pb2 as pb

MAX_ID_LEN = 253
MAX_INDEX = (1 << 63) - 1
SNAPSHOT_CHUNK = 512 * 1024


def members_to_pb(membership: Membership) -> list[pb.RaftMember]:
    return [pb.RaftMember(id=m.id, address=m.address, voter=m.voter) for m in membership.members]


def members_from_pb(members, where: str = "members") -> Membership:
    out = []
    for n, m in enumerate(members):
        _check_id(m.id, f"{where}[{n}].id")
        if len(m.address) > 1024:
            raise InvalidInput("address too long", where=f"{where}[{n}].address")
        out.append(Member(m.id, m.address, m.voter))
    try:
        return Membership(tuple(out))
    except ValueError as exc:
        raise InvalidInput(str(exc), where=where) from None


def _check_id(value: str, where: str) -> None:
    if not value or len(value) > MAX_ID_LEN or any(c.isspace() or not c.isprintable() for c in value):
        raise InvalidInput(f"invalid node id {value[:40]!r}", where=where)


def _check_num(value: int, where: str) -> None:
    if value > MAX_INDEX:
        raise InvalidInput(f"{value} is out of range", where=where)


# ---------------------------------------------------------------- encode


def encode(msg: Message, cluster_id: str, sender_address: str = "") -> Iterator[pb.RaftMessage]:
    """One protobuf message per core message; snapshots become several chunks."""
    base = {"cluster_id": cluster_id, "sender": msg.sender, "to": msg.to, "term": msg.term,
            "sender_address": sender_address}
    if isinstance(msg, AppendRequest):
        yield pb.RaftMessage(**base, append_entries=pb.AppendEntries(
            prev_log_index=msg.prev_index, prev_log_term=msg.prev_term, leader_commit=msg.commit,
            entries=[pb.RaftEntry(index=e.index, term=e.term, kind=int(e.kind), data=e.data) for e in msg.entries]))
    elif isinstance(msg, AppendResponse):
        yield pb.RaftMessage(**base, append_entries_response=pb.AppendEntriesResponse(
            success=msg.success, index=msg.index, hint_index=msg.hint_index, hint_term=msg.hint_term,
            last_log_index=msg.last_index))
    elif isinstance(msg, Heartbeat):
        yield pb.RaftMessage(**base, heartbeat=pb.RaftHeartbeat(leader_commit=msg.commit, read_seq=msg.seq))
    elif isinstance(msg, HeartbeatResponse):
        yield pb.RaftMessage(**base, heartbeat_response=pb.RaftHeartbeatResponse(read_seq=msg.seq))
    elif isinstance(msg, VoteRequest):
        yield pb.RaftMessage(**base, request_vote=pb.RequestVote(
            last_log_index=msg.last_index, last_log_term=msg.last_term, pre_vote=msg.pre_vote,
            transfer=msg.transfer))
    elif isinstance(msg, VoteResponse):
        yield pb.RaftMessage(**base, request_vote_response=pb.RequestVoteResponse(
            granted=msg.granted, pre_vote=msg.pre_vote))
    elif isinstance(msg, TimeoutNow):
        yield pb.RaftMessage(**base, timeout_now=pb.TimeoutNow())
    elif isinstance(msg, SnapshotRequest):
        meta, data = msg.snapshot.meta, msg.snapshot.data
        members = members_to_pb(meta.membership)
        offset = 0
        while True:
            chunk = data[offset : offset + SNAPSHOT_CHUNK]
            done = offset + len(chunk) >= len(data)
            yield pb.RaftMessage(**base, install_snapshot=pb.InstallSnapshot(
                last_included_index=meta.index, last_included_term=meta.term, members=members,
                offset=offset, data=chunk, done=done, total_size=len(data)))
            offset += len(chunk)
            if done:
                break
    else:  # pragma: no cover - the union is closed
        raise TypeError(f"cannot encode {type(msg).__name__}")


# ---------------------------------------------------------------- decode


class StreamDecoder:
    """Decodes one peer's stream; reassembles snapshot chunks (bounded by `max_snapshot`)."""

    def __init__(self, max_snapshot: int = 1 << 30) -> None:
        self.max_snapshot = max_snapshot
        self._snap_head: pb.RaftMessage | None = None
        self._snap_parts: list[bytes] = []
        self._snap_size = 0

    def decode(self, m: pb.RaftMessage) -> Message | None:
        """The core message, or None while a snapshot is still arriving. Raises InvalidInput."""
        _check_id(m.sender, "sender")
        _check_id(m.to, "to")
        _check_num(m.term, "term")
        if len(m.sender_address) > 1024:
            raise InvalidInput("address too long", where="sender_address")
        body = m.WhichOneof("body")
        if body is None:
            raise InvalidInput("message has no body", where="body")
        if self._snap_head is not None and body != "install_snapshot":
            raise InvalidInput("snapshot chunks interrupted by another message", where=body)
        t, s, to = m.term, m.sender, m.to
        if body == "append_entries":
            a = m.append_entries
            return AppendRequest(t, s, to, a.prev_log_index, a.prev_log_term, _entries(a, t), a.leader_commit)
        if body == "append_entries_response":
            r = m.append_entries_response
            for name in ("index", "hint_index", "hint_term", "last_log_index"):
                _check_num(getattr(r, name), f"append_entries_response.{name}")
            return AppendResponse(t, s, to, r.success, r.index, r.hint_index, r.hint_term, r.last_log_index)
        if body == "heartbeat":
            _check_num(m.heartbeat.leader_commit, "heartbeat.leader_commit")
            return Heartbeat(t, s, to, m.heartbeat.leader_commit, m.heartbeat.read_seq)
        if body == "heartbeat_response":
            return HeartbeatResponse(t, s, to, m.heartbeat_response.read_seq)
        if body == "request_vote":
            v = m.request_vote
            _check_num(v.last_log_index, "request_vote.last_log_index")
            if v.last_log_term > t:
                raise InvalidInput("last_log_term is newer than the message term", where="request_vote")
            return VoteRequest(t, s, to, v.last_log_index, v.last_log_term, v.pre_vote, v.transfer)
        if body == "request_vote_response":
            return VoteResponse(t, s, to, m.request_vote_response.granted, m.request_vote_response.pre_vote)
        if body == "timeout_now":
            return TimeoutNow(t, s, to)
        return self._snapshot_chunk(m)

    def _snapshot_chunk(self, m: pb.RaftMessage) -> SnapshotRequest | None:
        c = m.install_snapshot
        where = "install_snapshot"
        _check_num(c.last_included_index, f"{where}.last_included_index")
        if c.last_included_term > m.term or c.last_included_index == 0:
            raise InvalidInput("snapshot index/term out of range", where=where)
        if c.total_size > self.max_snapshot:
            raise InvalidInput(f"snapshot of {c.total_size} bytes exceeds the limit of {self.max_snapshot}",
                               where=where)
        head = self._snap_head
        if head is None:
            if c.offset != 0:
                raise InvalidInput(f"snapshot chunk at offset {c.offset} without a first chunk", where=where)
            self._snap_head = head = m
        elif (head.install_snapshot.last_included_index, head.install_snapshot.last_included_term,
              head.term, head.install_snapshot.total_size) != (
                c.last_included_index, c.last_included_term, m.term, c.total_size):
            raise InvalidInput("snapshot chunk belongs to a different snapshot", where=where)
        if c.offset != self._snap_size:
            raise InvalidInput(f"snapshot chunk at offset {c.offset}, expected {self._snap_size}", where=where)
        self._snap_parts.append(c.data)
        self._snap_size += len(c.data)
        if self._snap_size > c.total_size:
            raise InvalidInput("snapshot chunks exceed the announced size", where=where)
        if not c.done:
            return None
        if self._snap_size != c.total_size:
            raise InvalidInput("snapshot ended before its announced size", where=where)
        data = b"".join(self._snap_parts)
        self._snap_head, self._snap_parts, self._snap_size = None, [], 0
        meta = SnapshotMeta(c.last_included_index, c.last_included_term, members_from_pb(c.members, where))
        return SnapshotRequest(m.term, m.sender, m.to, Snapshot(meta, data))


def _entries(a: pb.AppendEntries, term: int) -> tuple[Entry, ...]:
    _check_num(a.prev_log_index, "append_entries.prev_log_index")
    _check_num(a.leader_commit, "append_entries.leader_commit")
    if a.prev_log_term > term:
        raise InvalidInput("prev_log_term is newer than the message term", where="append_entries")
    out = []
    last_term = a.prev_log_term
    for n, e in enumerate(a.entries):
        where = f"append_entries.entries[{n}]"
        if e.index != a.prev_log_index + 1 + n:
            raise InvalidInput(f"index {e.index} is not consecutive (expected {a.prev_log_index + 1 + n})",
                               where=where)
        if e.term < last_term or e.term > term:
            raise InvalidInput(f"term {e.term} out of order", where=where)
        try:
            kind = EntryKind(e.kind)
        except ValueError:
            raise InvalidInput(f"unknown entry kind {e.kind}", where=where) from None
        if kind == EntryKind.CONFIG:
            try:
                Membership.decode(e.data)
            except ValueError as exc:
                raise InvalidInput(str(exc), where=where) from None
        last_term = e.term
        out.append(Entry(e.index, e.term, kind, e.data))
    return tuple(out)
