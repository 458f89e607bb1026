"""Two releases in one cluster, with real agents: agentd 0.1.0 (from its git tag) and this one.

* A rolling upgrade of a 0.1.0 cluster, host by host, with a real llama-server
  serving throughout: first an old leader with a new follower, then a new leader
  with an old follower (it writes nothing the old one cannot apply, and refuses a
  request that would need the new format, naming the old member), then every
  host new (the leader raises the cluster's format and the refused request goes
  through). The llama-server started by 0.1.0 is adopted, never restarted.
* A data directory written by 0.1.0 with deployments, API keys and a running
  model server, taken over in place by this release.
* An agent that meets an entry of a newer format than it knows stops applying and
  says so in `agentd nodes` and on /readyz (the "future" agent is this tree with
  its format numbers raised and its write gate removed).

The 0.1.0 code runs from a git worktree of the `v0.1.0` tag (or its commit, where
a clone lacks the tag), in this venv, ahead of the installed agentd on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from agentd.errors import AgentdError, NotAvailable
from agentd.testing.binaries import NO_LLAMA_CPP, llama_cpp_present
from agentd.testing.gguf import write_tiny_llama_gguf
from agentd.testing.localcluster import LocalCluster, free_port_block, running, simulated_host, status, wait_for
from agentd.testing.releases import code_env
from agentd.v1 import control_pb2 as pb
from agentd.v1 import security_pb2 as sec_pb
from agentd.version import AGENT_VERSION, STATE_FORMAT

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]

REPO = Path(__file__).resolve().parents[1]


if not llama_cpp_present():
    pytest.skip(NO_LLAMA_CPP, allow_module_level=True)


# ---------------------------------------------------------------------- code of other releases


@pytest.fixture(scope="module")
def release_future(tmp_path_factory) -> Path:
    """This tree as a later release would be: agentd 0.3.0, state format 3, deletes written as format 3 and
    no write gate (a leader that writes what its followers cannot apply, which this release never does)."""
    root = tmp_path_factory.mktemp("future")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "tests")
    shutil.copytree(REPO / "agentd", root / "agentd", ignore=ignore)
    shutil.copytree(REPO / "plugins", root / "plugins", ignore=ignore)

    def patch(rel: str, old: str, new: str) -> None:
        path = root / rel
        text = path.read_text()
        assert old in text, f"{rel} no longer has {old!r}: update this fixture"
        path.write_text(text.replace(old, new, 1))

    patch("agentd/version.py", f'AGENT_VERSION = "{AGENT_VERSION}"', 'AGENT_VERSION = "0.3.0"')
    patch("agentd/version.py", f"STATE_FORMAT = {STATE_FORMAT}", "STATE_FORMAT = 3")
    patch("agentd/cluster/state.py", 'OP_SINCE: dict[str, int] = {', 'OP_SINCE: dict[str, int] = {"delete": 3, ')
    patch("agentd/cluster/state.py", '        """Why the leader must not propose `command` now',
          '        return ""\n        """Why the leader must not propose `command` now')
    return root


# ---------------------------------------------------------------------- helpers


def spec(name: str, model: Path, **kw: Any) -> pb.DeploymentSpec:
    return pb.DeploymentSpec(name=name, model=str(model), runtime="llamabox", replicas=1,
                             options=pb.RuntimeOptions(ctx_size=256), **kw)


def deploy(c: LocalCluster, via: str, s: pb.DeploymentSpec) -> pb.DeployReply:
    """Deploy through `via`, retrying while the cluster elects a leader (a restart just moved leadership)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            with c.agents[via].client(timeout=60) as client:
                return client.deploy(s)
        except NotAvailable as exc:
            if "no leader" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def local_names(c: LocalCluster, via: str) -> set[str]:
    """Deployment names in `via`'s own copy of the state (a serializable read: no leader needed)."""
    with c.agents[via].client(timeout=5) as client:
        return {d.spec.name for d in client.call("List", pb.ListRequest(serializable=True)).deployments}


