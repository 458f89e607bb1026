"""The Control and Agent gRPC services in one process: real grpc.aio servers on loopback, no Raft.

Each "agent" here is a ControlService + AgentService on its own server, with a
Raft view the test sets (who leads, the term) and a real coordinator whose
consensus applies proposals at once to a real ClusterState. That is enough to
check what the API layer owns: forwarding to the leader (and never twice),
status codes and messages, Watch, the read views, and agent reports.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import pytest

from agentd.api.client import CannotPlace, ControlClient, error_from_rpc
from agentd.api.control import instance_to_pb, page_of, status_for
from agentd.api.convert import spec_from_pb, spec_to_pb
from agentd.cluster.state import NODE_DOWN, node_command
from agentd.errors import AgentdError, InvalidInput, NotAvailable, PeerError, Unplaceable
from agentd.testing.control_world import Agent, Member, rpc_error, spec, watchers
from agentd.testing.gguf import write_tiny_llama_gguf
from agentd.testing.localcluster import simulated_host
from agentd.types import Diagnosis
from agentd.v1 import control_pb2 as pb

# ---------------------------------------------------------------------- forwarding


async def test_a_follower_forwards_writes_and_reads_to_the_leader(agents, model):
    a, b = agents
    reply = await b.stub.Deploy(pb.DeployRequest(spec=spec(model)))
    assert reply.message == "deployment chat created" and reply.index == 1
    assert "chat" in a.state.deployments and b.state.deployments == {}  # decided and applied on the leader only
    (assignment,) = json.loads(reply.deployment.assignments_json)
    assert assignment["term"] == 2 and assignment["plan"]["parts"][0]["host"] in ("a", "b")
    got = await b.stub.Get(pb.GetRequest(name="chat"))
    assert got.assignments_json == reply.deployment.assignments_json
    listed = await b.stub.List(pb.ListRequest())
    assert [d.spec.name for d in listed.deployments] == ["chat"]
    scaled = await b.stub.Scale(pb.ScaleRequest(name="chat", replicas=2))
    assert scaled.message == "deployment chat: 1 assignment(s) set, 2 replica(s)"
    deleted = await b.stub.Delete(pb.DeleteRequest(name="chat"))
    assert (deleted.message, deleted.index) == ("deployment chat deleted", 3)


async def test_default_reads_are_confirmed_by_the_leader_and_serializable_reads_use_the_local_copy(agents, model):
    a, b = agents
    await b.stub.Deploy(pb.DeployRequest(spec=spec(model)))
    before = a.raft.barriers
    assert [d.spec.name for d in (await b.stub.List(pb.ListRequest())).deployments] == ["chat"]
    assert (await b.stub.Get(pb.GetRequest(name="chat"))).spec.name == "chat"
    assert a.raft.barriers == before + 2  # each default read ran ReadIndex on the leader
    # b's own copy lags here (the fake applies on the leader only): a serializable read shows that copy.
    assert list((await b.stub.List(pb.ListRequest(serializable=True))).deployments) == []
    err = await rpc_error(b.stub.Get(pb.GetRequest(name="chat", serializable=True)))
    assert (err.code(), err.details()) == (grpc.StatusCode.NOT_FOUND, "no deployment named 'chat'")
    b.state = a.state  # once b has applied the entry, its answer matches the leader's, with no leader at all
    b.control.state = a.state
    b.follow(None)
    got = await b.stub.Get(pb.GetRequest(name="chat", serializable=True))
    assert got.spec.name == "chat" and a.raft.barriers == before + 2
    assert {(i.state, i.reason) for i in got.instances} == {
        ("UNKNOWN", "b is not the leader: instance states are reported to the leader")}
    err = await rpc_error(b.stub.List(pb.ListRequest()))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_leader_that_cannot_confirm_its_leadership_refuses_linearizable_reads(agents, model):
    a, b = agents
    await a.stub.Deploy(pb.DeployRequest(spec=spec(model)))
    a.raft.quorum = False
    for stub in (a.stub, b.stub):
        err = await rpc_error(stub.Get(pb.GetRequest(name="chat")))
        assert (err.code(), err.details()) == (grpc.StatusCode.UNAVAILABLE, "leadership not confirmed within 2s")
    assert (await a.stub.Get(pb.GetRequest(name="chat", serializable=True))).spec.name == "chat"


async def test_the_leaders_status_and_message_come_back_unchanged(agents, model):
    _, b = agents
    err = await rpc_error(b.stub.Get(pb.GetRequest(name="ghost")))
    assert (err.code(), err.details()) == (grpc.StatusCode.NOT_FOUND, "no deployment named 'ghost'")
    err = await rpc_error(b.stub.Deploy(pb.DeployRequest(spec=spec(model, replicas=3))))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details().startswith("0/2 hosts can run chat (llamabox) as replica 3 of 3: ")
    await b.stub.Deploy(pb.DeployRequest(spec=spec(model)))
    err = await rpc_error(b.stub.Deploy(pb.DeployRequest(spec=spec(model))))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and "already exists" in err.details()
    err = await rpc_error(b.stub.Deploy(pb.DeployRequest(spec=spec(model, name="Bad Name"))))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("deployment spec: name: ")


async def test_a_forwarded_call_is_never_forwarded_again(agents, model, placer):
    a, b = agents
    c = Agent("c", placer)
    await c.server.start()
    try:
        # b and c each believe the other leads (a leadership change in flight): one hop, then UNAVAILABLE.
        b.follow(c)
        c.follow(b)
        err = await rpc_error(b.stub.Deploy(pb.DeployRequest(spec=spec(model)), timeout=5))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert err.details() == "leadership changed while the call was forwarded; retry"
        assert a.state.deployments == {}
    finally:
        await c.close()


async def test_a_call_forwarded_to_a_hung_leader_gives_up_when_another_leader_is_known(agents, model):
    """A frozen leader keeps its sockets open: without this, the caller would wait out the forward's deadline."""
    a, b = agents
    hung = grpc.aio.server()
    never = asyncio.Event()

    async def stuck(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await never.wait()
        return b""

    hung.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "agentd.v1.Control", {m: grpc.unary_unary_rpc_method_handler(stuck) for m in ("Deploy", "List")}),))
    port = hung.add_insecure_port("127.0.0.1:0")
    await hung.start()
    try:
        b.raft.leader_id, b.raft.leader_address = "h", f"127.0.0.1:{port}"
        write = asyncio.ensure_future(b.stub.Deploy(pb.DeployRequest(spec=spec(model)), timeout=20))
        read = asyncio.ensure_future(b.stub.List(pb.ListRequest(), timeout=20))
        await asyncio.sleep(0.3)
        assert not write.done() and not read.done()
        b.follow(a)  # the cluster elected a
        err = await rpc_error(asyncio.wait_for(write, 2))
        assert (err.code(), err.details()) == (
            grpc.StatusCode.UNAVAILABLE, "the leader changed from h to a while the call was forwarded; retry")
        assert (await asyncio.wait_for(read, 2)).deployments == []  # a read is simply sent to the new leader
        assert a.state.deployments == {}
    finally:
        never.set()
        await hung.stop(0)


