"""Replicas by load (issue 21 item 4) without processes: the pure decision (agentd/autoscale.py), the spec's
bounds, the replicated ops, and the coordinator acting on reports. With real agents and llama-server:
tests/test_autoscale_e2e.py."""

from __future__ import annotations

import asyncio
import json

import pytest

from agentd import autoscale
from agentd.api.activity import activity_from_pb, activity_to_pb
from agentd.autoscale import (
    DOWN,
    UP,
    DeploymentActivity,
    Memory,
    Observation,
    Policy,
    ReplicaReading,
    decide,
    deployment_queue,
    least_loaded,
)
from agentd.cluster.state import (
    OP_SINCE,
    ClusterState,
    bounds_command,
    deploy_command,
    replica_leave_command,
    replica_remove_command,
)
from agentd.coordinator import InstanceReport
from agentd.errors import InvalidInput
from agentd.testing.coordinator_world import World, host, spec
from agentd.types import DeploymentSpec

P = Policy(min_replicas=1, max_replicas=4, target_queue=2.0, up_after=10, down_after=30, cooldown=20)


def run(policy: Policy, steps: list[tuple[float, int, float, bool]]) -> list[autoscale.Decision]:
    """Feed (time, replicas, queue, fresh) observations through decide, carrying its memory."""
    memory, out = Memory(), []
    for now, n, queue, fresh in steps:
        d = decide(policy, Observation(n, queue, fresh=fresh), memory, now, "m")
        memory = d.memory
        out.append(d)
    return out


# ---------------------------------------------------------------------- the pure decision


def test_scales_up_only_after_the_queue_stayed_above_target_for_the_window():
    ds = run(P, [(0, 1, 5, True), (5, 1, 5, True), (9.9, 1, 5, True), (10, 1, 5, True)])
    assert [d.direction for d in ds] == ["", "", "", UP]
    assert ds[-1].desired == 3 and ds[-1].reason == "queue"  # ceil(5 / 2)
    assert "scale 1 -> 3" in ds[-1].sentence and ds[-1].sentence.startswith("deployment m:")


def test_a_dip_below_target_restarts_the_up_window():
    ds = run(P, [(0, 1, 5, True), (6, 1, 1, True), (12, 1, 5, True), (21, 1, 5, True), (22, 1, 5, True)])
    assert [d.direction for d in ds] == ["", "", "", "", UP]


def test_hysteresis_a_queue_between_half_and_the_target_changes_nothing():
    ds = run(P, [(t, 3, 3 * 1.5, True) for t in range(0, 200, 10)])  # 1.5 per replica: below 2, above 1
    assert not any(d.change for d in ds)
    assert "steady" in ds[-1].sentence


def test_scales_down_by_one_after_the_longer_window_well_below_target():
    ds = run(P, [(0, 3, 0, True), (29, 3, 0, True), (30, 3, 0, True)])
    assert [d.direction for d in ds] == ["", "", DOWN]
    assert ds[-1].desired == 2 and ds[-1].reason == "queue"


def test_cool_down_after_a_change_holds_the_next_one():
    memory = Memory(last_change=100.0)
    up = decide(P, Observation(2, 20), Memory(above_since=50.0, last_change=100.0), 110.0)
    assert not up.change and "cooling down" in up.sentence
    up = decide(P, Observation(2, 20), Memory(above_since=50.0, last_change=100.0), 120.0)
    assert up.direction == UP and up.memory.last_change == 120.0 and up.memory.above_since is None
    down = decide(P, Observation(3, 0), Memory(below_since=0.0, last_change=100.0), 119.0)
    assert not down.change and "cooling down" in down.sentence
    assert decide(P, Observation(3, 0), Memory(below_since=0.0, last_change=100.0), 120.0).direction == DOWN
    assert memory.above_since is None


def test_bounds_never_below_min_never_above_max_and_corrected_at_once():
    assert decide(P, Observation(4, 100), Memory(above_since=0.0), 1000.0).desired == 4  # at max: stays
    assert "at max_replicas 4" in decide(P, Observation(4, 100), Memory(above_since=0.0), 1000.0).sentence
    capped = decide(P, Observation(2, 100), Memory(above_since=0.0), 1000.0)
    assert capped.direction == UP and capped.desired == 4
    p2 = Policy(min_replicas=2, max_replicas=4, target_queue=2.0, down_after=0, cooldown=0)
    assert not decide(p2, Observation(2, 0), Memory(below_since=0.0), 1000.0).change, "never below min"
    low = decide(p2, Observation(1, 0), Memory(last_change=999.0), 1000.0)
    assert (low.direction, low.desired, low.reason) == (UP, 2, "bounds"), "no window, no cool-down"
    high = decide(Policy(1, 2, 1.0), Observation(3, 100), Memory(last_change=999.0), 1000.0)
    assert (high.direction, high.desired, high.reason) == (DOWN, 2, "bounds")


