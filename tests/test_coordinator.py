"""The coordinator's decisions, driven without a network.

Consensus is a stand-in that applies each proposal at once to a real
ClusterState (what a one-node Raft does, minus the disk); placement and model
inspection are the real ones, on a tiny GGUF and simulated inventories. The
clock is injected, so grace periods pass in microseconds.

GPU sizes: the 4-layer tiny model needs about 0.253 GiB with its buffers, so a
0.272 GiB GPU holds exactly one replica; the 8-layer, hidden-256 model does
not fit one such GPU and is split main + rpc.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from agentd.cluster.state import NODE_DOWN, NODE_UP, ClusterState, node_command
from agentd.coordinator import InstanceReport, host_of
from agentd.errors import InvalidInput, NotAvailable, Unplaceable
from agentd.testing.coordinator_world import GRACE, World, host, hosts_of, spec
from agentd.types import Assignment, DeploymentSpec, RuntimeOptions


def endpoints(state: ClusterState) -> list[tuple[str, int]]:
    return [(ep.address, ep.port) for a in state.all_assignments() for ep in a.endpoints]


# ---------------------------------------------------------------------- deploy, scale, delete


async def test_deploy_places_and_commits_assignments_stamped_with_the_term(placer, models):
    w = World(placer, [host("a"), host("b"), host("c")]).start()
    result, index = await w.coord.deploy(spec("chat", models["tiny"], replicas=2, strategy="spread"))
    assert result.ok and result.message == "deployment chat created" and index == w.raft.index == 1
    assert [p["op"] for p in w.raft.proposed] == ["deploy"]
    a0, a1 = w.state.assignments_for("chat")
    assert (a0.replica, a0.generation, a0.term, a1.replica, a1.term) == (0, 1, 3, 1, 3)
    assert len({hosts_of(a0)[0], hosts_of(a1)[0]}) == 2  # spread: one per host
    assert [(ep.host, ep.address) for ep in a0.endpoints] == [(hosts_of(a0)[0], "127.0.0.1")]
    assert w.state.deployment("chat").spec.replicas == 2


async def test_deploy_of_an_existing_name_needs_replace_which_bumps_the_generation(placer, models):
    w = World(placer, [host("a"), host("b")]).start()
    await w.coord.deploy(spec("chat", models["tiny"]))
    with pytest.raises(InvalidInput, match="deployment 'chat' already exists"):
        await w.coord.deploy(spec("chat", models["tiny"]))
    assert len(w.raft.proposed) == 1
    w.raft.term = 4
    result, _ = await w.coord.deploy(spec("chat", models["tiny"], options=RuntimeOptions(ctx_size=128)), replace=True)
    assert result.message == "deployment chat updated"
    (a,) = w.state.assignments_for("chat")
    assert (a.generation, a.term, a.options.ctx_size) == (2, 4, 128)


async def test_scale_up_keeps_existing_replicas_and_scale_down_removes_the_highest(placer, models):
    w = World(placer, [host("a", gpus=2), host("b", gpus=2)]).start()
    await w.coord.deploy(spec("chat", models["tiny"]))
    (first,) = w.state.assignments_for("chat")
    w.raft.term = 5
    result, _ = await w.coord.scale("chat", 4)
    assert result.ok and w.state.deployment("chat").spec.replicas == 4
    four = w.state.assignments_for("chat")
    assert [a.replica for a in four] == [0, 1, 2, 3]
    assert four[0] == first  # untouched: same generation, same term, same ports
    assert all(a.term == 5 and a.generation == 1 for a in four[1:])
    # 4 GPUs of one replica each: a fifth replica does not fit, and nothing is proposed.
    proposed = len(w.raft.proposed)
    with pytest.raises(Unplaceable, match=r"^0/2 hosts can run chat \(llamabox\)"):
        await w.coord.scale("chat", 5)
    assert len(w.raft.proposed) == proposed and len(w.state.assignments_for("chat")) == 4
    await w.coord.scale("chat", 1)
    assert w.state.assignments_for("chat") == [first] and w.state.deployment("chat").spec.replicas == 1
    await w.coord.scale("chat", 0)
    assert w.state.assignments_for("chat") == [] and "chat" in w.state.deployments


async def test_scale_and_delete_refuse_bad_requests_without_proposing(placer, models):
    w = World(placer, [host("a")]).start()
    await w.coord.deploy(spec("chat", models["tiny"]))
    with pytest.raises(InvalidInput, match="replicas must be >= 0, got -1"):
        await w.coord.scale("chat", -1)
    with pytest.raises(InvalidInput, match="no deployment named 'nope'"):
        await w.coord.scale("nope", 2)
    with pytest.raises(InvalidInput, match="no deployment named 'nope'"):
        await w.coord.delete("nope")
    assert len(w.raft.proposed) == 1


async def test_delete_removes_the_deployment_and_frees_its_gpus_and_ports(placer, models):
    w = World(placer, [host("a")]).start()
    await w.coord.deploy(spec("one", models["tiny"]))
    port = w.state.assignments_for("one")[0].endpoints[0].port
    with pytest.raises(Unplaceable):
        await w.coord.deploy(spec("two", models["tiny"]))  # a's only GPU is taken
    result, _ = await w.coord.delete("one")
    assert result.message == "deployment one deleted" and w.state.all_assignments() == []
    await w.coord.deploy(spec("two", models["tiny"]))
    assert w.state.assignments_for("two")[0].endpoints[0].port == port


async def test_unplaceable_raises_the_diagnosis_and_proposes_nothing(placer, models):
    w = World(placer, [host("a"), host("b"), host("c")]).start()
    with pytest.raises(Unplaceable) as err:
        await w.coord.deploy(spec("big", models["tiny"], replicas=4))
    assert str(err.value).startswith("0/3 hosts can run big (llamabox) as replica 4 of 4: ")
    assert err.value.diagnosis.reasons  # the structured reasons travel with it
    assert w.raft.proposed == [] and w.state.deployments == {}


async def test_invalid_runtime_or_model_is_refused_before_placement(placer, models, tmp_path):
    w = World(placer, [host("a")]).start()
    with pytest.raises(InvalidInput, match=r"unknown runtime 'nope' \(available: "):
        await w.coord.deploy(DeploymentSpec(name="x", model=models["tiny"], runtime="nope"))
    with pytest.raises(InvalidInput, match=re.escape(str(tmp_path / "absent.gguf"))):
        await w.coord.deploy(spec("x", str(tmp_path / "absent.gguf")))
    assert w.raft.proposed == []


async def test_a_follower_decides_nothing(placer, models):
    w = World(placer, [host("a")]).start()
    w.raft.is_leader = False
    for call in (w.coord.deploy(spec("x", models["tiny"])), w.coord.scale("x", 1), w.coord.delete("x")):
        with pytest.raises(NotAvailable, match="not the coordinator"):
            await call
    assert await w.coord.tick() == [] and w.raft.proposed == []


# ---------------------------------------------------------------------- ports


async def test_ports_never_collide_on_one_address_and_are_reused_across_addresses(placer, models):
    # a and b share one machine (127.0.0.1), c and d another (10.0.0.3): one GPU each.
    w = World(placer, [host("a"), host("b"), host("c", "10.0.0.3:7070"), host("d", "10.0.0.3:7070")],
              port_range=(40000, 40010)).start()
    await w.coord.deploy(spec("chat", models["tiny"], replicas=4, strategy="spread"))
    by_host = {a.endpoints[0].host: (a.endpoints[0].address, a.endpoints[0].port)
               for a in w.state.assignments_for("chat")}
    assert sorted(by_host) == ["a", "b", "c", "d"]
    assert {by_host["a"][1], by_host["b"][1]} == {by_host["c"][1], by_host["d"][1]} == {40000, 40001}
    assert by_host["c"][0] == by_host["d"][0] == "10.0.0.3"
    # Churn: shrink, replace (new ports while the old ones are still assigned), add a two-part replica.
    await w.coord.scale("chat", 2)
    await w.coord.deploy(spec("chat", models["tiny"], replicas=2, strategy="spread"), replace=True)
    await w.coord.deploy(spec("split", models["split"]))
    split = w.state.assignments_for("split")[0]
    assert len(split.endpoints) == 2
    eps = endpoints(w.state)
    assert len(eps) == 4 and len(set(eps)) == 4
    assert all(40000 <= port <= 40010 for _, port in eps)


async def test_no_free_port_is_not_available_and_nothing_is_proposed(placer, models):
    w = World(placer, [host("a", gpus=2), host("b", gpus=2)], port_range=(40000, 40002)).start()
    await w.coord.deploy(spec("chat", models["tiny"], replicas=3))
    with pytest.raises(NotAvailable, match=r"no free port left in 40000-40002 on 127\.0\.0\.1"):
        await w.coord.scale("chat", 4)
    assert len(w.state.assignments_for("chat")) == 3 and len(w.raft.proposed) == 1


def test_host_of_strips_the_port_and_brackets():
    assert host_of("10.0.0.3:7070") == "10.0.0.3"
    assert host_of("[::1]:7070") == "::1"
    assert host_of("gpu-3") == "gpu-3"
    assert host_of(":7070") == "127.0.0.1"


# ---------------------------------------------------------------------- liveness and re-placement


async def test_a_silent_host_is_marked_down_after_the_grace_and_its_replica_re_placed(placer, models):
    w = World(placer, [host("a"), host("b"), host("c")]).start()
    await w.coord.deploy(spec("chat", models["tiny"], replicas=2, strategy="spread"))
    assert await w.coord.tick() == [  # everyone reports: marked up once, nothing else
        "host a reporting: marked up", "host b reporting: marked up", "host c reporting: marked up"]
    victim = next(a for a in w.state.assignments_for("chat"))
    (dead,) = hosts_of(victim)
    alive = [n for n in "abc" if n != dead]
    survivor = next(a for a in w.state.assignments_for("chat") if a.replica != victim.replica)

    w.clock.advance(GRACE)  # exactly the grace: not yet
    w.report(*alive)
    assert await w.coord.tick() == []
    w.clock.advance(1.5)
    w.report(*alive)
    w.raft.term = 7
    decisions = await w.coord.tick()
    moved = next(a for a in w.state.assignments_for("chat") if a.replica == victim.replica)
    assert decisions == [
        f"host {dead} silent for {GRACE + 1.5:.1f}s (> {GRACE:g}s): marked down",
        f"chat-r{victim.replica}-g1 re-placed from down host(s) {dead} as chat-r{victim.replica}-g2 on "
        f"{hosts_of(moved)[0]}"]
    assert w.state.nodes[dead].state == NODE_DOWN
    assert hosts_of(moved)[0] in alive and hosts_of(moved)[0] not in hosts_of(survivor)
    assert (moved.generation, moved.term) == (2, 7)
    assert w.state.assignments_for("chat")[survivor.replica] == survivor  # the healthy one did not move
    assert await w.coord.tick() == []  # done: nothing left on the down host

    # It comes back: marked up, and the replica stays where it was re-placed.
    w.report(dead)
    assert await w.coord.tick() == [f"host {dead} reporting: marked up"]
    assert w.state.nodes[dead].state == NODE_UP
    assert next(a for a in w.state.assignments_for("chat") if a.replica == victim.replica) == moved


async def test_a_replica_that_cannot_be_re_placed_waits_a_grace_before_the_next_try(placer, models):
    w = World(placer, [host("a"), host("b")]).start()
    await w.coord.deploy(spec("chat", models["tiny"], replicas=2))  # both GPUs taken
    await w.coord.tick()
    before = w.state.all_assignments()
    proposed = len(w.raft.proposed)
    w.clock.advance(GRACE + 1)
    w.report("a")
    decisions = await w.coord.tick()
    r_b = next(a for a in before if hosts_of(a) == ["b"])
    assert decisions[0] == f"host b silent for {GRACE + 1:.1f}s (> {GRACE:g}s): marked down"
    assert decisions[1].startswith(f"{r_b.instance_id} on down host(s) b cannot be re-placed: 0/1 hosts can run")
    assert len(w.raft.proposed) == proposed + 1  # the node entry only
    w.clock.advance(1)
    w.report("a")
    assert await w.coord.tick() == []  # no retry before another grace
    w.clock.advance(GRACE)
    w.report("a")
    assert (await w.coord.tick())[0].startswith(f"{r_b.instance_id} on down host(s) b cannot be re-placed")
    assert w.state.all_assignments() == before


async def test_a_new_leader_gives_every_host_a_fresh_grace_and_moves_nothing(placer, models):
    w = World(placer, [host("a"), host("b"), host("c")]).start()
    await w.coord.deploy(spec("chat", models["tiny"], replicas=3, strategy="spread"))
    await w.coord.tick()
    before = w.state.all_assignments()
    proposed = len(w.raft.proposed)

    # Leadership moves away for a long time: heartbeats go to the other leader, this one hears nothing.
    w.coord.lost_leadership()
    w.raft.is_leader = False
    w.clock.advance(10 * GRACE)
    assert await w.coord.tick() == []
    # ... and comes back (a higher term). Its soft state is 300 s old, but hosts get a full grace from now.
    w.raft.is_leader, w.raft.term = True, 9
    w.coord.became_leader()
    assert await w.coord.tick() == []
    w.clock.advance(GRACE - 1)
    w.report("a", "b")  # c stays silent
    assert await w.coord.tick() == []
    assert w.state.all_assignments() == before and len(w.raft.proposed) == proposed
    w.clock.advance(2)
    w.report("a", "b")
    assert (await w.coord.tick())[0] == f"host c silent for {GRACE + 1:.1f}s (> {GRACE:g}s): marked down"


async def test_an_agent_elected_with_no_soft_state_moves_nothing_while_hosts_report(placer, models):
    """The replicated state moves to a freshly elected agent; its coordinator never heard a heartbeat."""
    w = World(placer, [host("a"), host("b"), host("c")]).start()
    await w.coord.deploy(spec("chat", models["tiny"], replicas=3, strategy="spread"))
    await w.coord.tick()
    before = w.state.all_assignments()
    w.raft.term = 4
    new = w.new_coordinator(placer)
    w.coord = new
    new.became_leader()
    for _ in range(int(GRACE) * 2):  # a minute of heartbeats and ticks
        w.clock.advance(1)
        w.report()
        assert await new.tick() == []
    assert w.state.all_assignments() == before


async def test_a_host_that_never_reports_to_a_new_leader_is_marked_down_after_the_grace(placer, models):
    """It may have died together with the old leader: it is in the state, but not in this leader's reports."""
    w = World(placer, [host("a"), host("b"), host("c")]).start()
    await w.coord.deploy(spec("chat", models["tiny"], replicas=1, pin=({"host": "c"},)))
    await w.coord.tick()
    new = w.new_coordinator(placer)
    new.became_leader()
    w.clock.advance(GRACE + 0.5)
    new.on_report(w.hosts["a"], [])
    new.on_report(w.hosts["b"], [])
    decisions = await new.tick()
    assert decisions[0] == f"host c silent for {GRACE + 0.5:.1f}s (> {GRACE:g}s): marked down"
    # Pinned to c, so it cannot move; the diagnosis says why.
    assert decisions[1].startswith("chat-r0-g1 on down host(s) c cannot be re-placed: 0/2 hosts can run chat")
    assert w.state.nodes["c"].state == NODE_DOWN


