"""Migration of a 0.1.0 cluster of more than 7 hosts to voters + watchers (issue 16 item 4), real agents.

agentd 0.1.0 made every host a Raft member: here 3 voters and 6 learners (9 simulated hosts, no model
servers). They are upgraded one by one to this release with no downtime: a Deploy is accepted after every
step. At the end 3 hosts vote, at most `standby_learners` are learners, the rest watch, every host is up
and every agent holds every deployment.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentd.errors import AgentdError
from agentd.testing.gguf import write_tiny_llama_gguf
from agentd.testing.localcluster import LocalCluster, simulated_host
from agentd.testing.releases import code_env, have_history, release_worktree
from agentd.v1 import control_pb2 as pb
from agentd.version import AGENT_VERSION

pytestmark = pytest.mark.slow

HOSTS = "abcdefghi"
STANDBY = 2


@pytest.fixture(scope="module")
def release_0_1_0(tmp_path_factory) -> Iterator[Path]:
    if not have_history():
        pytest.skip("not a git checkout: the v0.1.0 code is not at hand")
    with release_worktree(tmp_path_factory.mktemp("release") / "v0.1.0") as path:
        yield path


def wait_for(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            got = fn()
            if got:
                return got
        except Exception as exc:  # an agent between lives, an election: ask again
            last = exc
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last error: {last!r})")


def leader(c: LocalCluster) -> str:
    return c.wait_for_leader(30)[0]


def status(c: LocalCluster, via: str) -> pb.StatusReply:
    with c.agents[via].client(timeout=5) as client:
        return client.status()


def nodes(c: LocalCluster) -> dict[str, pb.Node]:
    with c.agents[leader(c)].client(timeout=5) as client:
        return {n.name: n for n in client.call("ListNodes", pb.ListNodesRequest()).nodes}


def local_names(c: LocalCluster, via: str) -> set[str]:
    with c.agents[via].client(timeout=5) as client:
        return {d.spec.name for d in client.call("List", pb.ListRequest(serializable=True)).deployments}


def deploy(c: LocalCluster, name: str, model: Path) -> None:
    """A Deploy through any live agent, accepted within 30 s (no replicas: nothing to start)."""
    def attempt():
        for agent in c.alive_agents():
            try:
                with agent.client(timeout=20) as client:
                    return client.deploy(pb.DeploymentSpec(name=name, model=str(model), runtime="llamabox",
                                                           replicas=0, options=pb.RuntimeOptions(ctx_size=256)))
            except AgentdError as exc:
                if "already exists" in str(exc):
                    return True  # an earlier attempt committed it
        return None
    wait_for(attempt, 30, f"deploy {name} accepted")


def test_a_0_1_0_cluster_of_nine_learners_and_voters_upgrades_to_voters_and_watchers(tmp_path, release_0_1_0):
    model = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    old = code_env(release_0_1_0)
    # Three voters through the config file: 0.1.0 refuses AGENTD_MAX_VOTERS from the environment (a string
    # where its setting is a Literal of ints). standby_learners keeps this release's default.
    config = tmp_path / "agentd.toml"
    config.write_text("max_voters = 3\n")
    c = LocalCluster(tmp_path / "c", hosts=[simulated_host(n, gpus=1) for n in HOSTS],
                     extra_env={"AGENTD_CONFIG": str(config)}, agent_env={n: dict(old) for n in HOSTS})
    assert c.standby_learners == STANDBY
    try:
        c.start_agent(HOSTS[0], join=[])  # as LocalCluster.start, which would wait for its own 5 voters
        c.wait_for_leader(60)
        for name in HOSTS[1:]:
            c.start_agent(name)
        c.wait_for_members(len(HOSTS), 120)
        c.wait_for_members(3, 60, voters=True)
        members = {m.id: m.voter for m in status(c, leader(c)).members}
        assert len(members) == len(HOSTS) and sum(members.values()) == 3  # 0.1.0: every host holds the log
        deploy(c, "before", model)
        names = {"before"}

        # One by one, learners first, then the voters (a leader restarting hands its leadership over).
        order = sorted(HOSTS, key=lambda n: (members[n], n))
        for step, name in enumerate(order):
            c.kill(name, signal.SIGTERM)
            c.agent_env[name] = {}
            c.start_agent(name)
            wait_for(lambda n=name: status(c, n).leader_id, 60, f"{name} to follow a leader after its upgrade")
            deploy(c, f"step{step}", model)  # no downtime: a Deploy is accepted at every step
            names.add(f"step{step}")

        def settled() -> bool:
            st = status(c, leader(c))
            voters = sum(1 for m in st.members if m.voter)
            learners = sum(1 for m in st.members if not m.voter)
            roles = {n.name: n for n in nodes(c).values()}
            watchers = [n for n, x in roles.items() if x.role == "watcher"]
            return (voters == 3 and learners <= STANDBY and len(watchers) == len(HOSTS) - voters - learners
                    and all(x.state == "up" and x.agent_version == AGENT_VERSION for x in roles.values()))
        wait_for(settled, 120, "3 voters, at most 2 learners, the rest watchers, every host up on this release")
        final = nodes(c)
        assert sorted(final) == sorted(HOSTS)
        assert sum(1 for x in final.values() if x.role == "watcher") >= len(HOSTS) - 3 - STANDBY
        for name in HOSTS:  # the state intact on every host, members and watchers alike
            wait_for(lambda n=name: local_names(c, n) == names, 30, f"{name} to hold every deployment")
    finally:
        c.stop(drain=False)
