"""Cordon, uncordon and drain: the replicated records and the leader's decisions (no processes).

The same with real agents and a real llama-server, serving throughout, is in
tests/test_maintenance_e2e.py.
"""

from __future__ import annotations

import json

import pytest

from agentd.cluster.maintenance import Cordon
from agentd.cluster.state import (
    ClusterState,
    cordon_command,
    delete_command,
    deploy_command,
    promote_command,
    retire_command,
    surge_cancel_command,
    surge_command,
    uncordon_command,
)
from agentd.coordinator import InstanceReport
from agentd.errors import InvalidInput, PeerError, Unplaceable
from agentd.testing.coordinator_world import World, host, hosts_of, spec
from agentd.types import Assignment, Part, PartEndpoint, ReplicaPlan

# ---------------------------------------------------------------------- the records


def assignment(name: str, replica: int, generation: int, host_name: str, term: int = 1) -> Assignment:
    plan = ReplicaPlan(parts=(Part(host=host_name, gpus=(0,), role="main", layers=4, memory=(1,)),))
    return Assignment(deployment=name, replica=replica, generation=generation, term=term, model="/m.gguf",
                      runtime="llamabox", plan=plan,
                      endpoints=(PartEndpoint(host=host_name, address="127.0.0.1", port=40000 + generation),))


def state_with(name: str = "m", host_name: str = "a") -> ClusterState:
    st = ClusterState()
    st.cluster_format = 2
    a = assignment(name, 0, 1, host_name)
    s = spec(name, "/m.gguf")
    assert st.apply(1, 1, deploy_command(s, [a])).ok
    return st


def test_maintenance_ops_are_of_state_format_2():
    c = Cordon(host="a", drain=True)
    a = assignment("m", 0, 2, "b")
    for cmd in (cordon_command(c), uncordon_command("a", None), surge_command(a), promote_command(a),
                surge_cancel_command(a), retire_command(a)):
        assert json.loads(cmd)["v"] == 2
    assert "needs state format 2" in ClusterState().admit(cordon_command(c))  # a cluster still on 0.1.0


def test_a_cordon_is_recorded_updated_and_lifted_and_survives_a_snapshot():
    st = state_with()
    assert st.apply(2, 1, cordon_command(Cordon(host="a", reason="bios"))).ok
    assert st.apply(3, 1, cordon_command(Cordon(host="b", gpu=1))).ok
    assert st.apply(4, 1, cordon_command(Cordon(host="a", reason="bios", drain=True))).ok  # cordon, then drain
    assert st.cordons["a"].drain and st.cordons["a"].since_index == 2
    copy = ClusterState()
    copy.restore(st.snapshot())
    assert copy.cordons == st.cordons
    assert not st.apply(5, 1, uncordon_command("b", 0)).ok  # GPU 0 was never cordoned
    assert st.apply(6, 1, uncordon_command("b", 1)).ok and "b:1" not in st.cordons
    assert not st.apply(7, 1, json.dumps({"op": "cordon", "v": 2, "cordon": {"host": "a", "gpu": -1}}).encode()).ok


def test_a_surge_runs_beside_the_replica_until_promoted_and_the_old_one_is_then_wanted_nowhere():
    st = state_with()
    old = st.assignments[("m", 0)]
    new = assignment("m", 0, 2, "b")
    assert not st.apply(2, 1, surge_command(assignment("m", 0, 1, "b"))).ok  # not a newer generation
    assert st.apply(3, 1, surge_command(new)).ok
    assert [a.instance_id for a in st.assignments_on("a")] == [old.instance_id]
    assert [a.instance_id for a in st.assignments_on("b")] == [new.instance_id]
    assert [a.instance_id for a in st.incarnations_for("m")] == ["m-r0-g1", "m-r0-g2"]
    assert st.assignments_for("m") == [old]  # replica accounting: still one replica
    assert st.apply(4, 1, promote_command(new)).ok
    assert st.assignments_on("a") == [] and st.assignments[("m", 0)] == new and not st.surges
    # remembered as replaced (the leader books it while its host still runs it), though not in a snapshot
    assert st.replaced == {old.instance_id: old} and st.successor_of(old) == new
    restored = ClusterState()
    restored.restore(st.snapshot())
    assert restored.replaced == {} and restored.assignments == st.assignments


def test_surges_go_with_their_deployment_and_can_be_cancelled_or_retired():
    st = state_with()
    s = assignment("m", 0, 2, "b")
    st.apply(2, 1, surge_command(s))
    assert st.apply(3, 1, surge_cancel_command(s)).ok and not st.surges
    st.apply(4, 1, surge_command(s))
    assert st.apply(5, 1, delete_command("m")).ok and not st.surges and not st.assignments
    st = state_with()
    st.apply(2, 1, surge_command(s))
    assert st.apply(3, 1, retire_command(st.assignments[("m", 0)])).ok
    assert not st.assignments and not st.surges  # --force: stopped, unplaced