async def test_a_down_host_is_left_out_of_placement(placer, models):
    w = World(placer, [host("a"), host("b")]).start()
    await w.raft.propose(node_command("b", NODE_DOWN, "127.0.0.1:7070"))
    assert [h.name for h in w.coord.live_hosts()] == ["a"]
    await w.coord.deploy(spec("chat", models["tiny"]))
    with pytest.raises(Unplaceable, match=r"^0/1 hosts can run"):
        await w.coord.deploy(spec("more", models["tiny"]))


async def test_a_fresh_leader_waits_for_known_hosts_before_placing(placer, models):
    w = World(placer, [host("a"), host("b")]).start()
    await w.coord.tick()  # a and b are known (up) in the replicated state
    new = w.new_coordinator(placer)
    new.became_leader()
    new.on_report(w.hosts["a"], [])
    task = asyncio.create_task(new.deploy(spec("chat", models["tiny"], replicas=2)))
    await asyncio.sleep(0.1)
    assert not task.done()  # b's GPU is not known to this leader yet: placing now would fail
    new.on_report(w.hosts["b"], [])
    result, _ = await asyncio.wait_for(task, 5)
    assert result.ok and sorted(hosts_of(a)[0] for a in w.state.assignments_for("chat")) == ["a", "b"]


async def test_a_call_between_winning_the_vote_and_taking_over_waits_for_the_take_over(placer, models):
    """Raft says "leader" before the daemon has told the coordinator; placing then would see no hosts at all."""
    w = World(placer, [host("a")]).start()
    w.coord.lost_leadership()
    task = asyncio.create_task(w.coord.deploy(spec("chat", models["tiny"])))
    await asyncio.sleep(0.1)
    assert not task.done() and w.raft.proposed == []
    w.coord.became_leader()
    w.report("a")
    result, _ = await asyncio.wait_for(task, 1)
    assert result.ok and hosts_of(w.state.assignments_for("chat")[0]) == ["a"]