def test_the_last_replica_is_never_removed_by_load_even_with_min_zero():
    p0 = Policy(min_replicas=0, max_replicas=3, target_queue=1.0, down_after=0, cooldown=0)
    assert not decide(p0, Observation(1, 0), Memory(below_since=0.0), 1000.0).change


def test_stale_reports_block_scale_down_and_restart_its_window_but_not_scale_up():
    # A partitioned proxy may be sending traffic nobody here sees: no scale-down on a guess.
    ds = run(P, [(0, 3, 0, True), (25, 3, 0, False), (31, 3, 0, True), (60, 3, 0, True), (61, 3, 0, True)])
    assert [d.direction for d in ds] == ["", "", "", "", DOWN]
    assert "late" in ds[1].sentence
    stale = decide(P, Observation(3, 0, fresh=False, stale_hosts=("b",)), Memory(), 0.0)
    assert "from b" in stale.sentence
    # What is missing can only add to the queue: a late report never holds a scale-up back.
    ds = run(P, [(0, 1, 5, False), (10, 1, 5, False)])
    assert ds[-1].direction == UP


def test_bad_input_is_a_clear_error():
    for bad in ({"min_replicas": 3, "max_replicas": 2, "target_queue": 1}, {"min_replicas": 0, "max_replicas": 0,
                                                                            "target_queue": 1},
                {"min_replicas": 1, "max_replicas": 2, "target_queue": 0},
                {"min_replicas": 1, "max_replicas": 2, "target_queue": 1, "down_ratio": 1.0}):
        with pytest.raises(ValueError):
            Policy(**bad)
    with pytest.raises(ValueError, match="must be >= 0"):
        decide(P, Observation(-1, 0), Memory(), 0.0)
    with pytest.raises(ValueError):
        least_loaded({})


def test_queue_counts_each_request_once_whichever_side_sees_it():
    a = DeploymentActivity(in_flight=3, replicas={"m-r0-g1": ReplicaReading(outstanding=2, running=2, capacity=4),
                                                  "m-r1-g1": ReplicaReading(outstanding=1, running=1)})
    b = DeploymentActivity(in_flight=1, replicas={"m-r0-g1": ReplicaReading(outstanding=1, running=3, waiting=2)})
    ids = {"m-r0-g1", "m-r1-g1"}
    # r0: proxies say 2 + 1 = 3, the server says 3 running + 2 waiting = 5 (2 sent past the proxies): 5.
    assert autoscale.replica_queue([a.replicas["m-r0-g1"], b.replicas["m-r0-g1"]]) == 5
    assert deployment_queue([a, b], ids) == 5 + 1
    assert deployment_queue([a, b], {"m-r1-g1"}) == 4, "a removed replica's reading is not counted; in-flight is"
    held = DeploymentActivity(in_flight=7, held=7)  # every request held (waking, or every replica full)
    assert deployment_queue([held], ids) == 7
    assert least_loaded({0: 3, 1: 0, 2: 0}) == 2, "fewest waiting; the newest among equals"


def test_activity_round_trips_through_the_report_message():
    report = {"m": DeploymentActivity(idle_seconds=1.5, in_flight=2, held=1,
                                      replicas={"m-r0-g1": ReplicaReading(1, 2, 3, 4)})}
    assert activity_from_pb(activity_to_pb(report)) == report


# ---------------------------------------------------------------------- the spec and the replicated ops


def test_spec_bounds_are_one_model_with_idle_unload():
    base = {"name": "m", "model": "/m.gguf", "runtime": "llamabox"}
    ok = DeploymentSpec(**base, min_replicas=1, max_replicas=3, target_queue=1)
    assert ok.autoscaled
    zero = DeploymentSpec(**base, min_replicas=0, max_replicas=3, target_queue=1, idle_unload=60)
    assert zero.min_replicas == 0
    for bad, why in (({"min_replicas": 0, "max_replicas": 3, "target_queue": 1}, "needs idle_unload"),
                     ({"max_replicas": 3, "target_queue": 1, "idle_unload": 60}, "means min_replicas 0"),
                     ({"max_replicas": 3}, "target_queue > 0"),
                     ({"min_replicas": 4, "max_replicas": 3, "target_queue": 1}, "above max_replicas"),
                     ({"target_queue": 1}, "need max_replicas")):
        with pytest.raises(ValueError, match=why):
            DeploymentSpec(**base, **bad)
    # Versioning: absent while default (an older reader sees what it knows); format 2 when set.
    plain = DeploymentSpec(**base)
    assert not {"min_replicas", "max_replicas", "target_queue"} & set(json.loads(deploy_command(plain, []))["spec"])
    assert json.loads(deploy_command(plain, []))["v"] == 1
    assert json.loads(deploy_command(ok, []))["v"] == 2


