"""Who is in the cluster, as this agent answers it: members for the auth interceptor, joiners and watchers for
Raft, and (on the leader) which watcher is invited to stand by in Raft."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

from agentd.cluster.state import NODE_UP, node_command
from agentd.coordinator import removed_message
from agentd.errors import AgentdError
from agentd.version import AGENT_VERSION

if TYPE_CHECKING:
    from agentd.agent.wiring import Daemon


class Membership:
    def __init__(self, d: Daemon):
        self.d = d
        self.invited: tuple[str, float] | None = None  # the watcher asked to stand by in Raft, until when

    def invite(self, name: str) -> bool:
        """On the leader: ask this watcher to stand by in Raft while the seats for voters and standby learners
        are not all taken (a voter was demoted, a learner removed). One at a time; hosts in zones and racks no
        voter covers yet first."""
        if self.d.s.voters or not self.d.raft.is_leader:
            return False
        members = self.d.raft.members
        # A demoted voter that is down keeps its membership (it comes back as a non-voter): count live seats.
        # Per member, not through every live host: this runs for each report, and live_hosts() walks (and
        # copies the labels of) every host in the cluster.
        if name in members or sum(map(self.d.coordinator.is_live, members)) >= \
                self.d.s.max_voters + self.d.s.standby_learners:
            return False
        pending = self.invited
        now = time.monotonic()
        if pending is not None and pending[1] > now and pending[0] not in members:
            return name == pending[0]
        voters = [self.d.coordinator.reports.get(m) for m, x in members.items() if getattr(x, "voter", False)]
        covered = {(r.inventory.labels.get("zone"), r.inventory.labels.get("rack")) for r in voters if r}
        candidates = []
        for host in self.d.coordinator.live_hosts():
            rep = self.d.coordinator.reports[host.name]
            if host.name in members or rep.agent.state_format < 2 or self.d.state.removed(host.name) \
                    or host.name in {c.host for c in self.d.state.cordons.values() if c.gpu is None}:
                continue
            spot = (host.labels.get("zone"), host.labels.get("rack"))
            candidates.append((spot in covered, host.name))
        if not candidates:
            return False
        chosen = min(candidates)[1]
        self.invited = (chosen, now + 30.0)
        return name == chosen

    def can_watch(self, name: str) -> bool:
        """A member that runs a release with watchers (0.2.0 and later) may leave Raft to watch."""
        rep = self.d.coordinator.reports.get(name)
        return rep is not None and rep.agent.state_format >= 2

    async def watcher_joined(self, name: str, address: str) -> None:
        """Record a new watcher as a host of the cluster, so that every voter accepts its calls at once."""
        node = self.d.state.nodes.get(name)
        if node is None or node.state != NODE_UP:
            with contextlib.suppress(AgentdError):
                await self.d.raft.propose(node_command(name, NODE_UP, address))

    def admit_joiner(self, node_id: str, state_format: int) -> str:
        if self.d.state.removed(node_id):
            return removed_message(node_id)
        if state_format < self.d.state.cluster_format:
            return (f"the cluster writes state format {self.d.state.cluster_format} and the joiner applies formats "
                    f"up to {state_format}: install this cluster's release (agentd {AGENT_VERSION}) on it")
        return ""

    def is_member(self, name: str) -> bool | None:
        """Whether `name` is a member of the cluster, or None while this agent is in none (see AuthInterceptor).

        Members: Raft's (voters and learners), and hosts the replicated state knows and has not removed (a
        watcher, which follows the state outside Raft, once the leader recorded it)."""
        members, nodes = self.d.raft.members, self.d.state.nodes
        if self.d.node not in members and self.d.node not in nodes:
            return None
        if name in members:
            return True
        record = nodes.get(name)
        return record is not None and record.state != "removed"