async def test_a_fresh_leader_does_not_wait_for_a_dead_host_when_the_reporting_ones_suffice(placer, models):
    """The old leader's host never reports to the new one; a deploy that fits elsewhere goes through at once."""
    w = World(placer, [host("a"), host("b"), host("c")]).start()
    await w.coord.tick()
    new = w.new_coordinator(placer)
    new.became_leader()
    new.on_report(w.hosts["b"], [])  # a died with the old leader; c has not reported yet
    assert not new.heard_from_known_hosts()
    result, _ = await asyncio.wait_for(new.deploy(spec("chat", models["tiny"])), 1)  # the clock stands still
    assert result.ok and hosts_of(w.state.assignments_for("chat")[0]) == ["b"]
    # Unplaceable on what was heard so far: retried until the wait is over, then the full diagnosis.
    task = asyncio.create_task(new.deploy(spec("more", models["tiny"])))
    await asyncio.sleep(0.1)
    assert not task.done()
    w.clock.advance(2.5)
    with pytest.raises(Unplaceable, match=r"^0/1 hosts can run more"):
        await asyncio.wait_for(task, 1)


async def test_reports_from_an_earlier_spell_as_leader_do_not_count_as_fresh(placer, models):
    w = World(placer, [host("a"), host("b")]).start()
    await w.coord.tick()
    w.coord.lost_leadership()
    w.clock.advance(100)
    w.coord.became_leader()  # it still holds a's and b's 100 s old inventories
    task = asyncio.create_task(w.coord.wait_for_reports())
    await asyncio.sleep(0.1)
    assert not task.done()
    w.report("a", "b")
    await asyncio.wait_for(task, 5)