def test_new_ops_are_format_2():
    for op in ("replica.leave", "replica.remove", "deployment.bounds"):
        assert OP_SINCE[op] == 2
    assert json.loads(bounds_command("m", 1, 2))["v"] == 2


def _report_running(w: World) -> None:
    running: dict[str, list[InstanceReport]] = {}
    for a in w.state.incarnations():
        for k, p in enumerate(a.plan.parts):
            running.setdefault(p.host, []).append(InstanceReport(
                instance_id=a.instance_id, deployment=a.deployment, replica=a.replica, generation=a.generation,
                part=k, host=p.host, role=p.role, state="RUNNING"))
    w.report(instances=running)


def _load(w: World, per_host: dict[str, dict[int, int]], name: str = "m") -> None:
    """Each host's proxy reports `outstanding` requests on replica index -> n (and nothing else)."""
    by_index = {a.replica: a.instance_id for a in w.state.assignments_for(name)}
    for h in w.hosts:
        loads = per_host.get(h, {})
        w.coord.on_activity(h, {name: DeploymentActivity(
            in_flight=sum(loads.values()),
            replicas={by_index[r]: ReplicaReading(outstanding=n) for r, n in loads.items() if r in by_index})})


def _tick(w: World) -> list[str]:
    _report_running(w)
    return [d for d in asyncio.run(w.coord.tick()) if d.startswith("deployment")]


def _autoscaled(w: World, models: dict, **kw) -> None:
    kw.setdefault("min_replicas", 1)
    kw.setdefault("max_replicas", 3)
    kw.setdefault("target_queue", 1.0)
    asyncio.run(w.coord.deploy(spec("m", models["tiny"], **kw)))


def test_coordinator_scales_up_then_drains_the_least_loaded_replica_down(placer, models):
    w = World(placer, [host("a"), host("b"), host("c")]).start()
    w.coord.autoscale_windows = (2.0, 4.0, 3.0)  # up_after, down_after, cooldown
    w.coord.scale_down_timeout = 30.0
    _autoscaled(w, models)
    assert len(w.state.assignments_for("m")) == 1 and w.state.deployment("m").spec.replicas == 1
    _load(w, {"a": {0: 3}})
    assert not _tick(w)
    w.clock.advance(2.0)
    _load(w, {"a": {0: 3}})
    ups = _tick(w)
    assert len(ups) == 1 and "scale 1 -> 3" in ups[0], ups
    assert sorted(a.replica for a in w.state.assignments_for("m")) == [0, 1, 2]
    assert w.state.deployment("m").spec.replicas == 3
    # The load stops, except one request still answered by replica 0 and one by replica 2.
    for _ in range(3):
        w.clock.advance(1.5)
        _load(w, {"a": {0: 1}, "b": {2: 0}})
        assert not _tick(w)
    w.clock.advance(1.5)
    _load(w, {"a": {0: 1}})
    downs = _tick(w)
    assert len(downs) == 1 and "m-r2-g1 (0 waiting) takes no new requests" in downs[0], downs
    victim = next(iter(w.state.leaving))
    assert victim == ("m", 2), "the least-loaded replica leaves (the newest of equals), not the busy one"
    assert len(w.state.assignments_for("m")) == 3, "it keeps serving what it has until that is answered"
    # Its requests answered and every proxy heard since: removed.
    w.clock.advance(0.5)
    _load(w, {"a": {0: 1}})
    removed = _tick(w)
    assert any("removed (its requests answered)" in d for d in removed), removed
    assert not w.state.leaving and len(w.state.assignments_for("m")) == 2
    assert w.state.deployment("m").spec.replicas == 2
    # Indices may have gaps now; the next scale-up takes the lowest free one.
    gap = ({0, 1, 2} - {a.replica for a in w.state.assignments_for("m")}).pop()
    w.clock.advance(10)
    _load(w, {"a": {0: 9}})
    _tick(w)
    w.clock.advance(2.0)
    _load(w, {"a": {0: 9}})
    _tick(w)
    assert gap in {a.replica for a in w.state.assignments_for("m")}


