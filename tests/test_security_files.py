"""Issue 14, item 1: what agentd owns is the agentd user's alone, whatever the umask.

The attack: the Raft log holds the cluster secret in plain text, and it was
created 0644 in a 0755 directory, so any local user could read it and derive
every model server's key. Each test runs with umask 0 (the most permissive).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agentd.api.drain import request_drain
from agentd.cluster.raft.storage import FileStorage
from agentd.cluster.raft.types import Entry, EntryKind, HardState, Membership, Ready, Snapshot, SnapshotMeta
from agentd.runtime.logfiles import LogFiles
from agentd.runtime.records import atomic_write
from agentd.security.files import private_dir, tighten_tree
from agentd.testing.localcluster import LocalCluster, simulated_host


@pytest.fixture
def umask0():
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def loose(root: Path) -> list[str]:
    """Every directory or file under root that group or others can use (certificates are public)."""
    bad = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [*dirnames, *filenames, "."]:
            p = Path(dirpath, n)
            if not n.endswith(".crt") and mode(p) & 0o077:
                bad.append(f"{p.relative_to(root)} {oct(mode(p))}")
    return bad


def test_raft_storage_is_private_under_umask_0(tmp_path, umask0):
    st = FileStorage(tmp_path / "data" / "raft", "n1")
    st.load()
    st.save(Ready(hard_state=HardState(1, "n1", 0), entries=(Entry(1, 1, EntryKind.NORMAL, b"secret.init"),)))
    st.save(Ready(snapshot=Snapshot(SnapshotMeta(1, 1, Membership()), b"the state, with the secret")))
    st.close()
    raft = tmp_path / "data" / "raft"
    assert {p.name for p in raft.iterdir()} >= {"raft.wal", "raft.snap", "raft.lock"}
    assert loose(tmp_path / "data") == []
    assert mode(raft) == 0o700 and mode(raft / "raft.wal") == 0o600 and mode(raft / "raft.snap") == 0o600


def test_runtime_files_are_private_under_umask_0(tmp_path, umask0):
    atomic_write(tmp_path / "d" / "runtime" / "records" / "i1" / "main.json", b"{}")
    fd = LogFiles(tmp_path / "d" / "runtime" / "logs").open_run("i1", "main", "start")
    os.close(fd)
    request_drain(tmp_path / "d")
    private_dir(tmp_path / "d" / "runtime" / "work" / "i1")
    assert loose(tmp_path / "d") == []


def test_tighten_tree_repairs_an_older_data_dir(tmp_path, umask0):
    d = tmp_path / "data"
    (d / "raft").mkdir(parents=True, mode=0o755)
    (d / "raft" / "raft.wal").write_bytes(b"secret")
    os.chmod(d / "raft" / "raft.wal", 0o644)
    (d / "tls").mkdir(mode=0o755)
    (d / "tls" / "node.key").write_bytes(b"key")
    os.chmod(d / "tls" / "node.key", 0o644)
    (d / "tls" / "node.crt").write_bytes(b"cert")
    os.chmod(d / "tls" / "node.crt", 0o644)
    outside = tmp_path / "outside"
    outside.write_bytes(b"not agentd's")
    os.chmod(outside, 0o666)
    (d / "link").symlink_to(outside)
    os.mkfifo(d / "fifo", 0o666)

    changed = tighten_tree(d)

    assert sorted(Path(p).relative_to(d).as_posix() for p in changed) == [
        ".", "raft", "raft/raft.wal", "tls", "tls/node.key"]
    assert mode(d / "raft" / "raft.wal") == 0o600 and mode(d / "tls" / "node.key") == 0o600
    assert mode(d / "tls" / "node.crt") == 0o644  # public by design
    assert mode(outside) == 0o666  # a link is not followed
    assert tighten_tree(d) == []  # nothing left to do


@pytest.mark.slow
def test_a_real_agent_keeps_its_data_dir_private_and_tightens_an_older_one(tmp_path, umask0):
    c = LocalCluster(tmp_path, hosts=[simulated_host("a", gpus=1, gpu_gib=1.0)], secure=True)
    a = c.agents["a"]
    c.init_ca("a")  # as `agentd init-ca` on the first host, then made loose as an older release left it
    os.chmod(a.data_dir, 0o755)
    os.chmod(a.tls_dir, 0o755)
    os.chmod(a.tls_dir / "node.key", 0o644)
    (a.data_dir / "raft").mkdir(mode=0o755)
    try:
        c.start()
        with a.client() as cl:
            from agentd.v1 import security_pb2 as spb
            cl.call("CreateApiKey", spb.CreateApiKeyRequest(tenant="acme"))
        assert (a.data_dir / "raft" / "raft.wal").exists()
        assert b"secret.init" in (a.data_dir / "raft" / "raft.wal").read_bytes()  # what is being protected
        assert loose(a.data_dir) == []
        assert mode(a.log_file) == 0o600  # the agent's own log (LocalCluster, as the demo, writes it)
        log = a.log_file.read_text()
        assert "tightened the modes of files agentd owns" in log
        assert "node.key" in log
    finally:
        c.stop()