# ---------------------------------------------------------------------- peer restarts


def part_report(a: Assignment, part: int, state: str, pid: int) -> InstanceReport:
    p, ep = a.plan.parts[part], a.endpoints[part]
    return InstanceReport(instance_id=a.instance_id, deployment=a.deployment, replica=a.replica,
                          generation=a.generation, part=part, host=p.host, role=p.role, state=state,
                          endpoint=f"{ep.address}:{ep.port}", term=a.term, pid=pid, gpus=p.gpus)


async def test_a_restarted_rpc_part_is_passed_to_the_main_host(placer, models):
    w = World(placer, [host("a"), host("b")]).start()
    await w.coord.deploy(spec("split", models["split"]))
    (a,) = w.state.assignments_for("split")
    assert [(p.host, p.role) for p in a.plan.parts] == [("a", "main"), ("b", "rpc")]
    ep = a.endpoints[1]

    def report_b(state: str, pid: int) -> None:
        w.report("b", instances={"b": [part_report(a, 1, state, pid)]})

    report_b("STARTING", 0)
    report_b("RUNNING", 100)
    report_b("RUNNING", 100)
    assert w.coord.take_peer_restarts("a") == []
    # Killed and restarted: BACKOFF and PENDING carry no pid; the next pid differs from the last one seen.
    report_b("BACKOFF", 0)
    report_b("PENDING", 0)
    report_b("RUNNING", 200)
    assert w.coord.take_peer_restarts("b") == []  # the host that restarted it already knows
    assert w.coord.take_peer_restarts("a") == [
        ("127.0.0.1", ep.port, f"rpc part 1 of {a.instance_id} on b restarted (pid 100 -> 200)")]
    assert w.coord.take_peer_restarts("a") == []  # taken once
    report_b("RUNNING", 200)
    assert w.coord.take_peer_restarts("a") == []


