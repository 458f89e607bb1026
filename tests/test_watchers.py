"""Voters keep the log, every other host watches it (docs/cluster.md): real agent processes.

Three voters and five watchers (max_voters 3, no standby learners). A watcher
follows one voter's Watch stream; kill -9 that voter, deploy again, and the
watcher has both deployments, in order, having moved to another voter. A
watcher that was down while the state changed catches up from a snapshot.
"""

from __future__ import annotations

import json
import signal

import pytest

from agentd.testing.binaries import NO_LLAMA_CPP, llama_cpp_present
from agentd.testing.gguf import write_tiny_llama_gguf
from agentd.testing.localcluster import LocalCluster, free_port_block, simulated_host, wait_for
from agentd.v1 import control_pb2 as pb

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]

if not llama_cpp_present():
    pytest.skip(NO_LLAMA_CPP, allow_module_level=True)

VOTERS = ("v1", "v2", "v3")
WATCHERS = ("w1", "w2", "w3", "w4", "w5")


def status(c: LocalCluster, name: str) -> pb.StatusReply:
    with c.agents[name].client(timeout=5) as client:
        return client.status()


def local_names(c: LocalCluster, name: str) -> list[str]:
    with c.agents[name].client(timeout=5) as client:
        return [d.spec.name for d in client.call("List", pb.ListRequest(serializable=True)).deployments]


def deploy(c: LocalCluster, via: str, name: str, model: str, host: str) -> None:
    with c.agents[via].client(timeout=60) as client:
        client.deploy(pb.DeploymentSpec(name=name, model=model, runtime="llamabox", replicas=1,
                                        options=pb.RuntimeOptions(ctx_size=256), pin=[pb.GpuPin(host=host)]))


def test_watchers_follow_any_voter_and_resume_without_losing_or_repeating(tmp_path):
    model = str(write_tiny_llama_gguf(tmp_path / "tiny.gguf"))
    base = free_port_block()
    c = LocalCluster(tmp_path / "c", hosts=[simulated_host(n, gpus=1, gpu_gib=8) for n in (*VOTERS, *WATCHERS)],
                     max_voters=3, standby_learners=0,
                     extra_env={"AGENTD_PORT_RANGE": f"[{base},{base + 99}]", "AGENTD_RUNTIME_STOP_GRACE": "1s",
                                "AGENTD_VOTERS": ",".join(VOTERS)})
    try:
        c.start(timeout=90)
        c.wait_for_inventories(60)
        leader = c.wait_for_leader()[0]
        members = {m.id: m.voter for m in status(c, leader).members}
        assert members == {v: True for v in VOTERS}  # the watchers are not in Raft
        with c.agents[leader].client(timeout=5) as client:
            roles = {n.name: n.role for n in client.call("ListNodes", pb.ListNodesRequest()).nodes}
        assert {roles[w] for w in WATCHERS} == {"watcher"}
        for w in WATCHERS:
            assert (c.agents[w].data_dir / "raft" / "watcher.json").exists()
            wal = c.agents[w].data_dir / "raft" / "raft.wal"  # opened before the join said "watch": no entries
            assert not wal.exists() or wal.stat().st_size < 256, wal.stat().st_size
        sources = {w: status(c, w).watching for w in WATCHERS}
        assert all(s for s in sources.values()), sources

        # Deploy, kill -9 the voter w1 streams from (the leader or not: two voters of three keep a quorum),
        # deploy again: w1 has both, in order.
        w = "w1"
        deploy(c, "w2", "first", model, host=w)  # through a watcher: forwarded to the leader
        wait_for(lambda: local_names(c, w) == ["first"], 20, "w1 to apply the first deploy")
        source = next(n for n in VOTERS if c.agents[n].listen == sources[w])
        c.kill(source, signal.SIGKILL)
        leader = c.wait_for_leader(30, not_=source)[0]
        wait_for(lambda: c.wait_for_leader(30)[0] == leader and status(c, leader).leader_id == leader, 10, "leader")
        deploy(c, leader, "second", model, host="w3")
        wait_for(lambda: local_names(c, w) == ["first", "second"], 30, "w1 to apply the second deploy")
        assert status(c, w).watching not in ("", sources[w])
        st_w, st_l = status(c, w), status(c, leader)
        wait_for(lambda: status(c, w).last_applied >= status(c, leader).commit_index, 10, "w1 to catch up")
        log = c.agents[w].log_file.read_text(errors="replace")
        assert "watch stream ended; trying the next voter" in log
        assert "skipped entries" not in log
        assert st_w.leader_id == st_l.leader_id == leader

        # A watcher down for a while catches up from a snapshot.
        c.kill("w4", signal.SIGKILL)
        deploy(c, leader, "third", model, host="w5")
        c.start_agent("w4")
        wait_for(lambda: local_names(c, "w4") == ["first", "second", "third"], 30, "w4 to catch up")
        w4_log = c.agents["w4"].log_file.read_text(errors="replace")
        assert "following the cluster as a watcher" in w4_log
        # ... and runs what is assigned to it: the reconciler works on a watcher's copy as on a member's.
        deploy(c, leader, "fourth", model, host="w4")
        with c.agents[leader].client(timeout=5) as client:
            wait_for(lambda: [i.state for i in client.call("ListInstances", pb.ListInstancesRequest(
                deployment="fourth")).instances] == ["RUNNING"], 60, "fourth running on the watcher w4")
        assert json.loads((c.agents["w4"].data_dir / "raft" / "watcher.json").read_text())["cluster_id"]
    finally:
        c.stop()


