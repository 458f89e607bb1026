"""Network partitions for Raft tests, without root or network namespaces.

`Partition` wraps one node's Raft transport (agentd/cluster/raft/transport.py): messages to a cut peer are
not sent, and messages from one are dropped before the node sees them. The production transport knows nothing
of it; a test installs it on an in-process `RaftNode` (`cut`), and a real agent installs it through the test
hooks (agentd/testing/agent_hooks.py) when it follows a fault file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from agentd.cluster.raft.transport import GrpcTransport


class Partition:
    """Drops Raft traffic to and from the peers in `blocked` (empty: the network is whole)."""

    def __init__(self, transport: GrpcTransport):
        self.blocked: frozenset[str] = frozenset()
        self._send: Callable[[Iterable[Any]], None] = transport.send
        deliver = transport.events.message

        def received(msg: Any) -> None:
            if msg.sender not in self.blocked:
                deliver(msg)

        transport.events = dataclasses.replace(transport.events, message=received)
        transport.send = self._filtered_send  # type: ignore[method-assign]

    def _filtered_send(self, msgs: Iterable[Any]) -> None:
        self._send([m for m in msgs if m.to not in self.blocked])

    def set(self, peers: Iterable[str]) -> None:
        self.blocked = frozenset(peers)


def cut(node: Any, peers: Iterable[str]) -> Partition:
    """Cut `node` (a RaftNode) off from `peers`; `cut(node, [])` heals. Installs the wrapper on first use."""
    partition = getattr(node, "_test_partition", None)
    if partition is None:
        partition = node._test_partition = Partition(node.transport)
    partition.set(peers)
    return partition