def leader(c: LocalCluster) -> str:
    return c.wait_for_leader(30)[0]


def settled_leader(c: LocalCluster) -> str:
    """The leader once it has held its term for 2.5 s (two election timeouts): in a two-node cluster a leader
    whose peer is restarting cannot hear a quorum and steps down (check-quorum) a moment after the restart
    looked finished, and the election that follows is left to chance."""
    for _ in range(10):
        first = status(c, leader(c))
        time.sleep(2.5)
        again = status(c, leader(c))
        if (first.leader_id, first.term) == (again.leader_id, again.term):
            return again.leader_id
    raise AssertionError("no leader held its term for 2.5 s in 10 tries")


def completion(c: LocalCluster, via: str, model: str, key: str = "") -> str:
    """The text of a 3-token completion through `via`'s proxy; raises unless the model answered. The text may be
    empty (random weights can sample end-of-text first), so callers check its type, not its truth."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(f"http://{c.agents[via].http_listen}/v1/completions", method="POST",
                                 data=json.dumps({"model": model, "prompt": "Hi", "max_tokens": 3}).encode(),
                                 headers=headers)
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["choices"][0]["text"]


def server_pids(root: Path) -> set[int]:
    out = set()
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "llama-server" in cmd and str(root) in cmd:
            out.add(p.pid)
    return out


def restart_as(c: LocalCluster, name: str, env: dict[str, str]) -> None:
    """`systemctl restart` onto other code: SIGTERM (no drain: model servers keep running), then start."""
    c.kill(name, signal.SIGTERM)
    c.agent_env[name] = env
    c.start_agent(name)
    wait_for(lambda: status(c, name).leader_id, 30, f"{name} to follow a leader after its restart")


@pytest.fixture
def models(tmp_path) -> dict[str, Path]:
    d = tmp_path / "models"
    d.mkdir()
    return {"tiny": write_tiny_llama_gguf(d / "tiny.gguf")}


def cluster(root: Path, names: str, **kw: Any) -> LocalCluster:
    base = free_port_block()
    return LocalCluster(root, hosts=[simulated_host(n, gpus=1, gpu_gib=8) for n in names],
                        extra_env={"AGENTD_PORT_RANGE": f"[{base},{base + 99}]", "AGENTD_RUNTIME_STOP_GRACE": "1s"},
                        **kw)


# ---------------------------------------------------------------------- tests


def test_a_0_1_0_cluster_upgrades_host_by_host_while_it_serves(tmp_path, release_0_1_0, models):
    old, new = code_env(release_0_1_0), {}
    c = cluster(tmp_path / "c", "abc", agent_env={n: dict(old) for n in "abc"})
    try:
        c.start()
        c.wait_for_inventories()
        deploy(c, "a", spec("first", models["tiny"], pin=[pb.GpuPin(host="a")]))
        wait_for(lambda: running(c, "a", "first"), 60, "first running on 0.1.0")
        pids = server_pids(tmp_path)
        assert len(pids) == 1
        assert isinstance(completion(c, "b", "first"), str)
        assert status(c, "a").agent_version == ""  # 0.1.0 says nothing of its version

        # 1. An old leader, a new follower: c runs this release on its 0.1.0 data directory.
        assert leader(c) == "a"
        restart_as(c, "c", new)
        wait_for(lambda: "first" in local_names(c, "c"), 60, "c (new) to load the 0.1.0 state")
        st = status(c, "c")
        assert (st.agent_version, st.state_format, st.cluster_format) == (AGENT_VERSION, STATE_FORMAT, 1)
        assert json.loads((c.agents["c"].data_dir / "agentd-data.json").read_text())["data_format"] == 2
        with pytest.raises(AgentdError, match=r"the leader \(a\) applies format 1: it runs an older agentd"):
            deploy(c, "c", spec("early", models["tiny"], parallelism="gpus"))  # 0.1.0 would drop the option
        deploy(c, "c", spec("second", models["tiny"], pin=[pb.GpuPin(host="b")]))  # forwarded to the 0.1.0 leader
        wait_for(lambda: running(c, "a", "second"), 60, "second running")
        wait_for(lambda: {"first", "second"} <= local_names(c, "c"), 10, "c to apply the old leader's entry")

        # 2. A new leader, an old follower (b): nothing it writes is beyond format 1.
        restart_as(c, "a", new)
        if leader(c) == "b":  # leadership went to the old agent: hand it to a new one, keep b old
            restart_as(c, "b", old)
        assert leader(c) in ("a", "c")
        lead = leader(c)
        wait_for(lambda: all(n.agent_version == AGENT_VERSION for n in _nodes(c, lead) if n.name != "b"), 30,
                 "the new agents' reports")
        deploy(c, lead, spec("third", models["tiny"], pin=[pb.GpuPin(host="c")]))
        wait_for(lambda: "third" in local_names(c, "b"), 30, "the old follower to apply the new leader's entry")
        with pytest.raises(AgentdError) as refused:
            deploy(c, lead, spec("fourth", models["tiny"], parallelism="latency"))
        msg = str(refused.value)
        assert "needs state format 2" in msg and "b (agentd 0.1.0, state format 1)" in msg
        assert status(c, lead).cluster_format == 1
        nodes = {n.name: n for n in _nodes(c, lead)}
        assert nodes["b"].agent_version == "0.1.0" and nodes["a"].agent_version == AGENT_VERSION

        # 3. Every host new: the leader raises the cluster's format, and the same request goes through.
        restart_as(c, "b", new)
        wait_for(lambda: status(c, leader(c)).cluster_format == STATE_FORMAT, 30, "the cluster format raised")
        deploy(c, leader(c), spec("fourth", models["tiny"], parallelism="latency", pin=[pb.GpuPin(host="a")]))
        wait_for(lambda: "fourth" in local_names(c, "b"), 30, "b to apply a format-2 entry")
        assert pids <= server_pids(tmp_path), "the model server 0.1.0 started was restarted during the upgrade"
        assert isinstance(completion(c, "c", "first"), str)
        assert "refused entry" not in (c.agents["b"].log_file.read_text(errors="replace").split(
            "agent serving")[-1])  # after its upgrade, b skipped nothing
    finally:
        c.stop()


def _nodes(c: LocalCluster, via: str) -> list[pb.Node]:
    with c.agents[via].client(timeout=5) as client:
        return list(client.call("ListNodes", pb.ListNodesRequest()).nodes)


def test_a_0_1_0_data_directory_with_keys_deployments_and_servers_is_taken_over(tmp_path, release_0_1_0, models):
    c = cluster(tmp_path / "c", "a", secure=True, agent_env={"a": code_env(release_0_1_0)})
    try:
        c.start()
        c.wait_for_inventories()
        with c.agents["a"].client(timeout=30) as client:
            key = client.call("CreateApiKey", sec_pb.CreateApiKeyRequest(tenant="team", name="kept"))
            token = client.call("CreateJoinToken", sec_pb.CreateJoinTokenRequest(ttl_seconds=3600, node_name="z"))
        deploy(c, "a", spec("kept", models["tiny"], tenant="team"))
        first = wait_for(lambda: running(c, "a", "kept"), 60, "kept running on 0.1.0")
        pids = server_pids(tmp_path)
        assert len(pids) == 1
        c.kill("a", signal.SIGKILL)  # the worst way to stop: no clean shutdown, the server keeps running
        assert not (c.agents["a"].data_dir / "agentd-data.json").exists()

        c.agent_env["a"] = {}
        c.start_agent("a")
        after = wait_for(lambda: running(c, "a", "kept"), 60, "kept adopted by this release")
        assert [i.pid for i in after] == [i.pid for i in first] and server_pids(tmp_path) == pids
        with c.agents["a"].client(timeout=30) as client:
            keys = client.call("ListApiKeys", sec_pb.ListApiKeysRequest()).keys
            tokens = client.call("ListJoinTokens", sec_pb.ListJoinTokensRequest()).tokens
            d = client.call("Get", pb.GetRequest(name="kept"))
        assert key.info.id in {k.id for k in keys} and token.info.id in {t.id for t in tokens}
        assert d.spec.tenant == "team"
        # The key works on /v1/, and the proxy reaches the adopted server with the key derived from the
        # cluster secret that 0.1.0 wrote.
        assert isinstance(completion(c, "a", "kept", key=key.key), str)
        assert json.loads((c.agents["a"].data_dir / "agentd-data.json").read_text()) == {
            "data_format": 2, "agent_version": AGENT_VERSION}
        log = c.agents["a"].log_file.read_text(errors="replace")
        assert "upgraded the data directory" in log
    finally:
        c.stop()


def test_an_agent_that_meets_a_newer_entry_stops_applying_and_says_so(tmp_path, release_future, models):
    future = code_env(release_future)
    c = cluster(tmp_path / "c", "ab", agent_env={"b": dict(future)})
    try:
        c.start()  # a (this release) bootstraps and leads; b (0.3.0) joins while the cluster writes format 2
        c.wait_for_inventories()
        # a hands leadership to b on SIGTERM and comes back as its follower. In a two-voter cluster b cannot hear a
        # quorum while a restarts and steps down 0.8 s later (check-quorum); the election once a is back would be
        # left to chance (a won three in a row once), so a comes back slower to campaign than b.
        patient = {"AGENTD_ELECTION_TIMEOUT_MIN": "4", "AGENTD_ELECTION_TIMEOUT_MAX": "5"}
        for _ in range(3):
            restart_as(c, "a", patient)
            if settled_leader(c) == "b":
                break
        assert settled_leader(c) == "b"
        deploy(c, "b", spec("x", models["tiny"], pin=[pb.GpuPin(host="b")]))
        wait_for(lambda: "x" in local_names(c, "a"), 30, "a to apply a format-1 entry of the 0.3.0 leader")
        with c.agents["b"].client(timeout=30) as client:
            client.call("Delete", pb.DeleteRequest(name="x"))  # written as format 3 by the "future" leader
        a = wait_for(lambda: next((n for n in _nodes(c, "b") if n.name == "a" and n.upgrade_required), None),
                     30, "a to report that it needs an upgrade")
        assert re.search(r"log entry \d+ \('delete'\) needs state format 3; this agent \(agentd "
                         + re.escape(AGENT_VERSION) + r"\) applies formats up to 2", a.upgrade_required)
        assert "x" in local_names(c, "a")  # stopped there: the delete is not skipped, it waits for the upgrade
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
        r = subprocess.run([sys.executable, "-m", "agentd", "nodes", "--server", c.agents["a"].listen],
                           capture_output=True, text=True, timeout=30, env=env)
        assert re.search(r"^a\s.*needs-upgrade", r.stdout, re.M), r.stdout + r.stderr
        r = subprocess.run([sys.executable, "-m", "agentd", "status", "--server", c.agents["a"].listen],
                           capture_output=True, text=True, timeout=30, env=env)
        assert "NEEDS UPGRADE: log entry" in r.stdout, r.stdout + r.stderr
        try:
            urllib.request.urlopen(f"http://{c.agents['a'].http_listen}/readyz", timeout=5)
            raise AssertionError("/readyz answered 200")
        except urllib.error.HTTPError as exc:
            assert exc.code == 503 and "needs an upgrade" in exc.read().decode()
        # Upgraded (onto the newer code), a applies from where it stopped.
        restart_as(c, "a", future)
        wait_for(lambda: "x" not in local_names(c, "a"), 30, "a to apply the delete after its upgrade")
    finally:
        c.stop()
