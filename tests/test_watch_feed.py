"""A voter's watch feed over real gRPC on loopback (agentd/cluster/raft/watch.py).

The feed serialises each committed entry once and every stream sends those
bytes; the keepalive is one timer for the feed, not one per stream. A real
Watcher on the other end of a real stream applies what it gets, exactly once
and in order, whatever shape the bytes went out in.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc

from agentd.cluster.raft.types import Entry, EntryKind, Member
from agentd.cluster.raft.watch import Watcher, WatchFeed, encode_event
from agentd.v1 import raft_pb2 as pb


@dataclass
class FakeVoter:
    leader_id: str | None = "v1"
    leader_address: str | None = "127.0.0.1:1"
    term: int = 3
    commit_index: int = 0
    last_applied: int = 0
    members: dict[str, Member] = field(default_factory=lambda: {"v1": Member("v1", "127.0.0.1:1", True)})


@dataclass
class Log:
    """A state machine that records what it applied."""

    last_index: int = 0
    last_term: int = 0
    applied: list[bytes] = field(default_factory=list)

    def apply(self, index: int, term: int, command: bytes) -> None:
        self.applied.append(command)
        self.last_index, self.last_term = index, term

    def snapshot(self) -> bytes:
        return b"|".join(self.applied)

    def restore(self, data: bytes) -> None:
        self.applied = data.split(b"|") if data else []


def commit(feed: WatchFeed, voter: FakeVoter, sm: Log, data: bytes) -> None:
    index = voter.last_applied + 1
    sm.apply(index, voter.term, data)
    voter.last_applied = voter.commit_index = index
    feed.applied(Entry(index, voter.term, EntryKind.NORMAL, data))


async def test_every_stream_sends_the_same_bytes_for_an_entry():
    feed, voter, sm = WatchFeed(), FakeVoter(), Log()
    commit(feed, voter, sm, b"a")
    req = pb.RaftWatchRequest(node_id="w", from_index=1)
    streams = [feed.serve(req, voter, sm) for _ in range(3)]
    first = [await s.__anext__() for s in streams]
    assert all(isinstance(x, bytes) for x in first)
    assert first[0] is first[1] is first[2]  # encoded once
    ev = pb.RaftWatchEvent.FromString(first[0])
    assert (ev.entry.index, ev.entry.data) == (1, b"a")
    leaders = [await s.__anext__() for s in streams]
    assert leaders[0] is leaders[1] is leaders[2]
    assert pb.RaftWatchEvent.FromString(leaders[0]).leader.leader_id == "v1"
    assert feed.streams == 3
    for s in streams:
        await s.aclose()
    assert feed.streams == 0
    assert encode_event(pb.RaftWatchEvent(leader=pb.RaftWatchLeader(term=2))) == \
        pb.RaftWatchEvent(leader=pb.RaftWatchLeader(term=2)).SerializeToString()


async def test_new_watchers_share_one_snapshot_and_get_the_entries_after_it():
    """Watchers join in waves, each join an entry: one snapshot serves every watcher that starts within
    SNAPSHOT_REUSE seconds (each then gets the entries after it), not one snapshot per watcher."""
    from agentd.cluster.raft.watch import SNAPSHOT_REUSE

    feed, voter, sm = WatchFeed(), FakeVoter(), Log()
    calls = []
    snapshot = sm.snapshot
    sm.snapshot = lambda: calls.append(1) or snapshot()  # type: ignore[method-assign]
    now = [100.0]
    commit(feed, voter, sm, b"a")
    new = pb.RaftWatchRequest(node_id="w", from_index=0)
    a, b = feed.serve(new, voter, sm, lambda: now[0]), feed.serve(new, voter, sm, lambda: now[0])
    first, second = await a.__anext__(), await b.__anext__()
    assert first is second and len(calls) == 1
    assert pb.RaftWatchEvent.FromString(first).snapshot.index == 1
    commit(feed, voter, sm, b"b")
    c = feed.serve(new, voter, sm, lambda: now[0])
    assert await c.__anext__() is first  # the same snapshot, then the entry after it
    assert pb.RaftWatchEvent.FromString(await c.__anext__()).entry.data == b"b"
    now[0] += SNAPSHOT_REUSE  # later: a fresh one
    d = feed.serve(new, voter, sm, lambda: now[0])
    ev = pb.RaftWatchEvent.FromString(await d.__anext__())
    assert (ev.snapshot.index, ev.snapshot.data, len(calls)) == (2, b"a|b", 2)
    for s in (a, b, c, d):
        await s.aclose()


async def test_one_beat_wakes_every_idle_stream_for_its_keepalive():
    feed, voter, sm = WatchFeed(beat=0.05), FakeVoter(), Log()
    commit(feed, voter, sm, b"a")
    req = pb.RaftWatchRequest(node_id="w", from_index=2)  # nothing to send but the leader
    streams = [feed.serve(req, voter, sm) for _ in range(50)]
    for s in streams:
        assert pb.RaftWatchEvent.FromString(await s.__anext__()).WhichOneof("body") == "leader"
    # Idle: the next event of each is the keepalive, after a beat of the feed's single timer.
    kept = await asyncio.wait_for(asyncio.gather(*(s.__anext__() for s in streams)), 5)
    assert all(pb.RaftWatchEvent.FromString(k).WhichOneof("body") == "leader" for k in kept)
    assert feed.beats >= 1
    assert len([t for t in asyncio.all_tasks() if t.get_coro().__name__ == "_beating"]) == 1
    for s in streams:
        await s.aclose()
    await asyncio.sleep(0.2)
    assert feed._beat_task is None  # no streams, no timer


async def test_a_watcher_applies_the_shared_bytes_once_and_in_order_over_real_grpc():
    feed, voter, sm = WatchFeed(), FakeVoter(), Log()
    for x in (b"a", b"b"):
        commit(feed, voter, sm, x)

    async def on_watch(req, context):
        async for ev in feed.serve(req, voter, sm):
            yield ev

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("agentd.v1.Raft", {
        "Watch": grpc.unary_stream_rpc_method_handler(on_watch, request_deserializer=pb.RaftWatchRequest.FromString,
                                                      response_serializer=encode_event)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    watchers = [Watcher(f"w{i}", "", Log(), [address], grpc.aio.insecure_channel) for i in range(2)]
    tasks = [asyncio.create_task(w.run()) for w in watchers]
    try:
        async def until(n: int) -> None:
            while any(w.last_applied < n for w in watchers):
                await asyncio.sleep(0.01)
        await asyncio.wait_for(until(2), 10)
        for x in (b"c", b"d", b"e"):
            commit(feed, voter, sm, x)
        await asyncio.wait_for(until(5), 10)
        # The first came from a snapshot of a and b, then c, d, e one by one.
        assert [w.sm.applied for w in watchers] == [[b"a", b"b", b"c", b"d", b"e"]] * 2
        assert all(w.leader_id == "v1" and w.term == 3 for w in watchers)
    finally:
        for t in tasks:
            t.cancel()
        for w in watchers:
            await w.close()
        await server.stop(None)