# ---------------------------------------------------------------------- the leader's decisions


async def on_a(w: World, models: dict[str, str]) -> Assignment:
    """Deploy m so that it lands on a (b cordoned meanwhile, so no pin holds it there), hosts marked up."""
    await w.coord.drains.cordon("b")
    await w.coord.deploy(spec("m", models["tiny"]))
    await w.coord.drains.uncordon("b")
    await w.coord.tick()
    (a,) = w.state.assignments_for("m")
    assert a.plan.parts[0].host == "a"
    return a


def running(a: Assignment) -> dict[str, list[InstanceReport]]:
    out: dict[str, list[InstanceReport]] = {}
    for i, p in enumerate(a.plan.parts):
        out.setdefault(p.host, []).append(InstanceReport(
            instance_id=a.instance_id, deployment=a.deployment, replica=a.replica, generation=a.generation, part=i,
            host=p.host, role=p.role, state="RUNNING"))
    return out


async def test_a_cordoned_host_or_gpu_gets_no_new_parts_and_the_diagnosis_says_so(placer, models):
    w = World(placer, [host("a"), host("b", gpus=2)]).start()
    await w.coord.drains.cordon("a", reason="bios update")
    await w.coord.drains.cordon("b:0")
    await w.coord.deploy(spec("one", models["tiny"]))
    (a,) = w.state.assignments_for("one")
    assert [(p.host, p.gpus) for p in a.plan.parts] == [("b", (1,))]
    await w.coord.drains.cordon("GPU-sim-b-1")  # by UUID
    with pytest.raises(Unplaceable) as err:
        await w.coord.deploy(spec("two", models["tiny"]))
    text = str(err.value)
    assert "2 GPUs cordoned (GPU-sim-b-0), 1 host cordoned (bios update)" in text
    await w.coord.drains.uncordon("a")
    await w.coord.deploy(spec("two", models["tiny"]))
    assert w.state.assignments_for("two")[0].plan.parts[0].host == "a"


async def test_bad_targets_are_clear_errors_and_change_nothing(placer, models):
    w = World(placer, [host("a")]).start()
    for bad, why in (("nosuch", "no host or GPU named 'nosuch'"), ("a:7", "host a has no GPU 7"),
                     ("", "name a host")):
        with pytest.raises(InvalidInput, match=why):
            await w.coord.drains.cordon(bad)
    with pytest.raises(InvalidInput, match="a is not cordoned"):
        await w.coord.drains.uncordon("a")
    w.clock.advance(31)
    await w.coord.tick()  # a was silent past the grace: down
    with pytest.raises(PeerError, match="host a is down"):
        await w.coord.drains.cordon("a", drain=True)
    assert not w.state.cordons and [p["op"] for p in w.raft.proposed] == ["node"]  # marked down


async def test_drain_starts_the_successor_first_and_stops_the_old_replica_only_once_it_runs(placer, models):
    w = World(placer, [host("a"), host("b")]).start()
    old = await on_a(w, models)
    w.report("a", instances=running(old))
    await w.coord.drains.cordon("a", drain=True)
    decisions = await w.coord.tick()
    assert any("gets a successor m-r0-g2 on b" in d for d in decisions)
    surge = w.state.surges[("m", 0)]
    assert w.coord.drains.remaining("a") == (1, "")
    assert await w.coord.tick() == []  # not running yet: the old one stays
    assert w.state.assignments_for("m") == [old]
    w.report("b", instances=running(surge))
    decisions = await w.coord.tick()
    assert decisions == ["m-r0-g2 on b is ready: it replaces m-r0-g1 on a"]
    assert w.state.assignments_for("m")[0].instance_id == "m-r0-g2" and not w.state.surges
    # a keeps the old one while it answers the requests it holds (agentd/agent/handoff.py): the drain is not
    # done until a no longer reports it
    assert w.coord.drains.remaining("a") == (1, "m-r0-g1 answers the requests it holds")
    w.report("a")
    assert w.coord.drains.remaining("a") == (0, "")