async def test_without_a_leader_calls_are_unavailable(agents, model):
    _, b = agents
    b.follow(None)
    for call in (b.stub.Deploy(pb.DeployRequest(spec=spec(model))), b.stub.List(pb.ListRequest()),
                 b.stub.ListNodes(pb.ListNodesRequest())):
        err = await rpc_error(call)
        assert (err.code(), err.details()) == (grpc.StatusCode.UNAVAILABLE, "no leader elected yet")
    # Status and Leader are answered locally, whoever leads.
    status = await b.stub.Status(pb.StatusRequest())
    assert (status.node_id, status.leader_id, status.term) == ("b", "", 2)
    assert (await b.stub.Leader(pb.LeaderRequest())).leader_id == ""


async def test_a_dead_leader_address_is_unavailable(agents, model):
    a, b = agents
    await a.server.stop(0)
    err = await rpc_error(b.stub.Deploy(pb.DeployRequest(spec=spec(model)), timeout=5))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_bug_inside_the_coordinator_is_internal_with_a_sentence(agents, model):
    a, b = agents

    def broken(*args: Any) -> Any:
        raise RuntimeError("placement exploded")

    a.coordinator._place = broken
    for stub in (a.stub, b.stub):
        err = await rpc_error(stub.Deploy(pb.DeployRequest(spec=spec(model))))
        assert err.code() == grpc.StatusCode.INTERNAL
        assert err.details() == ("Deploy failed inside agent a: RuntimeError: placement exploded "
                                 "(the agent's log has details)")
    assert (await a.stub.Status(pb.StatusRequest())).commit_index == 0


