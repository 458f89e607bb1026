"""A replica a drain replaced keeps answering the requests it holds, then stops (agentd/agent/handoff.py), against a
real HTTP server on loopback standing in for its model server's load path."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from agentd.agent.handoff import IDLE_POLLS, Handoffs
from agentd.cluster.state import ClusterState, deploy_command, promote_command, surge_command
from agentd.runtime.standalone import kill_recorded
from agentd.testing.coordinator_world import spec
from agentd.testing.toy_runtime import make, toy_assignment
from agentd.types import Assignment, Part, PartEndpoint, ReplicaPlan


class LoadServer:
    """Answers GET /load with how busy it is; counts the polls and the keys they carried."""

    def __init__(self) -> None:
        self.busy = 1
        self.polls = 0
        self.keys: set[str] = set()
        self.port = 0
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.polls += 1
        self.keys.add(request.headers.get("Authorization", ""))
        return web.json_response({"busy": self.busy})

    async def start(self) -> LoadServer:
        app = web.Application()
        app.router.add_get("/load", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self


@pytest.fixture
async def server():
    s = await LoadServer().start()
    yield s
    await s.runner.cleanup()


def read(runtime: str, status: int, body: bytes) -> tuple[int, int] | None:
    return (json.loads(body)["busy"], 4) if status == 200 else None


def incarnation(generation: int, host: str, port: int, gpu: int = 0) -> Assignment:
    plan = ReplicaPlan(parts=(Part(host=host, gpus=(gpu,), role="main", layers=4, memory=(1,)),))
    return Assignment(deployment="m", replica=0, generation=generation, term=1, model="/m.gguf", runtime="llamabox",
                      plan=plan, endpoints=(PartEndpoint(host=host, address="127.0.0.1", port=port),),
                      api_key="server-key")


def drained(old: Assignment, new: Assignment) -> ClusterState:
    """The state after a drain promoted `new` over `old`."""
    st = ClusterState()
    st.cluster_format = 2
    assert st.apply(1, 1, deploy_command(spec("m", "/m.gguf"), [old])).ok
    assert st.apply(2, 1, surge_command(new)).ok
    assert st.apply(3, 1, promote_command(new)).ok
    return st


def handoffs(woke: asyncio.Event, timeout: float = 30.0, path: str | None = "/load") -> Handoffs:
    return Handoffs(load_path=lambda runtime: path, read=read, timeout=timeout, wake=woke.set, settle=0.05,
                    period=0.02)


async def test_a_replaced_replica_runs_until_its_server_says_it_is_idle_then_stops(server):
    old, new = incarnation(1, "a", server.port), incarnation(2, "b", 40002)
    st, woke = drained(old, new), asyncio.Event()
    h = handoffs(woke)
    assert h.keep(st, [old], set()) == [old] and h.replaced() == {"m-r0-g1"}
    await asyncio.sleep(0.4)
    assert server.polls >= 3 and not woke.is_set()  # busy: it keeps running
    assert h.keep(st, [old], set()) == [old]
    polls = server.polls
    server.busy = 0
    await asyncio.wait_for(woke.wait(), 5)
    assert server.polls - polls >= IDLE_POLLS  # idle on consecutive polls, not on the first
    assert h.keep(st, [old], set()) == [] and h.replaced() == {"m-r0-g1"}  # until the supervisor stopped it
    assert h.keep(st, [], set()) == [] and h.replaced() == set()
    assert server.keys == {"Bearer server-key"}  # its own key, as the proxy's load poller sends it
    h.close()


async def test_a_replica_still_busy_at_the_timeout_stops_then(server):
    old, new = incarnation(1, "a", server.port), incarnation(2, "b", 40002)
    st, woke = drained(old, new), asyncio.Event()
    h = handoffs(woke, timeout=0.3)
    assert h.keep(st, [old], set()) == [old]
    await asyncio.wait_for(woke.wait(), 5)
    assert server.busy == 1 and h.keep(st, [old], set()) == []
    h.close()


async def test_a_server_that_does_not_answer_or_a_runtime_without_a_load_path_stops_after_the_settle(server):
    old, new = incarnation(1, "a", server.port), incarnation(2, "b", 40002)
    st = drained(old, new)
    for path in (None, "/not-there"):
        woke = asyncio.Event()
        h = handoffs(woke, path=path)
        assert h.keep(st, [old], set()) == [old]
        await asyncio.wait_for(woke.wait(), 5)
        assert h.keep(st, [old], set()) == []
        h.close()


async def test_a_load_hook_that_fails_ends_the_handoff_after_the_settle(server):
    old, new = incarnation(1, "a", server.port), incarnation(2, "b", 40002)
    st, woke = drained(old, new), asyncio.Event()

    def broken(runtime: str) -> str:
        raise RuntimeError("plugin bug")

    h = Handoffs(load_path=broken, read=read, timeout=30, wake=woke.set, settle=0.2, period=0.02)
    started = asyncio.get_running_loop().time()
    assert h.keep(st, [old], set()) == [old]
    await asyncio.wait_for(woke.wait(), 5)
    assert asyncio.get_running_loop().time() - started >= 0.2 and h.keep(st, [old], set()) == []
    h.close()


async def test_only_a_successor_that_could_run_beside_it_makes_a_handoff(server):
    old = incarnation(1, "a", server.port)
    woke = asyncio.Event()
    h = handoffs(woke, timeout=30)
    # Deleted (no assignment), or re-placed onto its own GPU or port: it stops at once.
    assert h.keep(ClusterState(), [old], set()) == []
    for successor in (incarnation(2, "a", 40002, gpu=0), incarnation(2, "a", server.port, gpu=1)):
        st = ClusterState()
        st.cluster_format = 2
        assert st.apply(1, 1, deploy_command(spec("m", "/m.gguf"), [successor])).ok
        assert st.successor_of(old) is None and h.keep(st, [old], set()) == []
    # Still wanted: not a hand-off. The setting at 0: none.
    st = drained(old, incarnation(2, "a", 40002, gpu=1))
    assert h.keep(st, [old], {old.instance_id}) == []
    assert handoffs(woke, timeout=0).keep(st, [old], set()) == []
    assert server.polls == 0
    h.close()


async def test_a_deployment_deleted_during_the_handoff_stops_its_old_replica_at_once(server):
    old, new = incarnation(1, "a", server.port), incarnation(2, "b", 40002)
    st, woke = drained(old, new), asyncio.Event()
    h = handoffs(woke)
    assert h.keep(st, [old], set()) == [old]
    watcher = h._kept[old.instance_id].task
    assert h.keep(ClusterState(), [old], set()) == []
    await asyncio.wait([watcher], timeout=2)
    assert watcher.cancelled() and not woke.is_set()
    h.close()


async def test_an_agentd_restarted_during_a_handoff_adopts_the_replaced_replica_instead_of_stopping_it(
        tmp_path, plugins):
    old = toy_assignment(parts=1, name="m")
    new = toy_assignment(parts=1, name="m", gen=2, hosts=("h2",))
    sup = make(tmp_path, plugins)
    try:
        await sup.apply([old])
        pid = (await sup.wait_for(old.instance_id, ["RUNNING"], 10)).processes[0].pid
        await sup.close()  # agentd restarts while the old replica answers what it holds
        sup = make(tmp_path, plugins)
        await sup.start()
        assert sup.assignments() == [old]  # from its record, before the first apply
        h = handoffs(asyncio.Event())
        kept = h.keep(drained(old, new), sup.assignments(), set())
        assert kept == [old]
        assert await sup.apply(kept) == [f"{old.instance_id}: adopting db (pid {pid}); supervising db"]
        assert sup.assignments() == [old]
        h.close()
    finally:
        await sup.close(stop_processes=True)
        kill_recorded(tmp_path)
