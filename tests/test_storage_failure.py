"""Issue 14, item 5: a member that cannot persist says so, accepts no key, and exits for a restart.

What happened: with the disk full, a follower logged "cannot persist raft
state; stopping the node", yet /readyz said ready, it kept reporting, and it
kept accepting a key revoked afterwards (200 there, 401 on the others). Here
the follower's data directory is a real 4 MiB tmpfs (in its own mount
namespace), filled up while the cluster runs.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from agentd.daemon import EXIT_RAFT_FAILED, _Provider
from agentd.testing.localcluster import LocalCluster, simulated_host
from agentd.v1 import security_pb2 as spb
from tests.conftest import run_cli


def test_a_failed_member_is_not_ready_and_verifies_no_key():
    raft = SimpleNamespace(fatal="", upgrade_required="", leader_id="a", term=3)
    d = SimpleNamespace(raft=raft, synced=True, metrics=SimpleNamespace(registry=None))
    p = _Provider(d)
    assert p.ready() == (True, "leader a, term 3")
    raft.fatal = "cannot persist Raft state: [Errno 28] No space left on device"
    assert p.ready() == (False, "stopped, exiting: cannot persist Raft state: [Errno 28] No space left on device")


def _can_mount_tmpfs(tmp_path: Path) -> bool:
    if not shutil.which("unshare"):
        return False
    d = tmp_path / "probe"
    d.mkdir()
    r = subprocess.run(["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs "$0"', str(d)],
                       capture_output=True)
    return r.returncode == 0


def fill(path: Path) -> None:
    """Write zeros under `path` until the file system is full."""
    chunk = b"\0" * (1 << 16)
    with open(path, "wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


def get(url: str, key: str) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"}),
                                    timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0  # nobody listens


@pytest.mark.slow
def test_a_follower_with_a_full_disk_refuses_keys_and_exits_non_zero(tmp_path):
    """Three voters, so the other two keep a quorum once b is gone."""
    if not _can_mount_tmpfs(tmp_path):
        pytest.skip("needs unshare -m and tmpfs mounts (root or user namespaces)")
    c = LocalCluster(tmp_path / "c", hosts=[simulated_host(n, gpus=1, gpu_gib=1.0) for n in ("a", "b", "c")],
                     secure=True, node_down_grace="3s")
    b = c.agents["b"]
    c.agent_prefix["b"] = ["unshare", "-m", "sh", "-c",
                           'mount -t tmpfs -o size=4m,mode=0700 tmpfs "$0" && exec "$@"', str(b.data_dir)]
    try:
        c.start()
        c.wait_for_inventories()
        with c.agents["a"].client() as cl:
            key = cl.call("CreateApiKey", spb.CreateApiKeyRequest(tenant="acme")).key
        deadline = time.monotonic() + 20
        while get(f"http://{b.http_listen}/v1/models", key) != 200:  # b has applied the key
            assert time.monotonic() < deadline, "b never accepted the new key"
            time.sleep(0.1)

        fill(Path(f"/proc/{b.proc.pid}/root") / str(b.data_dir).lstrip("/") / "filler")  # b's own tmpfs
        with c.agents["a"].client() as cl:
            # Appends fit in the log's last page for a while (tmpfs allocates pages): write until b fails.
            for i in range(200):
                if b.proc.poll() is not None:
                    break
                cl.call("CreateApiKey", spb.CreateApiKeyRequest(tenant="acme", name=f"filler-{i}" + "x" * 150))
            reply = cl.call("RevokeApiKey", spb.RevokeApiKeyRequest(id=key.split("_")[1]))
        assert reply.info.state == "revoked"

        assert b.proc.wait(timeout=60) == EXIT_RAFT_FAILED  # non-zero: systemd's Restart=on-failure restarts it
        log = b.log_file.read_text()
        assert "cannot persist raft state" in log and "No space left on device" in log
        assert "exiting so that the service manager restarts it" in log
        assert get(f"http://{b.http_listen}/v1/models", key) != 200  # the revoked key works nowhere
        assert get(f"http://{c.agents['a'].http_listen}/v1/models", key) == 401

        env = {"AGENTD_TLS_DIR": str(c.admin_dir), "HOME": str(tmp_path)}
        deadline = time.monotonic() + 30
        while True:  # the leader shows it down once its reports stop for node_down_grace
            r = run_cli("nodes", "--json", "--server", c.agents["a"].listen, env=env)
            assert r.returncode == 0, r.stderr
            states = {n["name"]: n["state"] for n in json.loads(r.stdout)["nodes"]}
            if states.get("b") == "down":
                break
            assert time.monotonic() < deadline, states
            time.sleep(0.5)
    finally:
        c.stop()
