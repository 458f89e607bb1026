"""Reports through a voter (docs/cluster.md, issue 16 item 1), in one process on real grpc.aio servers.

A leader and a voter that does not lead, each a Control + Agent service on its own loopback server with a
Raft view the test sets, and a real coordinator. A host's ReportStream to the voter reaches the leader on
the voter's one RelayReports stream: the report is recorded under the host's name (ListNodes says through
which voter), bare renewals stay on the voter and renew the lease through its summary, a change arrives in
the next batch, and the leader's word for a host (a peer restart) comes back on the host's stream. The
leader takes relayed reports only from a current voter; a voter cut off from the leader sends its hosts
away.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from agentd.api.control import AgentService, ChannelPool, ControlService, add_services
from agentd.api.report_stream import ReportStream
from agentd.cluster.relay import BATCH_FULL, RelayChoice, ReportRelay
from agentd.cluster.report_timing import DEFAULT, GAP_SHARE, HOST_INTERVAL, JITTER_MAX, RelayTimings
from agentd.cluster.state import ClusterState
from agentd.coordinator import Coordinator
from agentd.errors import InvalidInput
from agentd.modelinfo import inspect_model
from agentd.placement import Placer
from agentd.plugins import PluginManager
from agentd.testing.localcluster import simulated_host
from agentd.v1 import control_pb2 as pb
from agentd.v1 import control_pb2_grpc as pb_grpc
from agentd.version import AGENT_VERSION, STATE_FORMAT, WIRE_VERSION


@dataclass
class Member:
    id: str
    address: str
    voter: bool = True


@dataclass
class View:
    node: str
    is_leader: bool = False
    leader_id: str | None = None
    leader_address: str | None = None
    term: int = 3
    commit_index: int = 0
    last_applied: int = 0
    members: dict[str, Any] = field(default_factory=dict)


class Consensus:
    def __init__(self, view: View, state: ClusterState):
        self.view, self.state, self.index = view, state, 0

    @property
    def term(self) -> int:
        return self.view.term

    @property
    def is_leader(self) -> bool:
        return self.view.is_leader

    @property
    def members(self) -> dict:
        return self.view.members

    async def propose(self, command: bytes, timeout: float | None = None):
        self.index += 1
        return self.state.apply(self.index, self.view.term, command)


class Node:
    def __init__(self, name: str, members: dict[str, Any], agent_cls: type[AgentService] = AgentService):
        self.name = name
        self.state = ClusterState()
        self.raft = View(name, members=members)
        self.coordinator = Coordinator(state=self.state, consensus=Consensus(self.raft, self.state),
                                       place=Placer(PluginManager.load()), inspect=inspect_model,
                                       validate_runtime=PluginManager.load().runtime, port_range=(40000, 40099),
                                       node_down_grace=30)
        self.channels = ChannelPool()
        self.control = ControlService(node_id=name, raft=self.raft, state=self.state, coordinator=self.coordinator,
                                      channels=self.channels, local_logs=self._no_logs)
        self.agent = agent_cls(raft=self.raft, coordinator=self.coordinator, control=self.control)
        self.relay = ReportRelay(name, self.raft, self.channels.get)
        self.agent.relay = self.relay
        self.server = grpc.aio.server()
        add_services(self.server, self.control, self.agent)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        members[name] = Member(name, self.address)
        self.channel = grpc.aio.insecure_channel(self.address)
        self.stub = pb_grpc.AgentStub(self.channel)

    async def _no_logs(self, request: pb.LogsRequest) -> AsyncIterator[bytes]:
        raise InvalidInput("no logs here")
        yield b""

    async def close(self) -> None:
        self.relay.close()
        await self.channel.close()
        await self.channels.close()
        await self.server.stop(0)


class SlowLeader(AgentService):
    """A leader whose answers to relayed batches wait `delays.pop(0)` seconds while there are delays."""

    delays: list[float]

    async def RelayReports(self, requests, context):
        async for reply in super().RelayReports(requests, context):
            if self.delays:
                await asyncio.sleep(self.delays.pop(0))
            yield reply


async def started_pair(lead_name: str, lead_cls: type[SlowLeader]) -> tuple[Node, Node]:
    members: dict[str, Any] = {}
    lead, v = Node(lead_name, members, agent_cls=lead_cls), Node("v", members)
    lead.agent.delays = []
    for n in (lead, v):
        await n.server.start()
        n.raft.leader_id, n.raft.leader_address = lead.name, lead.address
    lead.raft.is_leader = True
    lead.coordinator.became_leader()
    return lead, v


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Node, Node]]:
    """`lead` leads, `v` is a voter that follows it and relays."""
    lead, v = await started_pair("lead", SlowLeader)
    yield lead, v
    for n in (lead, v):
        await n.close()


def update(node: str, *, first: bool = False, instances: list[pb.Instance] | None = None,
           watches_from: str = "") -> pb.ReportUpdate:
    m = pb.ReportUpdate(node=node, address=f"{node}:7070", wall_time=1.0, watches_from=watches_from)
    if first:
        m.inventory_json = __import__("json").dumps(simulated_host(node, gpus=1))
        m.agent_version, m.state_format, m.wire_version = AGENT_VERSION, STATE_FORMAT, WIRE_VERSION
    if instances is not None:
        m.instances_changed = True
        m.instances.extend(instances)
    return m


class HostStream:
    """A host's ReportStream: send one message, read the reply."""

    def __init__(self, stub: pb_grpc.AgentStub):
        self.call = stub.ReportStream()

    async def send(self, m: pb.ReportUpdate) -> pb.ReportReply:
        await self.call.write(m)
        reply = await self.call.read()
        if reply is grpc.aio.EOF:
            raise grpc.aio.AioRpcError(await self.call.code(), grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       await self.call.details())
        return reply


