"""Raft consensus for agentd: a pure core, durable storage, a gRPC transport and an asyncio driver.

See docs/raft.md. Most callers need only RaftNode, RaftOptions and the
StateMachine protocol.
"""

from agentd.cluster.raft.core import NotLeader, RaftCore
from agentd.cluster.raft.node import LeaderChange, RaftNode, RaftOptions, StateMachine
from agentd.cluster.raft.storage import FileStorage, MemoryStorage, RaftStorageError
from agentd.cluster.raft.types import Member, Membership, RaftConfig, Role

__all__ = [
    "FileStorage",
    "LeaderChange",
    "Member",
    "Membership",
    "MemoryStorage",
    "NotLeader",
    "RaftConfig",
    "RaftCore",
    "RaftNode",
    "RaftOptions",
    "RaftStorageError",
    "Role",
    "StateMachine",
]
