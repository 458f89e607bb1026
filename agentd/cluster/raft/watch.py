"""Watchers: hosts that follow the committed state without holding the Raft log (docs/cluster.md).

Only voters (and a learner or two) are Raft members. Every other host is a
*watcher*: it keeps its copy of the replicated state from a `Raft/Watch` stream
served by any voter, not only the leader, so the leader's cost does not grow
with AppendEntries to every host.

- The voter's side is `WatchFeed`: the committed entries it applied lately
  (a bounded window), and a stream per watcher: a snapshot of the state machine
  when the watcher is new or asks for an index the window no longer holds, then
  every committed entry in order, and the leader's identity when it changes
  (a new leader's first entry wakes the stream) and every 10 s. Each entry is
  serialised once, when the first stream sends it, and every stream sends those
  same bytes (`encode_event` is the method's serializer); the 10 s keepalive is
  one timer for the whole feed that wakes every stream, not a timer per stream
  per wait (at 2,048 watchers both were most of a voter's work).
- The watcher's side is `Watcher`: it applies what the stream carries to its
  state machine, exactly once and in order (an entry at or below what it applied
  is skipped, a gap makes it reconnect and ask again), and when its voter goes
  away it asks the next one for the entry after its last applied one.

Only committed entries are ever streamed (a voter applies nothing else), so the
fencing rules of the state machine hold for watchers as for voters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol

import grpc

from agentd.cluster.raft.storage import RaftStorageError
from agentd.cluster.raft.types import Entry, EntryKind, Member, Membership
from agentd.errors import UpgradeRequired
from agentd.logs import fields
from agentd.security.auth import admitted_metadata
from agentd.v1 import raft_pb2 as pb
from agentd.v1 import raft_pb2_grpc

log = logging.getLogger(__name__)

WATCHER_MARKER = "watcher.json"  # in the Raft directory of a watcher: its cluster, and voters to ask first
FEED_KEEP = 4096  # committed entries a voter keeps for watchers that resume
# Seconds between leader events on an idle stream: a keepalive (a change of leader or term is sent at once).
# At 2,048 watchers a one-second beat was most of the voters' work.
LEADER_EVERY = 10.0
SNAPSHOT_REUSE = 2.0  # seconds a voter serves new watchers one snapshot (and the entries after it)
RETRY_MAX = 3.0  # seconds at most between rounds of a watcher that no voter would serve


class Applier(Protocol):
    last_index: int
    last_term: int

    def apply(self, index: int, term: int, command: bytes) -> Any: ...
    def snapshot(self) -> bytes: ...
    def restore(self, data: bytes) -> None: ...


class VoterView(Protocol):
    """What the feed reads of the voter that serves it."""

    @property
    def leader_id(self) -> str | None: ...
    @property
    def leader_address(self) -> str | None: ...
    @property
    def term(self) -> int: ...
    @property
    def commit_index(self) -> int: ...
    @property
    def last_applied(self) -> int: ...
    @property
    def members(self) -> dict[str, Member]: ...


def encode_event(ev: pb.RaftWatchEvent | bytes) -> bytes:
    """The Watch method's response serializer: a feed sends an entry's event as the bytes it encoded once."""
    return ev if isinstance(ev, bytes) else ev.SerializeToString()


class WatchFeed:
    """A voter's recently applied entries, and the streams of the watchers that follow it."""

    def __init__(self, keep: int = FEED_KEEP, beat: float = LEADER_EVERY):
        self.keep = keep
        self.beat = beat
        self._entries: list[Entry] = []
        self._encoded: list[bytes | None] = []  # each entry's RaftWatchEvent, serialised when first sent
        self._changed = asyncio.Event()
        self._beat_task: asyncio.Task | None = None
        self.beats = 0  # keepalive rounds: a stream sends the leader event when this moved since its last
        self.streams = 0

    def applied(self, entry: Entry) -> None:
        if self._entries and entry.index != self._entries[-1].index + 1:
            self._entries, self._encoded = [], []  # not contiguous (a snapshot came in between): start afresh
        self._entries.append(entry)
        self._encoded.append(None)
        if len(self._entries) > 2 * self.keep:
            del self._entries[: len(self._entries) - self.keep]
            del self._encoded[: len(self._encoded) - self.keep]
        self._notify()

    def reset(self) -> None:
        """A snapshot replaced the state: the window no longer continues it."""
        self._entries, self._encoded = [], []
        self._snapshot_cache = None
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _entry(self, index: int) -> Entry | None:
        if not self._entries or not self._entries[0].index <= index <= self._entries[-1].index:
            return None
        return self._entries[index - self._entries[0].index]

    def _event(self, index: int) -> bytes | None:
        """The serialised event of the entry at `index`, the same bytes for every stream; None outside the window."""
        e = self._entry(index)
        if e is None:
            return None
        k = index - self._entries[0].index
        data = self._encoded[k]
        if data is None:
            data = self._encoded[k] = pb.RaftWatchEvent(
                entry=pb.RaftEntry(index=e.index, term=e.term, kind=int(e.kind), data=e.data)).SerializeToString()
        return data

    def _start_beat(self) -> None:
        if self._beat_task is None or self._beat_task.done():
            self._beat_task = asyncio.get_running_loop().create_task(self._beating())

    async def _beating(self) -> None:
        """One timer for every stream: each `beat` seconds, wake them all to send their keepalive."""
        while self.streams:
            await asyncio.sleep(self.beat)
            self.beats += 1
            self._notify()
        self._beat_task = None

    async def serve(self, req: pb.RaftWatchRequest, voter: VoterView, sm: Applier,
                    clock: Callable[[], float] = time.monotonic) -> AsyncIterator[pb.RaftWatchEvent]:
        self.streams += 1
        self._start_beat()
        try:
            next_index = req.from_index
            if next_index == 0 or (next_index <= voter.last_applied and self._entry(next_index) is None):
                data, at = self._snapshot_event(voter, sm, clock)
                next_index = at + 1
                yield data
            sent_leader = None
            sent_beat = -1
            while True:
                changed = self._changed
                while next_index <= voter.last_applied:
                    data = self._event(next_index)
                    if data is None:  # fell out of the window while this watcher was slow: start it over
                        data, at = self._snapshot_event(voter, sm, clock)
                        next_index = at + 1
                        yield data
                        continue
                    yield data
                    next_index += 1
                leader = (voter.leader_id, voter.term)
                if leader != sent_leader or self.beats != sent_beat:
                    yield self._leader_event(voter)
                    sent_leader, sent_beat = leader, self.beats
                # No timeout per wait: the feed's beat wakes every stream for its keepalive.
                await changed.wait()
        finally:
            self.streams -= 1

    def _leader_event(self, voter: VoterView) -> bytes:
        """The leader event as it stands, serialised once for every stream that sends it now."""
        key = (voter.leader_id, voter.leader_address, voter.term, voter.commit_index,
               tuple(voter.members.values()))
        cached = self._leader_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        data = pb.RaftWatchEvent(leader=pb.RaftWatchLeader(
            leader_id=voter.leader_id or "", leader_address=voter.leader_address or "", term=voter.term,
            commit_index=voter.commit_index,
            members=[pb.RaftMember(id=m.id, address=m.address, voter=m.voter) for m in voter.members.values()]
        )).SerializeToString()
        self._leader_cache = (key, data)
        return data

    _leader_cache: tuple[tuple, bytes] | None = None
    _snapshot_cache: tuple[int, float, bytes] | None = None  # (index, when taken, the serialised event)

    def _snapshot_event(self, voter: VoterView, sm: Applier, clock: Callable[[], float]) -> tuple[bytes, int]:
        """A snapshot event and its index, shared by every stream that starts within SNAPSHOT_REUSE seconds
        while the window still holds the entries after it (each stream then sends those entries): watchers
        join in waves, each join an entry, and a snapshot per watcher (the whole state, each time larger) was
        quadratic in the fleet's size - the voters stalled at 1,024 joining watchers."""
        cached = self._snapshot_cache
        now = clock()
        if cached is not None and (cached[0] == voter.last_applied or (
                0.0 <= now - cached[1] < SNAPSHOT_REUSE and self._entry(cached[0] + 1) is not None)):
            return cached[2], cached[0]
        index = voter.last_applied
        data = pb.RaftWatchEvent(snapshot=pb.RaftWatchSnapshot(index=index, term=sm.last_term,
                                                               data=sm.snapshot())).SerializeToString()
        self._snapshot_cache = (index, now, data)
        return data, index