# ---------------------------------------------------------------------- reads


async def test_leader_and_status_describe_the_local_raft_view(agents):
    a, b = agents
    b.raft.members.update(a.raft.members)
    b.raft.commit_index, b.raft.last_applied, b.raft.term = 7, 6, 4
    leader = await b.stub.Leader(pb.LeaderRequest())
    assert (leader.leader_id, leader.leader_address, leader.term) == ("a", a.address, 4)
    s = await b.stub.Status(pb.StatusRequest())
    assert (s.node_id, s.leader_id, s.commit_index, s.last_applied) == ("b", "a", 7, 6)
    assert [(m.id, m.address, m.voter) for m in s.members] == [("a", a.address, True), ("b", b.address, True)]


async def test_list_instances_shows_unreported_parts_pending_and_parts_on_down_hosts_unknown(agents, model):
    a, b = agents
    reply = await a.stub.Deploy(pb.DeployRequest(spec=spec(model, replicas=2)))
    assert reply.deployment.spec.replicas == 2
    rows = (await b.stub.ListInstances(pb.ListInstancesRequest(deployment="chat"))).instances
    assert sorted((i.host, i.state, i.reason) for i in rows) == [
        ("a", "PENDING", "not reported by its host yet"), ("b", "PENDING", "not reported by its host yet")]
    await a.coordinator.consensus.propose(node_command("b", NODE_DOWN))
    on_b = next(i for i in (await a.stub.ListInstances(pb.ListInstancesRequest())).instances if i.host == "b")
    assert (on_b.state, on_b.reason) == ("UNKNOWN", "host b is down")
    # Once a host reports its part, the report is what is shown.
    (assignment,) = [x for x in a.state.assignments_for("chat") if x.plan.parts[0].host == "a"]
    part = pb.Instance(instance_id=assignment.instance_id, deployment="chat", replica=assignment.replica,
                       generation=1, part=0, host="a", role="main", state="RUNNING", reason="ready after 0.1s",
                       endpoint=f"127.0.0.1:{assignment.endpoints[0].port}", term=2, pid=4242)
    inv = simulated_host("a", gpus=1, gpu_gib=0.272)
    await a.agent_stub.Report(pb.ReportRequest(node="a", inventory_json=json.dumps(inv), instances=[part]))
    rows = (await b.stub.ListInstances(pb.ListInstancesRequest(deployment="chat"))).instances
    assert [(i.host, i.state, i.pid) for i in rows if i.host == "a"] == [("a", "RUNNING", 4242)]


async def test_list_nodes_joins_members_the_state_and_reports(agents):
    a, b = agents
    a.raft.members["b"] = Member("b", b.address, voter=False)
    await a.coordinator.consensus.propose(node_command("b", NODE_DOWN, b.address))
    nodes = {n.name: n for n in (await b.stub.ListNodes(pb.ListNodesRequest())).nodes}
    assert sorted(nodes) == ["a", "b"]
    assert (nodes["a"].leader, nodes["a"].voter, nodes["a"].state) == (True, True, "up")
    assert (nodes["b"].leader, nodes["b"].voter, nodes["b"].state, nodes["b"].address) == (False, False, "down",
                                                                                          b.address)
    assert json.loads(nodes["a"].inventory_json)["gpus"][0]["uuid"] == "GPU-sim-a-0"
    assert 0 <= nodes["a"].last_seen_seconds < 5


