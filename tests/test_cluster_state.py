import json

import pytest

from agentd.cluster.state import (
    ClusterState,
    assign_command,
    delete_command,
    deploy_command,
    node_command,
)
from agentd.testing.statefill import assignment, spec


def test_deploy_then_delete_emits_events_in_order():
    st = ClusterState()
    events = []
    st.subscribe(events.append)
    assert st.apply(1, 1, deploy_command(spec(), [assignment()])).ok
    assert [e.kind for e in events] == ["deployment.created", "assignment.set"]
    assert st.assignments_on("a")[0].instance_id == "m-r0-g1"
    assert st.apply(2, 1, delete_command("m")).ok
    assert [e.kind for e in events][2:] == ["assignment.removed", "deployment.deleted"]
    assert st.assignments == {} and st.deployments == {}


def test_duplicate_deploy_is_refused_without_change():
    st = ClusterState()
    st.apply(1, 1, deploy_command(spec(), [assignment()]))
    before = st.snapshot()
    res = st.apply(2, 1, deploy_command(spec(), [assignment(host="b")]))
    assert not res.ok and "already exists" in res.message
    assert json.loads(st.snapshot())["assignments"] == json.loads(before)["assignments"]


@pytest.mark.parametrize("command,needle", [
    (b"not json", "malformed"),
    (b'{"op": 3}', "malformed"),
    (b'{"op": "explode"}', "unknown op"),
    (b'{"op": "deploy", "spec": {"name": "BAD NAME", "model": "x", "runtime": "r"}}', "invalid deploy"),
    (b'{"op": "deploy", "spec": {"name": "ok", "model": "x", "runtime": "r", "replicas": -1}}', "invalid deploy"),
    (b'{"op": "delete"}', "invalid delete"),
])
def test_garbage_commands_are_refused_not_raised(command, needle):
    st = ClusterState()
    res = st.apply(1, 1, command)
    assert not res.ok and needle in res.message
    assert st.deployments == {} and st.last_index == 1


def test_assignment_beyond_replicas_or_mismatched_endpoints_refused():
    st = ClusterState()
    assert "beyond replicas" in st.apply(1, 1, deploy_command(spec(replicas=1), [assignment(replica=1)])).message
    bad = assignment().model_copy(update={"endpoints": ()})
    assert "endpoints" in st.apply(2, 1, deploy_command(spec(), [bad])).message


def test_fencing_refuses_assignment_with_older_term():
    st = ClusterState()
    st.apply(1, 5, deploy_command(spec(), [assignment(term=5)]))
    res = st.apply(2, 5, assign_command("m", [assignment(term=4, host="b", generation=2)], replicas=1))
    assert not res.ok and "stale assignment" in res.message
    assert st.assignments_for("m")[0].plan.parts[0].host == "a"
    assert st.apply(3, 6, assign_command("m", [assignment(term=6, host="b", generation=2)], replicas=1)).ok
    assert st.assignments_for("m")[0].instance_id == "m-r0-g2"


def test_scale_down_removes_high_replicas_and_updates_spec():
    st = ClusterState()
    st.apply(1, 1, deploy_command(spec(replicas=2), [assignment(replica=0), assignment(replica=1)]))
    assert st.apply(2, 1, assign_command("m", [], replicas=1)).ok
    assert [a.replica for a in st.assignments_for("m")] == [0]
    assert st.deployment("m").spec.replicas == 1


def test_apply_is_idempotent_for_old_indices():
    st = ClusterState()
    st.apply(1, 1, deploy_command(spec(), [assignment()]))
    assert st.apply(1, 1, delete_command("m")).message == "entry 1 already applied"
    assert "m" in st.deployments


def test_snapshot_restore_round_trip():
    st = ClusterState()
    st.apply(1, 1, deploy_command(spec(replicas=2), [assignment(replica=0), assignment(replica=1, host="b")]))
    st.apply(2, 2, node_command("b", "down", "127.0.0.1:7071"))
    other = ClusterState()
    other.restore(st.snapshot())
    assert other.snapshot() == st.snapshot()
    assert other.nodes["b"].state == "down" and other.last_index == 2


def test_broken_listener_does_not_stop_apply():
    st = ClusterState()
    st.subscribe(lambda ev: 1 / 0)
    assert st.apply(1, 1, deploy_command(spec(), [assignment()])).ok
    assert "m" in st.deployments
