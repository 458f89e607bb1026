"""The Raft transport's reading of a peer's trouble (agentd/cluster/raft/transport.py), on real gRPC.

A stream the peer stopped reading (its loop stalled, its window full) is a slow peer: the leader probes it
again, but a follower must not take it for its leader's death, which starts an election at once
(`RaftCore.report_leader_lost`). A refused connection is a lost one, and says so.
"""

from __future__ import annotations

import asyncio
import socket

import grpc

from agentd.cluster.raft.transport import SERVICE, GrpcTransport, TransportEvents
from agentd.cluster.raft.types import AppendRequest, Entry
from agentd.v1 import raft_pb2 as pb


def recording_transport(seen: list[tuple[str, str]]) -> GrpcTransport:
    events = TransportEvents(message=lambda m: None, unreachable=lambda p: seen.append(("unreachable", p)),
                             connection_lost=lambda p: seen.append(("lost", p)),
                             snapshot_sent=lambda p, ok: None, join=None, leave=None)
    return GrpcTransport("a", "127.0.0.1:1", events, write_timeout=0.3)


def appends(to: str, n: int) -> list[AppendRequest]:
    entry = Entry(index=1, term=1, data=b"x" * (1 << 20))  # 32 MiB in all: more than any flow-control window
    return [AppendRequest(term=1, sender="a", to=to, prev_index=0, prev_term=0, entries=(entry,), commit=0)
            for _ in range(n)]


async def until(condition, seconds: float = 5.0) -> None:
    """Poll `condition` every 50 ms for up to `seconds` (the assertions after it say what was expected)."""
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)


async def test_a_peer_that_stops_reading_is_unreachable_but_not_lost():
    release = asyncio.Event()

    async def never_reads(request_iterator, context):
        await release.wait()
        return pb.RaftSendReply()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
        "Send": grpc.stream_unary_rpc_method_handler(never_reads,
                                                     response_serializer=pb.RaftSendReply.SerializeToString)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    seen: list[tuple[str, str]] = []
    transport = recording_transport(seen)
    try:
        transport.set_members({"b": f"127.0.0.1:{port}"})
        transport.send(appends("b", 32))
        await until(lambda: bool(seen))
        await asyncio.sleep(0.5)  # a connection_lost would come with or right after the unreachable
        assert seen and set(seen) == {("unreachable", "b")}
    finally:
        release.set()
        await transport.close()
        await server.stop(0)


async def test_a_refused_connection_is_lost():
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    seen: list[tuple[str, str]] = []
    transport = recording_transport(seen)
    try:
        transport.set_members({"c": f"127.0.0.1:{port}"})
        transport.send(appends("c", 1))
        await until(lambda: ("lost", "c") in seen)
        assert ("lost", "c") in seen and ("unreachable", "c") in seen
    finally:
        await transport.close()