async def test_list_nodes_pages_in_name_order_and_the_client_reads_every_page(agents):
    a, b = agents
    for name in ("d", "c", "e", "f"):
        await a.coordinator.consensus.propose(node_command(name, NODE_DOWN, "10.0.0.9:7070"))
    everyone = [n.name for n in (await b.stub.ListNodes(pb.ListNodesRequest())).nodes]
    assert everyone == ["a", "b", "c", "d", "e", "f"]
    pages, token = [], ""
    while True:  # through the follower, which forwards each page to the leader
        reply = await b.stub.ListNodes(pb.ListNodesRequest(limit=2, page_token=token))
        pages.append([n.name for n in reply.nodes])
        if not reply.next_page_token:
            break
        token = reply.next_page_token
    assert pages == [["a", "b"], ["c", "d"], ["e", "f"]]
    # A node that joins between two pages lands on a later page, or on none if its place was passed: no node
    # is listed twice and none is skipped that was there all along.
    second = await b.stub.ListNodes(pb.ListNodesRequest(limit=2, page_token="b"))
    for name in ("cc", "ee"):
        await a.coordinator.consensus.propose(node_command(name, NODE_DOWN, "10.0.0.9:7070"))
    rest = await b.stub.ListNodes(pb.ListNodesRequest(limit=2, page_token=second.next_page_token))
    assert [n.name for n in second.nodes] + [n.name for n in rest.nodes] == ["c", "d", "e", "ee"]
    with ControlClient(b.address) as client:
        listed = await asyncio.to_thread(client.nodes, 3)
    assert [n.name for n in listed] == ["a", "b", "c", "cc", "d", "e", "ee", "f"]


def test_a_page_ends_at_the_names_end_and_names_its_last_as_the_next_token():
    names = ["a", "b", "c", "d", "e"]
    assert page_of(names, 0, "") == (names, "")
    assert page_of(names, 2, "") == (["a", "b"], "b")
    assert page_of(names, 2, "b") == (["c", "d"], "d")
    assert page_of(names, 2, "d") == (["e"], "")
    assert page_of(names, 5, "") == (names, "")
    assert page_of(names, 2, "bb") == (["c", "d"], "d")  # a token whose node left meanwhile
    assert page_of(names, 2, "z") == ([], "")


# ---------------------------------------------------------------------- Watch


async def test_watch_streams_events_through_a_follower_filtered_by_deployment(agents, model):
    a, b = agents
    everything = b.stub.Watch(pb.WatchRequest())
    only_chat = a.stub.Watch(pb.WatchRequest(deployment="chat"))
    await watchers(a, 2)
    await a.stub.Deploy(pb.DeployRequest(spec=spec(model, name="other")))
    await b.stub.Deploy(pb.DeployRequest(spec=spec(model)))
    await b.stub.Delete(pb.DeleteRequest(name="chat"))

    async def take(stream, n: int) -> list[tuple[str, str, int]]:
        out = []
        async for ev in stream:
            out.append((ev.kind, ev.name, ev.index))
            if len(out) == n:
                break
        stream.cancel()
        return out

    assert await asyncio.wait_for(take(only_chat, 4), 5) == [
        ("deployment.created", "chat", 2), ("assignment.set", "chat", 2), ("assignment.removed", "chat", 3),
        ("deployment.deleted", "chat", 3)]
    got = await asyncio.wait_for(take(everything, 6), 5)
    assert [e[:2] for e in got[:2]] == [("deployment.created", "other"), ("assignment.set", "other")]
    assert got[2:] == [("deployment.created", "chat", 2), ("assignment.set", "chat", 2),
                       ("assignment.removed", "chat", 3), ("deployment.deleted", "chat", 3)]