async def until(fn, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not fn():
            await asyncio.sleep(0.02)


async def test_a_host_report_reaches_the_leader_through_a_voter_and_its_lease_stays_on_the_voter(pair):
    lead, v = pair
    await v.relay.step()  # the relay stream opens with an empty batch; the voter then takes hosts
    assert v.relay.serving()
    host = HostStream(v.stub)
    reply = await host.send(update("w1", first=True))
    assert (reply.leader_id, reply.state_format, reply.agent_version) == ("lead", STATE_FORMAT, AGENT_VERSION)
    assert "w1" not in lead.coordinator.reports  # held by the voter until its next batch
    await v.relay.step()
    rep = lead.coordinator.reports["w1"]
    assert (rep.inventory.name, rep.via, rep.agent.version) == ("w1", "v", AGENT_VERSION)
    nodes = {n.name: n for n in (await pb_grpc.ControlStub(lead.channel).ListNodes(pb.ListNodesRequest())).nodes}
    assert nodes["w1"].reports_via == "v"

    # Bare renewals stay on the voter; its lease summary renews the host on the leader, the report untouched.
    seen = rep.last_seen
    await asyncio.sleep(0.05)
    await host.send(update("w1"))
    batch = v.relay._batch(v.relay._mono())
    assert (list(batch.updates), list(batch.live)) == ([], ["w1"])
    for h in v.relay.hosts.values():
        h.fresh = False
    await v.relay.step()
    assert lead.coordinator.reports["w1"] is rep and rep.last_seen > seen

    # A change arrives in the next batch; the leader's word for the host (a peer restart) comes back.
    running = pb.Instance(instance_id="chat-r0-g1", deployment="chat", replica=0, part=0, host="w1",
                          state="RUNNING", pid=42)
    await host.send(update("w1", instances=[running]))
    lead.coordinator._peer_restarts["w1"] = [("10.0.0.9", 50052, "rpc-server restarted")]
    await v.relay.step()
    assert [i.state for i in lead.coordinator.reports["w1"].instances] == ["RUNNING"]
    reply = await host.send(update("w1"))
    assert [(r.address, r.port) for r in reply.peer_restarts] == [("10.0.0.9", 50052)]
    host.call.cancel()


async def test_only_a_current_voter_may_relay(pair):
    lead, _ = pair
    lead.raft.members["w9"] = Member("w9", "127.0.0.1:1", voter=False)  # a learner
    for relay in ("w9", "nobody", "lead"):
        call = lead.stub.RelayReports()
        await call.write(pb.RelayBatch(relay=relay, updates=[update("w1", first=True)], live=["w1"]))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, relay
        assert "only voters relay" in err.value.details()
    assert "w1" not in lead.coordinator.reports


async def test_the_leader_refuses_one_relayed_host_and_the_voter_ends_only_its_stream(pair):
    lead, v = pair
    await v.relay.step()
    bad = HostStream(v.stub)
    m = update("w2", first=True)
    m.inventory_json = '{"name": "w2", "gpus": "many"}'
    await bad.send(m)  # the voter answers at once; the leader's refusal arrives with the next batch
    good = HostStream(v.stub)
    await good.send(update("w3", first=True))
    await v.relay.step()
    assert "w3" in lead.coordinator.reports and "w2" not in lead.coordinator.reports
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await bad.send(update("w2"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a host inventory" in err.value.details()
    await good.send(update("w3"))
    good.call.cancel()


async def test_a_voter_cut_off_from_the_leader_sends_its_hosts_to_the_leader(pair):
    lead, v = pair
    assert not v.relay.serving()  # no batch answered yet: the host goes to the leader itself
    host = HostStream(v.stub)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await host.send(update("w1", first=True))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await v.relay.step()
    host = HostStream(v.stub)
    await host.send(update("w1", first=True))
    await lead.server.stop(0)  # the leader is gone: the voter's next batch fails, and it stops serving
    await v.relay.step()
    assert not v.relay.serving()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await host.send(update("w1"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def list_nodes(lead: Node) -> dict[str, pb.Node]:
    return {n.name: n for n in (await pb_grpc.ControlStub(lead.channel).ListNodes(pb.ListNodesRequest())).nodes}


async def test_hundreds_of_first_reports_go_to_the_leader_in_bounded_batches_and_every_host_is_up(pair):
    """The first batch of a relay with 1,024 hosts once held 1,024 full reports; now each batch holds at
    most BATCH_FULL of them and the next follows as soon as the leader answers (issue 16)."""
    lead, v = pair
    sizes: list[int] = []
    relayed = lead.agent._relayed

    def counting(relay, batch, sessions):
        sizes.append(len(batch.updates))
        return relayed(relay, batch, sessions)

    lead.agent._relayed = counting
    await v.relay.step()
    n = 300
    names = [f"w{i:03d}" for i in range(n)]
    hosts = [HostStream(v.stub) for _ in names]
    await asyncio.gather(*(h.send(update(name, first=True)) for h, name in zip(hosts, names, strict=True)))
    assert not any(name in lead.coordinator.reports for name in names)
    task = asyncio.create_task(v.relay.run())
    try:
        await until(lambda: all(name in lead.coordinator.reports for name in names), timeout=60)
        nodes = await list_nodes(lead)
        assert {(nodes[name].state, nodes[name].reports_via) for name in names} == {("up", "v")}
        full = [s for s in sizes if s]
        assert n > BATCH_FULL and max(full) <= BATCH_FULL and len(full) >= -(-n // BATCH_FULL), sizes
        # Every host is still served by the voter, and its renewals reach the leader through the summary.
        seen = {name: lead.coordinator.reports[name].last_seen for name in names}
        await asyncio.gather(*(h.send(update(name)) for h, name in zip(hosts, names, strict=True)))
        await until(lambda: all(lead.coordinator.reports[name].last_seen > seen[name] for name in names),
                    timeout=30)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for h in hosts:
            h.call.cancel()


async def test_a_late_answer_ends_the_relay_stream_not_its_hosts_service(pair):
    """A batch the leader answers after `reply_timeout` ends the voter's stream, but the voter keeps serving
    its hosts while its last answer is at most `healthy` old; the next stream carries everything again."""
    lead, v = pair
    v.relay.timings = RelayTimings(grace=30.0, renew=1.0, reply_timeout=0.3, live=3.0, host_timeout=2.0,
                                   jitter=0.0)
    await v.relay.step()
    host = HostStream(v.stub)
    await host.send(update("w1", first=True))
    lead.agent.delays = [1.0]
    await v.relay.step()  # gives up on the answer after 0.3 s
    assert v.relay._call is None and v.relay.serving()
    assert "w1" not in lead.coordinator.reports or lead.coordinator.reports["w1"].via == "v"
    await host.send(update("w1"))  # still served: the host does not leave for the leader
    await v.relay.step()  # a new stream, with everything
    assert lead.coordinator.reports["w1"].via == "v" and v.relay.serving()
    host.call.cancel()


async def test_nodes_show_the_voter_a_watcher_watches_from_and_direct_reports_when_its_relay_goes(pair):
    lead, v = pair
    await v.relay.step()
    host = HostStream(v.stub)
    await host.send(update("w1", first=True, watches_from=v.address))
    await v.relay.step()
    nodes = await list_nodes(lead)
    assert (nodes["w1"].role, nodes["w1"].reports_via, nodes["w1"].watches_from) == ("watcher", "v", "v")
    assert (nodes["v"].reports_via, nodes["v"].watches_from) == ("", "")  # a voter watches nothing

    # Its relay goes away: its next message is refused, and it reports to the leader itself.
    v.relay.close()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await host.send(update("w1"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    direct = HostStream(lead.stub)
    await direct.send(update("w1", first=True, watches_from=v.address))
    nodes = await list_nodes(lead)
    assert (nodes["w1"].state, nodes["w1"].reports_via, nodes["w1"].watches_from) == ("up", "", "v")
    direct.call.cancel()

    # `agentd nodes`: a VIA and a WATCHES column, and both fields in --json.
    env = {k: val for k, val in os.environ.items() if not k.startswith("AGENTD_")}
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=60, env=env)
    table = await asyncio.to_thread(run, [sys.executable, "-m", "agentd", "nodes", "--server", lead.address])
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split()[:6] == ["NAME", "ADDRESS", "STATE", "ROLE", "VIA", "WATCHES"], header
    at = [header.index(c) for c in ("VIA", "WATCHES", "GPUS")]
    got = {r.split()[0]: [r[at[0]:at[1]].strip(), r[at[1]:at[2]].strip()] for r in rows}
    assert got["w1"] == ["direct", "v"] and got["lead"] == ["-", "-"], table.stdout
    js = await asyncio.to_thread(run, [sys.executable, "-m", "agentd", "nodes", "--json", "--server", lead.address])
    assert js.returncode == 0, js.stderr
    w1 = next(n for n in json.loads(js.stdout)["nodes"] if n["name"] == "w1")
    assert (w1["reports_via"], w1["watches_from"], w1["role"]) == ("", "v", "watcher")


def test_relay_timings_derive_from_the_grace_and_keep_a_stalled_relays_hosts_up():
    from agentd.agent.reporter import REPORT_INTERVAL

    assert HOST_INTERVAL == REPORT_INTERVAL
    d = DEFAULT
    assert (d.renew, d.reply_timeout, d.live, d.host_timeout, d.jitter) == (1.0, 10.0, 3.0, 5.0, 5.0)
    assert round(d.healthy, 3) == 11.05 and round(d.gap, 3) == 22.15
    for grace in (2.5, 3.0, 3.5, 4.0, 6.0, 10.0, 30.0, 300.0, 3600.0):
        t = RelayTimings.for_grace(grace)
        t.check()
        assert t.gap <= GAP_SHARE * grace and t.healthy > t.renew + t.reply_timeout and t.live > HOST_INTERVAL
        assert 0 < t.jitter <= JITTER_MAX  # a departure is always spread, never past the rule
    with pytest.raises(ValueError, match="too short for reports through a voter"):
        RelayTimings.for_grace(2.2).check()
    relay = ReportRelay("v", View("v"), lambda address: None, timings=RelayTimings.for_grace(3.0))
    assert round(relay.timings.reply_timeout, 3) == 0.45 and round(relay.timings.healthy, 3) == 0.75


async def test_a_voter_does_not_take_back_a_host_that_moved_to_the_leader(pair):
    """A host that left its voter for the leader is vouched for by that voter a little longer (it heard the
    host lately): that neither flips `reports_via` back nor replaces the host's report; and a new relay
    stream does not resend the report of a host the voter no longer hears."""
    lead, v = pair
    await v.relay.step()
    host = HostStream(v.stub)
    await host.send(update("w1", first=True))
    await v.relay.step()
    assert lead.coordinator.reports["w1"].via == "v"
    direct = HostStream(lead.stub)
    await direct.send(update("w1", first=True))
    mine = lead.coordinator.reports["w1"]
    assert mine.via == ""
    assert "w1" in v.relay.vouched()
    await v.relay.step()  # its lease summary still names w1
    assert lead.coordinator.reports["w1"] is mine and mine.via == ""
    v.relay.hosts["w1"].heard -= 2 * v.relay.timings.live  # silent on the voter since
    v.relay.close(keep_serving=True)
    await v.relay.step()  # a new stream: everything the voter holds, but not w1's stale report
    assert lead.coordinator.reports["w1"] is mine and mine.via == ""
    assert (await list_nodes(lead))["w1"].reports_via == ""
    host.call.cancel()
    direct.call.cancel()


# ---------------------------------------------------------------- only what the receiver lacks (inventory digests)


class LeaderBeforeDigests(SlowLeader):
    """A leader from before inventory digests: its relay answers never say `takes_digests`, and a report
    stream whose first message lacks the inventory is refused, as that release's AgentService did."""

    def _relayed(self, relay, batch, sessions):
        assert not any(m.inventory_digest and not m.inventory_json for m in batch.updates), "sent it a digest"
        reply = super()._relayed(relay, batch, sessions)
        reply.takes_digests = False
        return reply

    async def ReportStream(self, requests, context):
        async def checked():
            first = True
            async for m in requests:
                if first and not m.inventory_json:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a report stream's first message "
                                        "names its node and carries its inventory and agent version")
                first = False
                yield m
        async for reply in super().ReportStream(checked(), context):
            yield reply


def inventory_of(node: str, rack: str = "") -> str:
    inv = simulated_host(node, gpus=1)
    if rack:
        inv["labels"] = {"rack": rack}
    return json.dumps(inv)


async def report(rs: ReportStream, target: Node, inventory_json: str) -> pb.ReportReply:
    """The daemon's report client (agentd/api/report_stream.py), one report to `target`."""
    return await rs.send(target.channel, target.address, inventory_json=inventory_json, instances=[],
                         version=(AGENT_VERSION, STATE_FORMAT, WIRE_VERSION, ""), wall_time=1.0)


async def relay_all(v: Node) -> None:
    """The voter's batches until it has nothing left to send (its first on a stream is the lease summary)."""
    for _ in range(10):
        await v.relay.step()
        if not v.relay._more and not any(h.fresh or h.inventory_dirty for h in v.relay.hosts.values()):
            return
    raise AssertionError("the relay still had reports to send after 10 batches")


async def test_a_host_that_falls_back_sends_no_inventory_the_leader_holds_and_a_changed_one_whole(pair):
    lead, v = pair
    got: list[str] = []  # how inventories reached the leader (the daemon counts them in its metrics)
    lead.agent.desk.on_inventory = got.append
    await v.relay.step()
    host = ReportStream("w1", "w1:7070")
    try:
        # New everywhere: named by digest, the voter asks for it; the leader asks the voter in turn.
        await report(host, v, inventory_of("w1"))
        assert (host.inventories_sent, host.inventories_named) == (1, 0)
        await relay_all(v)
        assert (v.relay.inventories_named, v.relay.inventories_sent) == (1, 1)
        rep = lead.coordinator.reports["w1"]
        assert rep.via == "v" and rep.inventory.name == "w1"

        # Its voter fails it: to the leader directly, which holds that inventory: none crosses.
        host.close()
        await report(host, lead, inventory_of("w1"))
        assert (host.inventories_sent, host.inventories_named) == (1, 1)
        now = lead.coordinator.reports["w1"]
        assert now.via == "" and now.inventory == rep.inventory and now.agent.version == AGENT_VERSION

        # Back to its voter, which holds it too; a new relay stream (a late answer) names it to the leader.
        host.close()
        await report(host, v, inventory_of("w1"))
        assert (host.inventories_sent, host.inventories_named) == (1, 2)
        v.relay.close(keep_serving=True)
        await relay_all(v)
        assert (v.relay.inventories_named, v.relay.inventories_sent) == (2, 1)
        assert lead.coordinator.reports["w1"].via == "v"

        # A changed inventory is delivered whole, on a new stream to the leader as on the voter's.
        host.close()
        await report(host, lead, inventory_of("w1", rack="b"))
        assert (host.inventories_sent, host.inventories_named) == (2, 2)
        assert lead.coordinator.reports["w1"].inventory.labels == {"rack": "b"}
        await report(host, lead, inventory_of("w1", rack="c"))  # and within a stream, as before
        assert host.inventories_sent == 3 and lead.coordinator.reports["w1"].inventory.labels == {"rack": "c"}
        assert got == ["asked", "whole", "named", "named", "asked", "whole", "whole"]
    finally:
        host.close()


async def test_a_new_leader_that_lacks_the_inventories_gets_them_in_the_voters_bounded_batches(pair):
    lead, v = pair
    v.relay.timings = dataclasses.replace(DEFAULT, live=600.0)  # every host vouched for however slow the test
    await v.relay.step()
    hosts = [ReportStream(f"w{i}", f"w{i}:7070") for i in range(BATCH_FULL + 20)]
    try:
        for i, h in enumerate(hosts):
            await report(h, v, inventory_of(f"w{i}"))
        await relay_all(v)
        assert v.relay.inventories_sent == len(hosts)
        # The same leader on a new stream: every host named, none whole.
        v.relay.close(keep_serving=True)
        await relay_all(v)
        assert (v.relay.inventories_sent, v.relay.inventories_named) == (len(hosts), 2 * len(hosts))
        # A leader that never held them (elected for the first time): it asks, and they come whole, bounded.
        lead.agent.desk._inventories.clear()
        lead.coordinator.reports.clear()
        v.relay.close(keep_serving=True)
        sizes = []
        for _ in range(10):
            batch_before = v.relay.inventories_sent
            await v.relay.step()
            sizes.append(v.relay.inventories_sent - batch_before)
            if not v.relay._more:
                break
        assert max(sizes) <= BATCH_FULL and v.relay.inventories_sent == 2 * len(hosts)
        assert all(f"w{i}" in lead.coordinator.reports for i in range(len(hosts)))
        assert all(h.inventories_sent == 1 for h in hosts), "no host was asked again"
    finally:
        for h in hosts:
            h.close()


async def test_peers_before_digests_get_whole_inventories():
    old, v = await started_pair("old", LeaderBeforeDigests)
    host = ReportStream("w1", "w1:7070")
    try:
        await v.relay.step()
        assert v.relay._digests is False
        await report(host, v, inventory_of("w1"))
        await relay_all(v)  # the leader would fail on a digest (LeaderBeforeDigests asserts)
        v.relay.close(keep_serving=True)
        await relay_all(v)
        assert (v.relay.inventories_sent, v.relay.inventories_named) == (2, 0)
        assert old.coordinator.reports["w1"].via == "v"
        host.close()
        reply = await report(host, old, inventory_of("w1"))  # refused by digest, then whole in the same call
        assert reply.leader_id == "old" and old.coordinator.reports["w1"].via == ""
        assert (host.inventories_named, host.inventories_sent, host.opened) == (0, 2, 3)
    finally:
        host.close()
        for n in (old, v):
            await n.close()


def test_a_host_leaving_its_voter_tries_another_voter_at_once_and_the_leader_after_one_jittered_wait():
    clock = [100.0]
    view = View("w1", leader_id="lead", leader_address="lead:1",
                members={n: Member(n, f"{n}:1") for n in ("lead", "a", "b")})
    view.watcher = type("W", (), {"source": "a:1"})()
    waits = []
    for seed in range(50):
        choice = RelayChoice("w1", mono=lambda: clock[0], jitter=DEFAULT.jitter, rng=random.Random(seed))
        assert choice.target(view) == "a:1"  # the voter it watches from
        assert choice.failed("a:1", view) == 0.0 and choice.failed("b:1", view) == 0.0  # nothing got through
        assert choice.target(view) == ""  # yet (start-up: the voters relay once the leader answered): at once
        choice.served()
        clock[0] += RelayChoice.AVOID
        assert choice.failed("a:1", view) == 0.0  # another voter takes it at once
        assert choice.target(view) == "b:1"
        waits.append(choice.failed("b:1", view))  # none left: the leader itself, after one wait
        assert choice.target(view) == ""
        assert choice.failed("a:1", view) == 0.0  # the wait of this departure is spent
        choice.served()
        clock[0] += RelayChoice.AVOID
        assert choice.target(view) == "a:1"  # back to its voter once the avoidance is over
        choice.failed("a:1", view)
        assert 0.0 < choice.failed("b:1", view) <= DEFAULT.jitter  # a new departure waits again
    assert all(0.0 <= w <= DEFAULT.jitter for w in waits) and max(waits) - min(waits) > DEFAULT.jitter / 2


def test_after_a_failover_a_host_avoids_the_old_leader_as_its_relay():
    """Its voter became the leader: the next voter is chosen by a hash of the host's name, and the old leader,
    likely dead, is not among those it may hash to (trying it would cost a report timeout)."""
    clock = [100.0]
    picks, later = set(), set()
    for i in range(40):
        view = View(f"w{i}", leader_id="lead", leader_address="lead:1",
                    members={n: Member(n, f"{n}:1") for n in ("lead", "a", "b")})
        view.watcher = type("W", (), {"source": "a:1"})()
        choice = RelayChoice(f"w{i}", mono=lambda: clock[0])
        assert choice.target(view) == "a:1"
        view.leader_id, view.leader_address = "a", "a:1"  # a won the election
        picks.add(choice.target(view))
        clock[0] += RelayChoice.AVOID
        later.add(choice.target(view))
        clock[0] -= RelayChoice.AVOID
    assert picks == {"b:1"}
    assert later == {"b:1", "lead:1"}  # after RelayChoice.AVOID it is a voter like any other again
