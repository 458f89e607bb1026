"""benchmarks/fleet.py's simulated watchers share one ClusterState per process (SharedLog): what each host's
watcher does stays its own. Over real gRPC on loopback, real Watchers on a real WatchFeed: every committed
entry is applied once per process, every watcher still reaches every index, a host's spawn time is when its
own watcher applied the entry that assigns it, a late watcher's snapshot is restored only when it is ahead,
and a divergent entry is counted."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import grpc

from agentd.cluster.raft.types import Entry, EntryKind, Member
from agentd.cluster.raft.watch import WatchFeed, encode_event
from agentd.cluster.state import ClusterState, delete_command, deploy_command
from agentd.testing.statefill import assignment, spec
from agentd.v1 import raft_pb2 as pb


def _fleet():
    path = Path(__file__).parent.parent / "benchmarks" / "fleet.py"
    mod_spec = importlib.util.spec_from_file_location("agentd_bench_fleet", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


class Voter:
    leader_id = "v1"
    leader_address = "127.0.0.1:1"
    term = 2
    commit_index = 0
    last_applied = 0
    members = {"v1": Member("v1", "127.0.0.1:1", True)}


def commit(feed: WatchFeed, voter: Voter, sm: ClusterState, data: bytes) -> None:
    index = voter.last_applied + 1
    sm.apply(index, voter.term, data)
    voter.last_applied = voter.commit_index = index
    feed.applied(Entry(index, voter.term, EntryKind.NORMAL, data))


async def test_simulated_watchers_apply_each_entry_once_per_process_and_time_their_own_assignment():
    fleet = _fleet()
    feed, voter, sm = WatchFeed(), Voter(), ClusterState()
    commit(feed, voter, sm, deploy_command(spec("a"), [assignment("a", host="h0")]))

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
    Watcher = fleet._watcher_class()
    shared, seen = fleet.SharedLog(), {}
    shared.targets.update({"h1", "h2"})

    def watcher(name: str):
        return Watcher(name, "", fleet.HostState(name, shared, seen), [address], grpc.aio.insecure_channel)

    watchers = [watcher(f"h{i}") for i in range(3)]
    tasks = [asyncio.create_task(w.run()) for w in watchers]

    async def until(ws, n: int) -> None:
        async with asyncio.timeout(10):
            while any(w.last_applied < n for w in ws):
                await asyncio.sleep(0.01)
    try:
        await until(watchers, 1)  # each from the snapshot: restored into the shared state once
        assert shared.state.deployment("a") is not None and shared.applies == 0
        commit(feed, voter, sm, deploy_command(spec("b"), [assignment("b", host="h1")]))
        commit(feed, voter, sm, deploy_command(spec("c"), [assignment("c", host="h2")]))
        commit(feed, voter, sm, delete_command("a"))
        await until(watchers, 4)
        assert shared.applies == 3  # three entries, three watchers: applied once each
        assert shared.state.deployment("a") is None and sm.snapshot() == shared.state.snapshot()
        assert sorted(seen) == ["h1", "h2"] and list(seen["h1"]) == ["b"] and list(seen["h2"]) == ["c"]
        assert [w.sm.last_index for w in watchers] == [4, 4, 4]
        assert (shared.divergent, sum(w.repeats for w in watchers), sum(w.gaps for w in watchers)) == (0, 0, 0)

        late = watcher("h3")  # joins later: a snapshot at 4, not newer than the shared state, is not restored
        tasks.append(asyncio.create_task(late.run()))
        await until([late], 4)
        commit(feed, voter, sm, deploy_command(spec("d"), [assignment("d", host="h3")]))
        await until([*watchers, late], 5)
        assert shared.applies == 4 and "h3" not in seen  # h3 is not a timed host

        # Another host's watcher that delivered different bytes at an index is counted, not applied.
        fleet.HostState("h9", shared, seen).apply(5, voter.term, b'{"op": "something else"}')
        assert shared.divergent == 1 and shared.applies == 4
    finally:
        for t in tasks:
            t.cancel()
        for w in [*watchers]:
            await w.close()
        await server.stop(None)