async def test_instance_state_changes_are_watch_events(agents):
    a, _ = agents
    stream = a.stub.Watch(pb.WatchRequest(deployment="d"))
    await watchers(a, 1)
    inv = json.dumps(simulated_host("a", gpus=1, gpu_gib=0.272))
    for state in ("STARTING", "STARTING", "RUNNING"):  # the repeated state is no event
        part = pb.Instance(instance_id="d-r0-g1", deployment="d", part=0, host="a", role="main", state=state)
        await a.agent_stub.Report(pb.ReportRequest(node="a", inventory_json=inv, instances=[part]))
    seen = []
    async for ev in stream:
        seen.append((ev.kind, json.loads(ev.data_json)["state"]))
        if len(seen) == 2:
            break
    stream.cancel()
    assert seen == [("instance.state", "STARTING"), ("instance.state", "RUNNING")]


# ---------------------------------------------------------------------- agent reports


async def test_reports_go_to_the_leader_only(agents):
    _, b = agents
    err = await rpc_error(b.agent_stub.Report(pb.ReportRequest(node="b", inventory_json="{}")))
    assert (err.code(), err.details()) == (grpc.StatusCode.FAILED_PRECONDITION, "not the leader; leader is a")


async def test_a_repeated_inventory_is_reused_and_a_changed_one_is_validated_again(agents):
    a, _ = agents
    inv = simulated_host("n1", gpus=2, gpu_gib=80)
    raw = json.dumps(inv)
    reply = await a.agent_stub.Report(pb.ReportRequest(node="n1", inventory_json=raw))
    assert (reply.term, reply.leader_id) == (2, "a")
    first = a.coordinator.reports["n1"].inventory
    await a.agent_stub.Report(pb.ReportRequest(node="n1", inventory_json=raw))
    assert a.coordinator.reports["n1"].inventory is first  # not parsed again
    inv["gpus"][1]["memory_used"] = 10 * 2**30
    await a.agent_stub.Report(pb.ReportRequest(node="n1", inventory_json=json.dumps(inv)))
    assert a.coordinator.reports["n1"].inventory.gpus[1].memory_used == 10 * 2**30
    inv["gpus"][1]["memory_used"] = -1
    err = await rpc_error(a.agent_stub.Report(pb.ReportRequest(node="n1", inventory_json=json.dumps(inv))))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == ("report from 'n1': not a host inventory: gpus.1.memory_used: "
                             "Input should be greater than or equal to 0")
    assert a.coordinator.reports["n1"].inventory.gpus[1].memory_used == 10 * 2**30  # the last good one stays


async def test_a_report_returns_the_peer_restarts_for_that_host(agents, model):
    a, _ = agents
    split = write_tiny_llama_gguf(model.parent / "split.gguf", n_layers=8, hidden=256, ffn=512)
    await a.stub.Deploy(pb.DeployRequest(spec=pb.DeploymentSpec(name="split", model=str(split), runtime="llamabox",
                                                                 replicas=1, options=pb.RuntimeOptions(ctx_size=256))))
    (assignment,) = a.state.assignments_for("split")
    assert [p.host for p in assignment.plan.parts] == ["a", "b"]
    ep = assignment.endpoints[1]

    def rpc_part(pid: int) -> pb.Instance:
        return pb.Instance(instance_id=assignment.instance_id, deployment="split", part=1, host="b", role="rpc",
                           state="RUNNING", endpoint=f"{ep.address}:{ep.port}", pid=pid)

    inv_a = json.dumps(simulated_host("a", gpus=1, gpu_gib=0.272))
    inv_b = json.dumps(simulated_host("b", gpus=1, gpu_gib=0.272))
    await a.agent_stub.Report(pb.ReportRequest(node="b", inventory_json=inv_b, instances=[rpc_part(10)]))
    await a.agent_stub.Report(pb.ReportRequest(node="b", inventory_json=inv_b, instances=[rpc_part(11)]))
    reply = await a.agent_stub.Report(pb.ReportRequest(node="a", inventory_json=inv_a))
    assert [(r.address, r.port, r.reason) for r in reply.peer_restarts] == [
        ("127.0.0.1", ep.port, f"rpc part 1 of {assignment.instance_id} on b restarted (pid 10 -> 11)")]
    again = await a.agent_stub.Report(pb.ReportRequest(node="a", inventory_json=inv_a))
    assert list(again.peer_restarts) == []


