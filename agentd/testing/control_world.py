"""The API side of agents on real gRPC servers on loopback, with Raft replaced by a view that tests move by hand.

Shared by tests/test_control_api.py and the test modules that build on its agents, so that no test module imports
another. The fixtures `model`, `placer` and `agents` that go with it are in tests/conftest.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from agentd.api.control import AgentService, ChannelPool, ControlService, add_services
from agentd.cluster.state import ClusterState
from agentd.coordinator import Coordinator
from agentd.errors import InvalidInput, NotAvailable
from agentd.modelinfo import inspect_model
from agentd.plugins import PluginManager
from agentd.v1 import control_pb2 as pb
from agentd.v1 import control_pb2_grpc as pb_grpc


@dataclass
class Member:
    id: str
    address: str
    voter: bool = True


@dataclass
class RaftView:
    """What the services read from the Raft node; tests move leadership by hand."""

    node: str
    is_leader: bool = False
    leader_id: str | None = None
    leader_address: str | None = None
    term: int = 2
    commit_index: int = 0
    last_applied: int = 0
    members: dict[str, Any] = field(default_factory=dict)
    quorum: bool = True  # False: a leader cut off from the other voters cannot confirm that it still leads
    barriers: int = 0

    async def read_barrier(self, timeout: float | None = None) -> int:
        if not (self.is_leader and self.quorum):
            raise NotAvailable("leadership not confirmed within 2s")
        self.barriers += 1
        return self.commit_index


class Consensus:
    def __init__(self, view: RaftView, state: ClusterState):
        self.view, self.state, self.index = view, state, 0

    @property
    def term(self) -> int:
        return self.view.term

    @property
    def is_leader(self) -> bool:
        return self.view.is_leader

    async def propose(self, command: bytes, timeout: float | None = None):
        self.index += 1
        self.view.commit_index = self.view.last_applied = self.index
        return self.state.apply(self.index, self.view.term, command)

    @property
    def members(self) -> dict:
        return self.view.members


class Agent:
    """One agent's API side on a real gRPC server."""

    def __init__(self, name: str, place: Any):
        self.name = name
        self.state = ClusterState()
        self.raft = RaftView(name)
        self.coordinator = Coordinator(state=self.state, consensus=Consensus(self.raft, self.state), place=place,
                                       inspect=inspect_model, validate_runtime=PluginManager.load().runtime,
                                       port_range=(40000, 40099), node_down_grace=30)
        self.channels = ChannelPool()
        self.control = ControlService(node_id=name, raft=self.raft, state=self.state, coordinator=self.coordinator,
                                      channels=self.channels, local_logs=self._no_logs)
        self.agent = AgentService(raft=self.raft, coordinator=self.coordinator, control=self.control)
        self.server = grpc.aio.server()
        add_services(self.server, self.control, self.agent)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.raft.members[name] = Member(name, self.address)
        self.client_channel = grpc.aio.insecure_channel(self.address)
        self.stub = pb_grpc.ControlStub(self.client_channel)
        self.agent_stub = pb_grpc.AgentStub(self.client_channel)

    async def _no_logs(self, request: pb.LogsRequest) -> AsyncIterator[bytes]:
        raise InvalidInput("no logs here")
        yield b""

    def lead(self) -> None:
        self.raft.is_leader, self.raft.leader_id, self.raft.leader_address = True, self.name, self.address
        self.coordinator.became_leader()

    def follow(self, leader: Agent | None) -> None:
        self.raft.is_leader = False
        self.raft.leader_id = leader.name if leader else None
        self.raft.leader_address = leader.address if leader else None

    async def close(self) -> None:
        await self.client_channel.close()
        await self.channels.close()
        await self.server.stop(0)


def spec(model: Path, name: str = "chat", replicas: int = 1) -> pb.DeploymentSpec:
    return pb.DeploymentSpec(name=name, model=str(model), runtime="llamabox", replicas=replicas,
                             options=pb.RuntimeOptions(ctx_size=256))


async def watchers(agent: Agent, n: int) -> None:
    """Until `n` Watch streams are registered with the agent (a stream starts when its first read is sent)."""
    async with asyncio.timeout(5):
        while len(agent.control._watchers) < n:
            await asyncio.sleep(0.01)


async def rpc_error(call) -> grpc.aio.AioRpcError:
    """The error `call` fails with; an AssertionError when it succeeds."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the call succeeded where an RPC error was expected")
