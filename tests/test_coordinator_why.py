"""The deploy reply says why each replica got its layout; the replicated state never holds that sentence.

Older agents refuse fields they do not know (docs: versioning), so the
runtime's `why` travels to the caller only, not into the committed
assignment.
"""

from __future__ import annotations

import json
from pathlib import Path

from agentd.cluster.state import ClusterState
from agentd.coordinator import Coordinator
from agentd.modelinfo import inspect_model
from agentd.placement import Placer
from agentd.plugins import PluginManager
from agentd.types import ClusterInventory, DeploymentSpec

ROOT = Path(__file__).resolve().parent.parent
AWQ = str(ROOT / "tests/scenarios/models/Llama-3.1-405B-Instruct-AWQ-INT4")


class Raft:
    """Consensus that applies each proposal at once, and keeps what was proposed."""

    def __init__(self, state: ClusterState):
        self.state, self.term, self.is_leader, self.index = state, 2, True, 0
        self.proposed: list[dict] = []
        self.members: dict[str, object] = {}

    async def propose(self, command: bytes, timeout: float | None = None):
        self.index += 1
        self.proposed.append(json.loads(command))
        return self.state.apply(self.index, self.term, command)


async def test_deploy_returns_the_why_and_commits_assignments_without_it():
    state = ClusterState()
    raft = Raft(state)
    plugins = PluginManager.load()
    coord = Coordinator(state=state, consensus=raft, place=Placer(plugins), inspect=inspect_model,
                        validate_runtime=plugins.runtime, port_range=(40000, 40999), node_down_grace=30.0)
    host = ClusterInventory.model_validate_json((ROOT / "examples/clusters/h100-nvlink.json").read_text()).hosts[0]
    coord.became_leader()
    coord.on_report(host, [])
    whys: list[str] = []
    result, _ = await coord.deploy(DeploymentSpec(name="big", model=AWQ, runtime="vllm"), whys=whys)
    assert result.ok
    assert len(whys) == 1 and whys[0].startswith("TP=4 on h100-node-1 GPUs 0-3 (NVLink): tensor parallel over NVLink")
    (a,) = state.assignments_for("big")
    assert a.plan.tensor_parallel == 4 and a.plan.why == ""
    more: list[str] = []
    result, _ = await coord.scale("big", 2, whys=more)
    assert result.ok and len(more) == 1 and more[0].startswith("TP=4 on h100-node-1 GPUs 4-7 (NVLink)")
    assert "why" not in json.dumps(raft.proposed)


async def test_the_deploy_reply_carries_the_why_through_a_forwarding_follower():
    from agentd.testing.control_world import Agent
    from agentd.v1 import control_pb2 as pb

    placer = Placer(PluginManager.load())
    a, b = Agent("a", placer), Agent("b", placer)
    try:
        for x in (a, b):
            await x.server.start()
        a.lead()
        b.follow(a)
        host = ClusterInventory.model_validate_json((ROOT / "examples/clusters/l40s-pcie.json").read_text()).hosts[0]
        a.coordinator.on_report(host.model_copy(update={"name": "a"}), [])
        reply = await b.stub.Deploy(pb.DeployRequest(spec=pb.DeploymentSpec(name="big", model=AWQ, runtime="vllm",
                                                                            replicas=1)))
        (why,) = reply.why
        assert why.startswith("PP=") and "(PCIe only): pipeline stages over PCIe" in why
        (assignment,) = json.loads(reply.deployment.assignments_json)
        assert "why" not in assignment["plan"]
    finally:
        for x in (a, b):
            await x.close()