async def test_a_pid_seen_under_a_previous_leader_is_not_a_restart(placer, models):
    w = World(placer, [host("a"), host("b")]).start()
    await w.coord.deploy(spec("split", models["split"]))
    (a,) = w.state.assignments_for("split")
    w.report("b", instances={"b": [part_report(a, 1, "RUNNING", 100)]})
    w.coord.lost_leadership()
    w.coord.became_leader()
    w.report("b", instances={"b": [part_report(a, 1, "RUNNING", 100)]})
    assert w.coord.take_peer_restarts("a") == []


def test_instances_lists_every_hosts_reports_sorted(placer, models):
    w = World(placer, [host("a"), host("b")])
    fake = Assignment.model_validate({
        "deployment": "d", "replica": 0, "term": 1, "model": "m", "runtime": "llamabox",
        "plan": {"parts": [{"host": "a", "role": "main"}, {"host": "b", "role": "rpc"}]},
        "endpoints": [{"host": "a", "address": "127.0.0.1", "port": 1}, {"host": "b", "address": "127.0.0.1",
                                                                          "port": 2}]})
    w.report("b", instances={"b": [part_report(fake, 1, "RUNNING", 7)]})
    w.report("a", instances={"a": [part_report(fake, 0, "STARTING", 0)]})
    assert [(i.host, i.part, i.state) for i in w.coord.instances()] == [("a", 0, "STARTING"), ("b", 1, "RUNNING")]
    assert w.coord.instances("other") == []


async def test_the_coordinator_pauses_the_cyclic_collector_while_it_places(placer, models):
    """The placement core leaves the garbage collector alone (tests/test_layering.py); its caller pauses it,
    so a placement's short-lived objects never trigger a walk of the leader's whole heap."""
    import gc

    seen: list[bool] = []

    def recording(*args, **kw):
        seen.append(gc.isenabled())
        return placer(*args, **kw)

    recording.plugins = placer.plugins
    w = World(placer, [host("a")]).start()
    w.coord = w.new_coordinator(recording)
    w.start()
    assert gc.isenabled()
    result, _ = await w.coord.deploy(spec("chat", models["tiny"]))
    assert result.ok and seen == [False] and gc.isenabled()