def test_a_leaving_replica_with_requests_stops_after_the_timeout(placer, models):
    w = World(placer, [host("a"), host("b")]).start()
    w.coord.autoscale_windows = (0.0, 0.0, 0.0)
    w.coord.scale_down_timeout = 5.0
    _autoscaled(w, models, replicas=2)
    assert len(w.state.assignments_for("m")) == 2
    _load(w, {"a": {1: 1}})
    assert not _tick(w), "1 request on 2 replicas is 0.5 each: not below half of target 1"
    _load(w, {})
    w.clock.advance(1.0)
    assert any("takes no new requests" in d for d in _tick(w))
    leaving = w.state.assignments[next(iter(w.state.leaving))]
    _load(w, {"a": {leaving.replica: 1}})  # a long generation still running there
    w.clock.advance(1.0)
    assert not any("removed" in d for d in _tick(w))
    w.clock.advance(5.0)
    _load(w, {"a": {leaving.replica: 1}})
    assert any("still 1 request(s) on it after 5s" in d for d in _tick(w))
    assert len(w.state.assignments_for("m")) == 1


def test_a_partitioned_proxy_blocks_scale_down(placer, models):
    w = World(placer, [host("a"), host("b")]).start()
    w.coord.autoscale_windows = (0.0, 1.0, 0.0)
    _autoscaled(w, models, replicas=2)
    _load(w, {})
    _tick(w)
    w.clock.advance(6.0)  # b's proxy falls silent past idle_report_max_age; a's keeps reporting nothing
    w.coord.on_activity("a", {"m": DeploymentActivity()})
    assert not _tick(w)
    assert "reports are late from b" in w.coord.last_decisions["m"]
    assert not w.state.leaving


def test_scale_refuses_a_count_and_takes_bounds(placer, models):
    w = World(placer, [host("a"), host("b"), host("c")]).start()
    w.coord.autoscale_windows = (100.0, 100.0, 100.0)
    _autoscaled(w, models)
    with pytest.raises(InvalidInput, match="--min-replicas N --max-replicas M"):
        asyncio.run(w.coord.scale("m", 3))
    with pytest.raises(InvalidInput, match="above max_replicas"):
        asyncio.run(w.coord.set_bounds("m", 3, 2))
    asyncio.run(w.coord.set_bounds("m", 2, None))
    assert (w.state.deployment("m").spec.min_replicas, w.state.deployment("m").spec.max_replicas) == (2, 3)
    ups = _tick(w)
    assert any("below min_replicas 2" in d for d in ups), "bounds apply at once, no window"
    assert len(w.state.assignments_for("m")) == 2
    asyncio.run(w.coord.deploy(spec("fixed", models["tiny"])))
    with pytest.raises(InvalidInput, match="fixed number of replicas"):
        asyncio.run(w.coord.set_bounds("fixed", 1, 2))


def test_leave_and_remove_are_replicated_and_survive_a_snapshot(placer, models):
    w = World(placer, [host("a"), host("b")]).start()
    _autoscaled(w, models, replicas=2)
    a = w.state.assignments_for("m")[0]
    assert asyncio.run(w.raft.propose(replica_leave_command(a))).ok
    assert w.state.is_leaving(a)
    again = asyncio.run(w.raft.propose(replica_leave_command(a)))
    assert not again.ok and "leaving already" in again.message
    copy = ClusterState()
    copy.restore(w.state.snapshot())
    assert copy.leaving == w.state.leaving
    assert "leaving" not in json.loads(ClusterState().snapshot())
    assert asyncio.run(w.raft.propose(replica_remove_command(a))).ok
    assert [x.replica for x in w.state.assignments_for("m")] == [1] and not w.state.leaving
    # A replica of a deployment with a fixed count is not the autoscaler's to remove.
    asyncio.run(w.coord.deploy(spec("fixed", models["tiny"])))
    fixed = w.state.assignments_for("fixed")[0]
    assert not asyncio.run(w.raft.propose(replica_remove_command(fixed))).ok


def test_min_zero_is_the_idle_unload_and_a_wake_places_one_replica(placer, models):
    from agentd.cluster.state import idle_command

    w = World(placer, [host("a"), host("b"), host("c")]).start()
    w.coord.autoscale_windows = (0.0, 100.0, 0.0)
    _autoscaled(w, models, min_replicas=0, idle_unload=2.0, replicas=3)
    assert len(w.state.assignments_for("m")) == 3
    assert asyncio.run(w.raft.propose(idle_command("m"))).ok  # as _unload_idle commits it
    result, _ = asyncio.run(w.coord.wake("m"))
    assert result is not None
    assert len(w.state.assignments_for("m")) == 1 and w.state.deployment("m").spec.replicas == 1, \
        "from zero to max(min_replicas, 1); load adds the rest"
    _load(w, {"a": {a.replica: 5 for a in w.state.assignments_for("m")}})
    assert any("scale 1 -> 3" in d for d in _tick(w))