class Watcher:
    """A watcher's loop: follow one voter's Watch stream, move to another when it goes away."""

    def __init__(self, node_id: str, cluster_id: str, sm: Applier, seeds: list[str],
                 open_channel: Callable[[str], grpc.aio.Channel], *,
                 on_leader: Callable[[str | None, int], None] = lambda leader, term: None,
                 retry: float = 0.2):
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.sm = sm
        self.seeds = list(seeds)
        self._open_channel = open_channel
        self._on_leader = on_leader
        self._retry = retry
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.last_applied = sm.last_index
        self.leader_id: str | None = None
        self.leader_address: str | None = None
        self.term = 0
        self.commit_index = 0
        self.members: dict[str, Member] = {}
        self.upgrade_required = ""
        self.source = ""  # the voter it streams from now
        self.busy_voter = ""  # the leader as the join named it, until the stream names one
        self.admitted_index = 0  # what the join reply said (0: joined before this start); named on each Watch
        self.applied_event = asyncio.Event()
        self._delivered = False  # the current round's stream delivered an event

    def candidates(self) -> list[str]:
        """Voters first, each watcher starting at a different one (by its name) so they spread, the leader last
        (it has the most to do); then learners, then seeds."""
        leader_id = self.leader_id or self.busy_voter
        voters = sorted(m.address for m in self.members.values() if m.voter and m.address and m.id != leader_id)
        if voters:
            k = zlib.crc32(self.node_id.encode()) % len(voters)
            voters = voters[k:] + voters[:k]
        leader = self.members.get(leader_id or "")
        if leader is not None and leader.address:
            voters.append(leader.address)
        others = sorted(m.address for m in self.members.values() if not m.voter and m.address)
        out = []
        for a in [*voters, *others, *self.seeds]:
            if a not in out:
                out.append(a)
        return out

    async def run(self) -> None:
        delay = self._retry
        while not self.upgrade_required:
            self._delivered = False
            for address in self.candidates():
                try:
                    await self._follow(address)
                except grpc.aio.AioRpcError as exc:
                    log.info("watch stream ended; trying the next voter",
                             extra=fields(node=self.node_id, voter=address, code=exc.code().name,
                                          error=(exc.details() or "")[:200], last_applied=self.last_applied))
                except _Gap as gap:
                    log.warning("watch stream skipped entries; asking again", extra=fields(
                        node=self.node_id, voter=address, got=gap.index, expected=self.last_applied + 1))
                if self.upgrade_required:
                    return
            self.source = ""
            # Every voter refused or failed: wait, longer each round up to RETRY_MAX (a voter that has not
            # applied this watcher's join yet refuses it; a thousand watchers asking five times a second kept
            # the voters from catching up). A stream that delivered anything starts the wait over.
            delay = self._retry if self._delivered else min(delay * 2, RETRY_MAX)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _follow(self, address: str) -> None:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = self._open_channel(address)
        stub = raft_pb2_grpc.RaftStub(ch)
        req = pb.RaftWatchRequest(node_id=self.node_id, cluster_id=self.cluster_id,
                                  from_index=self.last_applied + 1 if self.last_applied else 0)
        call = stub.Watch(req, metadata=admitted_metadata(self.admitted_index))
        self.source = address
        async for ev in call:
            self._delivered = True
            body = ev.WhichOneof("body")
            if body == "snapshot":
                self._restore(ev.snapshot)
            elif body == "entry":
                self._apply(ev.entry)
            elif body == "leader":
                self._leader(ev.leader)
            if self.upgrade_required:
                call.cancel()
                return

    def _restore(self, s: pb.RaftWatchSnapshot) -> None:
        if s.index <= self.last_applied:
            return  # nothing newer than what it holds
        try:
            self.sm.restore(s.data)
        except UpgradeRequired as exc:
            self._stop(exc)
            return
        self.last_applied = s.index
        self.applied_event.set()

    def _apply(self, e: pb.RaftEntry) -> None:
        if e.index <= self.last_applied:
            return  # a resumed stream may repeat: applied once
        if e.index != self.last_applied + 1:
            raise _Gap(e.index)
        if e.kind == EntryKind.NORMAL:
            try:
                self.sm.apply(e.index, e.term, e.data)
            except UpgradeRequired as exc:
                self._stop(exc)
                return
        elif e.kind == EntryKind.CONFIG:  # who may be streamed from, as soon as it changes
            with contextlib.suppress(ValueError):
                self.members = {m.id: m for m in Membership.decode(e.data).members}
        self.last_applied = e.index
        self.applied_event.set()

    def _leader(self, m: pb.RaftWatchLeader) -> None:
        changed = (m.leader_id or None, m.term) != (self.leader_id, self.term)
        self.leader_id, self.leader_address = m.leader_id or None, m.leader_address or None
        self.term, self.commit_index = m.term, m.commit_index
        if m.members:
            self.members = {x.id: Member(x.id, x.address, x.voter) for x in m.members}
        if changed:
            self._on_leader(self.leader_id, self.term)

    def _stop(self, exc: UpgradeRequired) -> None:
        self.upgrade_required = str(exc)
        log.critical("stopped applying the replicated state: this agent needs an upgrade",
                     extra=fields(node=self.node_id, reason=self.upgrade_required, last_applied=self.last_applied))

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()


class _Gap(Exception):
    def __init__(self, index: int):
        self.index = index
        super().__init__(f"entry {index} after a gap")


def write_watcher_marker(path: Path, cluster_id: str, seeds: list[str]) -> None:
    """Written once a host is told to watch: on restart it watches again instead of joining Raft."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"cluster_id": cluster_id, "seeds": sorted(set(seeds))}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_watcher_marker(path: Path) -> dict[str, Any] | None:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RaftStorageError(f"unreadable ({exc}): delete it and start the agent with --join", where=str(path)) \
            from None
    if not isinstance(raw, dict) or not isinstance(raw.get("cluster_id"), str) or not raw["cluster_id"]:
        raise RaftStorageError("names no cluster: delete it and start the agent with --join", where=str(path))
    return raw