def test_two_dead_voters_of_five_are_replaced_by_watchers_without_an_operator(tmp_path):
    model = str(write_tiny_llama_gguf(tmp_path / "tiny.gguf"))
    base = free_port_block()
    c = LocalCluster(tmp_path / "c", hosts=[simulated_host(n, gpus=1, gpu_gib=8) for n in
                                            ("v1", "v2", "v3", "v4", "v5", "w1", "w2", "w3")],
                     max_voters=5, standby_learners=0, node_down_grace="3s",
                     extra_env={"AGENTD_PORT_RANGE": f"[{base},{base + 49}]", "AGENTD_RUNTIME_STOP_GRACE": "1s"})
    try:
        c.start(timeout=90)
        c.wait_for_inventories(60)
        leader = c.wait_for_leader()[0]
        seated = {m.id for m in status(c, leader).members if m.voter}  # the first five to join
        assert len(seated) == 5
        watchers = tuple(n for n in c.agents if n not in seated)
        deploy(c, leader, "kept", model, host=watchers[0])
        dead = sorted(seated - {leader})[:2]
        for v in dead:
            c.kill(v, signal.SIGKILL)

        def seats() -> dict[str, bool] | None:
            lead = c.wait_for_leader(30)[0]
            members = {m.id: m.voter for m in status(c, lead).members}
            live_voters = [m for m, voter in members.items() if voter and m not in dead]
            return members if len(live_voters) == 5 else None

        members = wait_for(seats, 150, "five live voters again")
        assert not any(members.get(v) for v in dead)  # demoted, not expelled from the state
        assert sum(1 for w in watchers if members.get(w)) == 2  # two watchers took the seats
        lead = c.wait_for_leader(30)[0]
        assert "kept" in local_names(c, lead)
        for w in watchers:
            if members.get(w):
                assert not (c.agents[w].data_dir / "raft" / "watcher.json").exists()
                assert "kept" in local_names(c, w)
        log = "".join(c.agents[n].log_file.read_text(errors="replace") for n in c.agents if c.agents[n].alive)
        assert "demoted a voter that is down" in log and "a watcher joins Raft as a standby learner" in log
    finally:
        c.stop()
