"""A coordinator driven without a network, for tests: consensus that applies each proposal at once to a real
ClusterState (what a one-node Raft does, minus the disk), an injected clock, and simulated hosts.

Shared by the coordinator's test modules (tests/test_coordinator.py and those that build on its world), so that
no test module imports another. The fixtures `models` and `placer` that go with it are in tests/conftest.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from agentd.cluster.state import ClusterState
from agentd.coordinator import Coordinator, InstanceReport
from agentd.errors import NotAvailable
from agentd.modelinfo import inspect_model
from agentd.placement import Placer
from agentd.testing.localcluster import simulated_host
from agentd.types import Assignment, DeploymentSpec, HostInventory, RuntimeOptions
from agentd.version import STATE_FORMAT

GRACE = 30.0


class FakeRaft:
    """Consensus as the coordinator sees it: propose applies at once, while this node leads."""

    def __init__(self, state: ClusterState, term: int = 3):
        self.state = state
        self.term = term
        self.is_leader = True
        self.index = 0
        self.proposed: list[dict] = []
        self.members: dict[str, object] = {}

    async def propose(self, command: bytes, timeout: float | None = None):
        if not self.is_leader:
            raise NotAvailable("not leader")
        self.index += 1
        self.proposed.append(json.loads(command))
        return self.state.apply(self.index, self.term, command)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class World:
    """A coordinator, its state and consensus, and the hosts that report to it."""

    def __init__(self, placer: Placer, hosts: Iterable[dict], port_range: tuple[int, int] = (40000, 40999)):
        self.state = ClusterState()
        self.state.cluster_format = STATE_FORMAT  # a cluster this release created (tests/test_versioning.py)
        self.raft = FakeRaft(self.state)
        self.clock = Clock()
        self.hosts = {h["name"]: HostInventory.model_validate(h) for h in hosts}
        self.coord = self.new_coordinator(placer, port_range)

    def new_coordinator(self, placer: Placer, port_range: tuple[int, int] = (40000, 40999)) -> Coordinator:
        """What a newly elected agent builds: the same replicated state, no soft state."""
        plugins = placer.plugins
        return Coordinator(state=self.state, consensus=self.raft, place=placer, inspect=inspect_model,
                           validate_runtime=plugins.runtime, port_range=port_range, node_down_grace=GRACE,
                           clock=self.clock)

    def report(self, *names: str, instances: dict[str, list[InstanceReport]] | None = None) -> None:
        for name in names or self.hosts:
            self.coord.on_report(self.hosts[name], (instances or {}).get(name, []))

    def start(self) -> World:
        self.coord.became_leader()
        self.report()
        return self


def spec(name: str, model: str, replicas: int = 1, **kw) -> DeploymentSpec:
    kw.setdefault("options", RuntimeOptions(ctx_size=256))
    return DeploymentSpec(name=name, model=model, runtime="llamabox", replicas=replicas, **kw)


def hosts_of(a: Assignment) -> list[str]:
    return [p.host for p in a.plan.parts]


def host(name: str, address: str = "127.0.0.1:7070", gpus: int = 1, gpu_gib: float = 0.272, **kw) -> dict:
    return {**simulated_host(name, gpus=gpus, gpu_gib=gpu_gib, **kw), "address": address}