async def test_a_replaced_replica_that_still_answers_keeps_its_gpu_and_ports_booked(placer, models):
    """The old incarnation runs on after its promotion while it answers what it holds (agentd/agent/handoff.py):
    until its host stops reporting it, no new part goes onto its GPU or port, even with the cordon lifted."""
    w = World(placer, [host("a"), host("b"), host("c")]).start()
    old = await on_a(w, models)
    w.report("a", "b", "c", instances=running(old))
    await w.coord.drains.cordon("a", drain=True)
    await w.coord.tick()
    surge = w.state.surges[("m", 0)]
    w.report("a", "b", "c", instances={**running(old), **running(surge)})
    await w.coord.tick()
    assert w.state.assignments_for("m") == [surge] and old.instance_id in w.state.replaced
    await w.coord.drains.uncordon("a")
    await w.coord.deploy(spec("two", models["tiny"]))
    (two,) = w.state.assignments_for("two")
    assert hosts_of(two) == ["c"]
    assert two.endpoints[0].port not in {old.endpoints[0].port, surge.endpoints[0].port}  # one address: 127.0.0.1
    with pytest.raises(Unplaceable):  # a's GPU is still the old replica's
        await w.coord.deploy(spec("three", models["tiny"]))
    w.report("a", "b", "c", instances=running(surge))  # a stopped it
    await w.coord.deploy(spec("three", models["tiny"]))
    (three,) = w.state.assignments_for("three")
    assert hosts_of(three) == ["a"]


async def test_drain_without_room_waits_and_says_why_and_force_stops_the_replica(placer, models):
    w = World(placer, [host("a"), host("b", gpu_gib=0.01)]).start()
    old = await on_a(w, models)
    await w.coord.drains.cordon("a", drain=True)
    decisions = await w.coord.tick()
    assert len(decisions) == 1 and "m-r0-g1 waits: no room elsewhere" in decisions[0]
    left, why = w.coord.drains.remaining("a")
    assert left == 1 and "no room elsewhere" in why
    assert w.state.assignments_for("m") == [old]  # still serving
    await w.coord.drains.cordon("a", drain=True, force=True)
    w.clock.advance(6)
    decisions = await w.coord.tick()
    assert decisions and "stopped without a successor (--force)" in decisions[0]
    assert w.state.assignments_for("m") == [] and w.coord.drains.remaining("a") == (0, "")


async def test_uncordon_during_a_drain_cancels_the_successor_and_keeps_the_replica(placer, models):
    w = World(placer, [host("a"), host("b")]).start()
    await on_a(w, models)
    await w.coord.drains.cordon("a", drain=True)
    await w.coord.tick()
    assert w.state.surges
    await w.coord.drains.uncordon("a")
    assert await w.coord.tick() == ["m-r0-g2 cancelled: its replica is no longer drained"]
    assert not w.state.surges and w.state.assignments_for("m")[0].instance_id == "m-r0-g1"


async def test_a_failed_successor_is_dropped_and_tried_again_later(placer, models):
    w = World(placer, [host("a"), host("b")]).start()
    await on_a(w, models)
    await w.coord.drains.cordon("a", drain=True)
    await w.coord.tick()
    surge = w.state.surges[("m", 0)]
    failed = {"b": [InstanceReport(instance_id=surge.instance_id, deployment="m", replica=0, generation=2,
                                   part=0, host="b", role="main", state="FATAL", reason="exited 1")]}
    w.report("b", instances=failed)
    decisions = await w.coord.tick()
    assert decisions == ["m-r0-g2 failed (exited 1); m-r0-g1 keeps running, retried later"]
    assert "successor m-r0-g2 failed: exited 1" in w.coord.drains.remaining("a")[1]
    w.report("b")
    w.clock.advance(6)
    assert any("gets a successor m-r0-g3" in d for d in await w.coord.tick())


# ---------------------------------------------------------------------- nodes rm


async def test_a_removed_host_loses_its_replicas_at_once_and_never_comes_back_up(placer, models):
    w = World(placer, [host("a"), host("b")]).start()
    await on_a(w, models)
    await w.coord.drains.cordon("a:0")
    result, _, replicas = await w.coord.remove_node("a")
    assert result.ok and replicas == 1 and w.state.removed("a") and "a:0" not in w.state.cordons
    decisions = await w.coord.tick()
    assert any("re-placed from down host(s) a" in d for d in decisions)
    assert [p.host for p in w.state.assignments_for("m")[0].plan.parts] == ["b"]
    w.report("a")  # a report that slipped through: it is not marked up again
    assert not any("host a" in d for d in await w.coord.tick())
    assert not w.state.apply(w.raft.index + 1, 3, json.dumps({"op": "node", "name": "a", "state": "up"}).encode()).ok
    with pytest.raises(InvalidInput, match="removed already"):
        await w.coord.remove_node("a")
    with pytest.raises(InvalidInput, match="no host named 'zz'"):
        await w.coord.remove_node("zz")
    assert "a" not in {h.name for h in w.coord.live_hosts()}