# ---------------------------------------------------------------------- pure mappings


def test_errors_map_to_status_codes():
    assert status_for(InvalidInput("bad")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_for(InvalidInput("no deployment named 'x'")) == grpc.StatusCode.NOT_FOUND
    assert status_for(InvalidInput("deployment 'x' already exists")) == grpc.StatusCode.ALREADY_EXISTS
    assert status_for(Unplaceable(Diagnosis(message="0/1 hosts"))) == grpc.StatusCode.FAILED_PRECONDITION
    assert status_for(NotAvailable("no leader")) == grpc.StatusCode.UNAVAILABLE
    assert status_for(PeerError("stale")) == grpc.StatusCode.FAILED_PRECONDITION
    assert status_for(AgentdError("other")) == grpc.StatusCode.INTERNAL


class _Rpc(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str):
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize("code,kind", [
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidInput), (grpc.StatusCode.NOT_FOUND, InvalidInput),
    (grpc.StatusCode.ALREADY_EXISTS, InvalidInput), (grpc.StatusCode.FAILED_PRECONDITION, CannotPlace),
    (grpc.StatusCode.UNAVAILABLE, NotAvailable), (grpc.StatusCode.DEADLINE_EXCEEDED, NotAvailable),
    (grpc.StatusCode.INTERNAL, AgentdError)])
def test_the_client_turns_status_codes_into_agentd_errors(code, kind):
    err = error_from_rpc(_Rpc(code, "why"), "10.0.0.1:7070")
    assert type(err) is kind and "why" in str(err)


def test_spec_conversion_round_trips_and_names_nested_fields():
    msg = pb.DeploymentSpec(name="chat", model="/m.gguf", runtime="llamabox", replicas=2, strategy="spread",
                            selector={"pool": "a"}, pin=[pb.GpuPin(host="h", gpus=[0, 1])], exclude_gpus=["GPU-x"],
                            options=pb.RuntimeOptions(ctx_size=512, gpu_memory_utilization=0.8, extra_args=["-fa"],
                                                      env={"K": "V"}, allow_cpu_offload=True))
    if "tenant" in pb.DeploymentSpec.DESCRIPTOR.fields_by_name:
        msg.tenant = "default"
    assert spec_to_pb(spec_from_pb(msg)) == msg
    bad = pb.DeploymentSpec(name="chat", model="/m.gguf", runtime="llamabox", replicas=-2,
                            options=pb.RuntimeOptions(ctx_size=0, gpu_memory_utilization=0))
    with pytest.raises(InvalidInput) as err:
        spec_from_pb(bad)
    assert str(err.value) == ("deployment spec: replicas: Input should be greater than or equal to 0; "
                              "options.gpu_memory_utilization: Input should be greater than 0; "
                              "options.ctx_size: Input should be greater than or equal to 1")


def test_instance_messages_carry_every_field():
    from agentd.api.control import instance_from_pb

    m = pb.Instance(instance_id="x-r0-g1", deployment="x", replica=0, generation=1, part=1, host="h", gpus=[2],
                    role="rpc", state="RUNNING", reason="ok", restarts=3, endpoint="1.2.3.4:5", term=7, pid=99)
    assert instance_to_pb(instance_from_pb(m)) == m
