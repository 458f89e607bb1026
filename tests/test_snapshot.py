"""Backup and restore of the replicated state: `agentd snapshot save` and `agentd snapshot restore`.

The file format and the seeding of a new data directory are checked directly;
a real secure cluster (mutual TLS, a running llama-server, an API key of a
tenant) is backed up, loses every agent's Raft state and identity, and is
restored from the file and the CA backup: deployments, keys and tenants are all
there, the model server still running on its host is adopted, not duplicated,
and the cluster has a new id.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import urllib.request
from pathlib import Path

import pytest

from agentd.cluster import backup
from agentd.cluster.raft.storage import FileStorage
from agentd.cluster.state import ClusterState
from agentd.errors import InvalidInput, UpgradeRequired
from agentd.testing.binaries import NO_LLAMA_CPP, llama_cpp_present
from tests.conftest import run_cli


def _state(n: int = 3) -> ClusterState:
    from agentd.testing.statefill import fill_state

    return fill_state(ClusterState(), n)


def _file(tmp_path: Path, state: ClusterState) -> Path:
    path = tmp_path / "backup.snap"
    backup.write_file(path, backup.encode(state.snapshot(), index=state.last_index, term=state.last_term,
                                          cluster_id="old-cluster", node="a", agent_version="test"))
    return path


def test_a_snapshot_file_round_trips_and_is_owner_only_whatever_the_umask(tmp_path):
    state = _state()
    old = os.umask(0)
    try:
        path = _file(tmp_path, state)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    header, data = backup.read_file(path)
    assert (header.index, header.term, header.cluster_id, header.node) == (state.last_index, state.last_term,
                                                                          "old-cluster", "a")
    restored = ClusterState()
    restored.restore(data)
    assert restored.snapshot() == state.snapshot()
    assert sorted(restored.deployments) == sorted(state.deployments)
    assert restored.cluster_secret == state.cluster_secret and restored.api_keys.keys() == state.api_keys.keys()


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:-10], "is truncated"),
    (lambda raw: raw[: len(backup.MAGIC) + 5], "header is cut short"),
    (lambda raw: raw[:-1] + bytes([raw[-1] ^ 1]), "is corrupt"),
    (lambda raw: b'{"deployments": []}', "is not an agentd snapshot file"),
    (lambda raw: b"", "is not an agentd snapshot file"),
    (lambda raw: raw.replace(b'"file_format": 1', b'"file_format": 9'), "snapshot file format 9"),
    (lambda raw: raw.replace(b'"index": ', b'"index": "x", "i": '), "header is unreadable"),
])
def test_a_damaged_or_foreign_file_is_a_clear_error_and_changes_nothing(tmp_path, damage, message):
    path = _file(tmp_path, _state())
    path.write_bytes(damage(path.read_bytes()))
    target = tmp_path / "new"
    with pytest.raises(InvalidInput, match=message):
        backup.seed_data_dir(path, target, node_id="a", address="127.0.0.1:1")
    assert not target.exists()
    # The CLI says the same in one line, exit 2.
    r = run_cli("snapshot", "restore", str(path), "--data-dir", str(target), "--node-name", "a",
                "--advertise", "127.0.0.1:1")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not target.exists()


def test_a_state_of_a_newer_format_is_refused_before_anything_is_written(tmp_path):
    raw = json.loads(_state().snapshot())
    raw["format"] = 99
    data = json.dumps(raw).encode()
    path = tmp_path / "future.snap"
    backup.write_file(path, backup.encode(data, index=5, term=2, cluster_id="x", node="a", agent_version="9.0"))
    with pytest.raises(UpgradeRequired, match="state format 99"):
        backup.seed_data_dir(path, tmp_path / "new", node_id="a", address="127.0.0.1:1")
    assert not (tmp_path / "new").exists()


def test_restore_seeds_a_one_voter_cluster_with_a_new_id_and_keeps_tls_and_runtime(tmp_path):
    state = _state()
    path = _file(tmp_path, state)
    target = tmp_path / "d"
    (target / "tls").mkdir(parents=True)
    (target / "tls" / "ca.crt").write_text("kept")
    out = backup.seed_data_dir(path, target, node_id="n1", address="127.0.0.1:7070")
    assert out["cluster_id"] != "old-cluster" and len(out["cluster_id"]) == 32
    assert (target / "tls" / "ca.crt").read_text() == "kept"
    loaded = FileStorage(target / "raft", "n1").load()
    assert loaded.cluster_id == out["cluster_id"]
    assert loaded.snapshot is not None and loaded.snapshot.meta.index == state.last_index
    assert [(m.id, m.address, m.voter) for m in loaded.snapshot.meta.membership.members] == \
        [("n1", "127.0.0.1:7070", True)]
    assert loaded.hard_state.term >= state.last_term and loaded.hard_state.commit == state.last_index
    restored = ClusterState()
    restored.restore(loaded.snapshot.data)
    assert restored.snapshot() == state.snapshot()
    # A second restore onto the same directory is refused: it holds a Raft log now.
    before = (target / "raft" / "raft.wal").read_bytes()
    with pytest.raises(InvalidInput, match="already holds a Raft log"):
        backup.seed_data_dir(path, target, node_id="n1", address="127.0.0.1:7070")
    assert (target / "raft" / "raft.wal").read_bytes() == before


# ---------------------------------------------------------------------- a real cluster




@pytest.mark.slow
@pytest.mark.llamacpp
@pytest.mark.skipif(not llama_cpp_present(), reason=NO_LLAMA_CPP)
def test_save_destroy_every_data_dir_restore_and_everything_is_there(tmp_path):
    import psutil

    from agentd.testing.gguf import write_tiny_llama_gguf
    from agentd.testing.localcluster import LocalCluster, free_port_block, running, simulated_host, wait_for
    from agentd.v1 import control_pb2 as pb
    from agentd.v1 import security_pb2 as spb

    model = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    base = free_port_block()
    c = LocalCluster(tmp_path / "c", hosts=[simulated_host(n, gpus=1, gpu_gib=8) for n in "ab"], secure=True,
                     extra_env={"AGENTD_PORT_RANGE": f"[{base},{base + 99}]", "AGENTD_RUNTIME_STOP_GRACE": "1s"})

    def pids() -> set[int]:
        return {p.pid for p in psutil.process_iter(["cmdline"])
                if "llama-server" in " ".join(p.info["cmdline"] or []) and str(model) in " ".join(p.info["cmdline"])}

    def completion(via: str, key: str) -> int:
        req = urllib.request.Request(
            f"http://{c.agents[via].http_listen}/v1/completions", method="POST",
            data=json.dumps({"model": "tiny", "prompt": "Hi", "max_tokens": 2}).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status

    env = {"AGENTD_TLS_DIR": str(c.admin_dir)}
    file = tmp_path / "backup" / "cluster.snap"
    file.parent.mkdir()
    try:
        c.start()
        c.wait_for_inventories()
        with c.agents["a"].client(timeout=60) as client:
            client.deploy(pb.DeploymentSpec(name="tiny", model=str(model), runtime="llamabox", replicas=1,
                                            tenant="acme", options=pb.RuntimeOptions(ctx_size=256),
                                            pin=[pb.GpuPin(host="b")]))
            key = client.call("CreateApiKey", spb.CreateApiKeyRequest(tenant="acme", name="ops")).key
        before = wait_for(lambda: running(c, "a", "tiny"), 90, "tiny running")
        assert completion("a", key) == 200
        servers = pids()
        assert len(servers) == 1

        # Save through b, a follower: it takes the leader's read index and answers from its own copy.
        r = run_cli("--json", "snapshot", "save", str(file), "--server", c.agents["b"].listen, env=env)
        assert r.returncode == 0, r.stderr
        saved = json.loads(r.stdout)
        assert saved["node"] == "b"  # b answered from its own copy, after the leader's read index
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
        header, _ = backup.read_file(file)
        assert header.index == saved["index"] > 0 and header.cluster_id
        ca_backup = tmp_path / "backup" / "tls"
        shutil.copytree(c.agents["a"].tls_dir, ca_backup)  # the CA: a's data_dir/tls (docs/operations.md)

        # The disaster: every agent stops (SIGTERM, no drain: model servers keep running), every data dir
        # loses its Raft log, its format file and its TLS identity. Only runtime/ (process records) is left.
        c.stop(drain=False)
        for agent in c.agents.values():
            for name in ("raft", "tls", "agentd-data.json"):
                p = agent.data_dir / name
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        assert pids() == servers

        # Restore onto a (its TLS folder from the CA backup first), start it alone, then b joins with a token.
        shutil.copytree(ca_backup, c.agents["a"].tls_dir)
        r = run_cli("--json", "snapshot", "restore", str(file), "--data-dir", str(c.agents["a"].data_dir),
                    "--node-name", "a", "--advertise", c.agents["a"].listen)
        assert r.returncode == 0, r.stderr
        restored = json.loads(r.stdout)
        assert restored["cluster_id"] != header.cluster_id and restored["index"] == header.index
        c.start_agent("a", join=[])
        c.wait_for_leader(60)
        c.start_agent("b")
        c.wait_for_members(2, 60)

        with c.agents["a"].client(timeout=30) as client:
            deployments = client.call("List", pb.ListRequest()).deployments
            keys = client.call("ListApiKeys", spb.ListApiKeysRequest()).keys
        assert [(d.spec.name, d.spec.tenant) for d in deployments] == [("tiny", "acme")]
        assert [(k.tenant, k.name) for k in keys] == [("acme", "ops")]
        after = wait_for(lambda: running(c, "a", "tiny"), 90, "tiny running after the restore")
        assert [i.pid for i in after] == [i.pid for i in before]  # adopted, not started again
        assert pids() == servers  # and not duplicated
        assert completion("b", key) == 200  # the tenant's key, checked against the restored state

        # A second restore into a's directory is refused, and the cluster is unharmed.
        r = run_cli("snapshot", "restore", str(file), "--data-dir", str(c.agents["a"].data_dir),
                    "--node-name", "a", "--advertise", c.agents["a"].listen)
        assert r.returncode == 2 and "already holds a Raft log" in r.stderr
        assert completion("a", key) == 200
    finally:
        c.stop()
        for pid in pids():
            os.kill(pid, signal.SIGKILL)


def test_the_copy_the_snapshot_rpc_serialises_off_the_loop_is_not_changed_by_later_applies():
    from agentd.cluster.state import delete_command, node_command

    state = _state(5)
    expected = state.snapshot()
    frozen = state.frozen_copy()
    serialise_later = state.snapshot_later()  # what Raft compaction serialises in a worker thread
    index = state.last_index
    state.apply(index + 1, 2, delete_command("model-0"))
    state.apply(index + 2, 2, node_command("host-1", "down"))
    assert "model-0" not in state.deployments and state.nodes["host-1"].state == "down"
    assert frozen.snapshot() == expected
    assert serialise_later() == expected


async def test_a_restored_node_leads_with_the_state_and_refuses_members_of_the_old_cluster(tmp_path):
    """The restored agent's Raft node starts on the seeded directory as the one voter, with the backup's
    state, and a message stamped with the old cluster's id (an old member still running) is refused."""
    import grpc

    from agentd.cluster.raft import RaftNode, RaftOptions
    from agentd.cluster.raft.codec import encode
    from agentd.cluster.raft.types import VoteRequest
    from agentd.testing.localcluster import free_port

    state = _state(4)
    path = _file(tmp_path, state)
    addr = f"127.0.0.1:{free_port()}"
    out = backup.seed_data_dir(path, tmp_path / "d", node_id="n1", address=addr)
    restored = ClusterState()
    node = RaftNode("n1", addr, tmp_path / "d", restored, options=RaftOptions(election_timeout_min=0.3,
                                                                             election_timeout_max=0.6,
                                                                             heartbeat_interval=0.05))
    await node.start()
    try:
        await node.wait_for_leader(timeout=10)
        assert node.is_leader and node.cluster_id == out["cluster_id"]
        assert sorted(restored.deployments) == sorted(state.deployments)
        assert restored.api_keys == state.api_keys and restored.cluster_secret == state.cluster_secret
        assert node.term > state.last_term  # a new term: nothing of the old cluster's terms can win a vote here
        await node.read_barrier(timeout=5)
        term = node.term
        (vote,) = encode(VoteRequest(term=node.term + 5, sender="old-b", to="n1", last_index=10**6,
                                     last_term=node.term + 4), "old-cluster")
        async with grpc.aio.insecure_channel(addr) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await ch.stream_unary("/agentd.v1.Raft/Send")(iter([vote.SerializeToString()]), timeout=5)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "message from cluster old-cluster" in refused.value.details()
        assert node.is_leader and node.term == term  # the old member's vote, with a higher term, moved nothing
    finally:
        await node.stop()
