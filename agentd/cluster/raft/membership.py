"""Who holds the Raft log: joins, leaves, re-addressing and the leader's seat decisions (docs/cluster.md, "Who
holds the log, who watches"; docs/raft.md, "Membership").

`Seats` is the pure policy: whether a joiner becomes a member or a watcher, whether it votes, which learners
are wanted as voters, which voter is dead enough to demote, which learner may leave Raft to watch.
`MembershipKeeper` carries the decisions out through the Raft node: it answers `Raft/Join` and `Raft/Leave`
on the leader, asks to join (or to record a new address) on a new or moved member, and runs the leader's
reconciliation loop (promote a caught-up learner, demote a voter silent past the grace, turn spare learners
into watchers). It reaches the node only through `RaftHost`, the few things of it that it needs, so the
Raft node keeps the log, the loop and the transport, and nothing of the seat policy.

One membership change at a time: every change goes through `lock`, and the reconciliation loop waits while
a change is in flight.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from agentd.cluster.raft.progress import ProgressState
from agentd.cluster.raft.transport import LEADER_HINT, AskTheLeader, GrpcTransport
from agentd.cluster.raft.types import ConfigChange, Member, Membership
from agentd.errors import AgentdError, InvalidInput, NotAvailable, PeerError, UpgradeRequired
from agentd.logs import fields
from agentd.v1 import raft_pb2 as pb
from agentd.version import (
    AGENT_VERSION,
    BASELINE_STATE_FORMAT,
    BASELINE_VERSION,
    STATE_FORMAT,
    UPGRADE_PHRASE,
    incompatibility,
)

if TYPE_CHECKING:
    from agentd.cluster.raft.core import RaftCore
    from agentd.cluster.raft.node import RaftOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Seats:
    """The seat policy: `voters` named by the operator (then only they vote), else the first `max_voters`
    members vote and `standby_learners` more hold the log; every other host watches."""

    voters: tuple[str, ...] = ()
    max_voters: int = 3
    standby_learners: int = 2

    @classmethod
    def from_options(cls, options: RaftOptions) -> Seats:
        return cls(tuple(options.voters), options.max_voters, options.standby_learners)

    def wants_member(self, m: Membership, member_id: str) -> bool:
        """Whether a new host joins Raft (to vote, or as a standby learner) rather than watching."""
        if self.voters:
            return member_id in self.voters or (
                len([x for x in m.members if x.id not in self.voters]) < self.standby_learners)
        # Seats are taken in join order: learners waiting for promotion hold theirs.
        return len(m.members) < self.max_voters + self.standby_learners

    def should_vote(self, m: Membership, member_id: str) -> bool:
        if self.voters:
            return member_id in self.voters
        return m.is_voter(member_id) or len(m.voters) < self.max_voters

    def wanted_voters(self, m: Membership) -> list[str]:
        """Learners the leader promotes once they are caught up."""
        learners = [x.id for x in m.members if not x.voter]
        if self.voters:
            return [i for i in learners if i in self.voters]
        return learners if len(m.voters) < self.max_voters else []

    def dead_voters(self, m: Membership, silent: Mapping[str, float], grace: float, me: str) -> list[str]:
        """Voters to demote, in order: silent past the grace (never the leader itself, never named voters,
        never the last voter)."""
        if self.voters or len(m.voters) <= 1:
            return []
        return sorted(v for v in m.voters if v != me and silent.get(v, 0.0) > grace)

    def spare_learners(self, m: Membership, wanted: Iterable[str], can_watch: Callable[[str], bool],
                       active: Callable[[str], bool] = lambda member_id: True) -> list[str]:
        """Learners beyond the standby seats, of a release that can watch: at most one (one change at a time),
        one the leader does not hear from first (a watcher invited to stand by replaces a learner that went
        quiet: removing the newcomer instead would invite it again, and so on)."""
        wanted = set(wanted)
        spare = [x.id for x in m.members if not x.voter and x.id not in wanted and can_watch(x.id)]
        extra = len(m.members) - len(m.voters) - self.standby_learners
        return sorted(spare, key=lambda i: (active(i), i))[:max(0, min(extra, 1))]


class RaftHost(Protocol):
    """What membership needs of the Raft node."""

    id: str
    address: str
    cluster_id: str
    options: RaftOptions
    core: RaftCore | None
    watcher: Any
    join_addresses: list[str]
    admit_joiner: Callable[[str, int], str]
    can_watch: Callable[[str], bool]
    on_watcher_joined: Callable[[str, str], Awaitable[None]]

    @property
    def is_leader(self) -> bool: ...

    @property
    def leader_id(self) -> str | None: ...

    @property
    def leader_address(self) -> str | None: ...

    @property
    def members(self) -> dict[str, Member]: ...

    def leader_core(self) -> RaftCore: ...

    async def apply_config(self, change: ConfigChange) -> None: ...

    def kick(self) -> None: ...

    def channel(self, address: str) -> grpc.aio.Channel: ...

    def clock(self) -> float: ...


def _members_pb(members: Mapping[str, Member]) -> list[pb.RaftMember]:
    return [pb.RaftMember(id=m.id, address=m.address, voter=m.voter) for m in members.values()]


class MembershipKeeper:
    def __init__(self, node: RaftHost):
        self.node = node
        self.lock = asyncio.Lock()  # one membership change at a time

    @property
    def seats(self) -> Seats:
        return Seats.from_options(self.node.options)

    # ------------------------------------------------------------ changes (the leader)

    async def change(self, change: ConfigChange) -> None:
        async with self.lock:
            await self.node.apply_config(change)

    async def add_member(self, member_id: str, address: str, voter: bool = True,
                         timeout: float | None = None) -> dict[str, Member]:
        """Add (or update the address of) a member. A voter joins as a learner and is promoted once caught up."""
        node = self.node
        if not member_id or not address:
            raise InvalidInput("a member needs an id and an address")
        async with asyncio.timeout(timeout or node.options.catch_up_timeout + node.options.propose_timeout):
            async with self.lock:
                cur = node.leader_core().membership.get(member_id)
                if cur is None:
                    await node.apply_config(ConfigChange("add_learner", member_id, address))
                elif cur.address != address:
                    await node.apply_config(ConfigChange("set_address", member_id, address))
                if voter and not node.leader_core().membership.is_voter(member_id):
                    await self.wait_caught_up(member_id)
                    await node.apply_config(ConfigChange("promote", member_id))
        return node.members

    async def remove_member(self, member_id: str, timeout: float | None = None) -> dict[str, Member]:
        """Remove a member (a leader removing itself steps down once that commits)."""
        node = self.node
        async with asyncio.timeout(timeout or node.options.propose_timeout):
            async with self.lock:
                if node.leader_core().membership.get(member_id) is None:
                    raise InvalidInput(f"{member_id} is not a member")
                await node.apply_config(ConfigChange("remove", member_id))
        return node.members

    async def wait_caught_up(self, member_id: str) -> None:
        node = self.node
        target = node.leader_core().committed
        async with asyncio.timeout(node.options.catch_up_timeout):
            while True:
                pr = node.leader_core().progress.get(member_id)
                if pr is not None and pr.match >= target:
                    return
                await asyncio.sleep(node.options.heartbeat_interval / 2)

    # ------------------------------------------------------------ Raft/Join and Raft/Leave (the leader)

    def _ask_the_leader(self) -> AskTheLeader:
        node = self.node
        return AskTheLeader(f"{node.id} is not the leader; ask the leader ({node.leader_id or 'unknown'}) at "
                            f"{node.leader_address or '?'}", node.leader_address or "")

    async def handle_join(self, req: pb.RaftJoinRequest, forwarded: bool) -> pb.RaftJoinReply:
        node = self.node
        if not req.node_id or not req.address or len(req.node_id) > 253 or any(c.isspace() for c in req.node_id):
            raise InvalidInput("join needs a node id without spaces and an address")
        if why := incompatibility(AGENT_VERSION, req.agent_version or BASELINE_VERSION) or node.admit_joiner(
                req.node_id, req.state_format or BASELINE_STATE_FORMAT):
            raise UpgradeRequired(f"{req.node_id} cannot join: {why}")
        if not node.is_leader:
            if forwarded:
                raise NotAvailable("leadership changed while the join was forwarded; retry")
            raise self._ask_the_leader()
        core = node.leader_core()
        existing = core.membership.get(req.node_id)
        # The reply's admission index is the leader's last log index: it holds the entry that admitted the joiner
        # even when the leader answers before that entry committed (a watcher's record proposed under load times
        # out, and the join goes on; it commits later). A voter that applied this far knows the joiner.
        if existing is None and req.can_watch and not self.seats.wants_member(core.membership, req.node_id):
            log.info("a host joined as a watcher", extra=fields(node=node.id, watcher=req.node_id))
            await node.on_watcher_joined(req.node_id, req.address)
            return pb.RaftJoinReply(cluster_id=node.cluster_id, leader_id=node.id, watcher=True,
                                    members=_members_pb(node.members), admitted_index=core.log.last_index())
        async with asyncio.timeout(node.options.catch_up_timeout + node.options.propose_timeout):
            if existing is None:
                await self.add_member(req.node_id, req.address, voter=False)
            elif req.has_log:
                if existing.address != req.address:  # restarted elsewhere with its disk: just re-address
                    await self.change(ConfigChange("set_address", req.node_id, req.address))
            else:
                # Same name, empty disk: what its old incarnation acknowledged is
                # gone. Let it catch up before it may vote again.
                log.warning("a member rejoined with an empty disk", extra=fields(node=req.node_id))
                async with self.lock:
                    if existing.address != req.address:
                        await node.apply_config(ConfigChange("set_address", req.node_id, req.address))
                    node.leader_core().forget_progress(req.node_id)
                    node.kick()
                    await self.wait_caught_up(req.node_id)
        return pb.RaftJoinReply(cluster_id=node.cluster_id, leader_id=node.id,
                                voter=self.seats.should_vote(node.core.membership, req.node_id),
                                members=_members_pb(node.members), admitted_index=core.log.last_index())

    async def handle_leave(self, req: pb.RaftLeaveRequest, forwarded: bool) -> pb.RaftLeaveReply:
        if not self.node.is_leader:
            if forwarded:
                raise NotAvailable("leadership changed while the request was forwarded; retry")
            raise self._ask_the_leader()
        members = await self.remove_member(req.node_id)
        return pb.RaftLeaveReply(members=_members_pb(members))

    # ------------------------------------------------------------ joining (a new member or watcher)

    async def join(self, can_watch: bool) -> pb.RaftJoinReply:
        """Ask the join addresses (and the leader any of them names) until one admits this node; the reply
        says whether it is a member (and votes) or watches. Raises PeerError after `join_timeout`, and
        UpgradeRequired when the cluster writes a state format this release cannot apply."""
        node = self.node
        deadline = node.clock() + node.options.join_timeout
        delay, last_error = 0.1, "no join address answered"
        hinted: list[str] = []  # a follower's answer says where the leader is: ask there next
        addresses = itertools.cycle(node.join_addresses)
        while True:
            address = hinted.pop() if hinted else next(addresses)
            if node.clock() > deadline:
                break
            stub = GrpcTransport.stub(node.channel(address))
            try:
                return await stub.Join(pb.RaftJoinRequest(node_id=node.id, address=node.address,
                                                          agent_version=AGENT_VERSION, state_format=STATE_FORMAT,
                                                          can_watch=can_watch),
                                       timeout=node.options.catch_up_timeout + node.options.propose_timeout)
            except grpc.aio.AioRpcError as exc:
                last_error = f"{address}: {exc.code().name}: {exc.details()}"
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and UPGRADE_PHRASE in (exc.details() or ""):
                    raise UpgradeRequired(f"could not join a cluster via {address}: {exc.details()}") from None
                leader = next((str(v) for k, v in (exc.trailing_metadata() or ()) if k == LEADER_HINT), "")
                if leader and leader != address:
                    hinted.append(leader)
                    continue
                log.info("join attempt failed; retrying", extra=fields(node=node.id, via=address, error=last_error))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        raise PeerError(f"could not join a cluster via {', '.join(node.join_addresses)}: {last_error}")

    async def readdress(self) -> None:
        """We restarted on a new address: ask the leader to record it (peers cannot reach us until then)."""
        node = self.node
        req = pb.RaftJoinRequest(node_id=node.id, address=node.address, has_log=True, agent_version=AGENT_VERSION,
                                 state_format=STATE_FORMAT)
        delay = 0.2
        while True:
            me = node.core.membership.get(node.id)
            if me is None or me.address == node.address:
                return
            targets = [node.leader_address] if node.leader_address and not node.is_leader else []
            targets += node.join_addresses + [m.address for m in node.core.membership.members if m.id != node.id]
            for address in targets:
                try:
                    await GrpcTransport.stub(node.channel(address)).Join(req, timeout=node.options.propose_timeout)
                    log.info("recorded our new address", extra=fields(node=node.id, address=node.address))
                    return
                except grpc.aio.AioRpcError:
                    continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def keep_seat(self, lost: Callable[[pb.RaftJoinReply], Awaitable[None]]) -> None:
        """On a learner: hearing no leader for three election timeouts, ask whether it still has a seat.

        A leader that removes a learner to make it a watcher (`_learners_to_watchers`) stops replicating to
        it once the removal commits, so the learner may never apply the entry that removes it: it would sit
        in Raft's log of a membership it is no longer in, following no leader, forever (a 0.1.0 cluster of
        nine hosts upgraded host by host did exactly that). Asked again with its log (`has_log`) and
        `can_watch`, the leader answers "watch" to a host it holds no seat for, and `lost` turns this node into
        a watcher with the state it has; a member is answered as before and nothing changes."""
        node = self.node
        lonely_since: float | None = None
        while True:
            await asyncio.sleep(max(node.options.heartbeat_interval * 5, 0.1))
            core = node.core
            if node.watcher is not None or core is None:
                return
            me = core.membership.get(node.id)  # None too while a new learner waits for its first snapshot
            if (me is not None and me.voter) or node.leader_id or not node.options.can_watch or not node.cluster_id:
                lonely_since = None
                continue
            now = node.clock()
            if lonely_since is None:
                lonely_since = now
            if now - lonely_since < node.options.election_timeout_max * 3:
                continue
            lonely_since = now
            reply = await self._ask_for_seat()
            if reply is not None and reply.watcher:
                log.info("no seat in Raft any more (the leader removed this learner to make room): watching",
                         extra=fields(node=node.id, leader=reply.leader_id))
                await lost(reply)
                return

    async def _ask_for_seat(self) -> pb.RaftJoinReply | None:
        node = self.node
        req = pb.RaftJoinRequest(node_id=node.id, address=node.address, has_log=True, can_watch=True,
                                 agent_version=AGENT_VERSION, state_format=STATE_FORMAT)
        targets = [m.address for m in node.core.membership.members if m.id != node.id] + node.join_addresses
        asked: set[str] = set()
        while targets:
            address = targets.pop(0)
            if not address or address in asked:
                continue
            asked.add(address)
            try:
                return await GrpcTransport.stub(node.channel(address)).Join(req, timeout=node.options.propose_timeout)
            except grpc.aio.AioRpcError as exc:
                leader = next((str(v) for k, v in (exc.trailing_metadata() or ()) if k == LEADER_HINT), "")
                if leader:
                    targets.insert(0, leader)
        return None

    # ------------------------------------------------------------ the leader's seat decisions

    async def reconcile_voters(self) -> None:
        """The leader promotes caught-up learners while there are fewer voters than wanted, and demotes a
        voter gone for longer than the grace once a learner can take its seat."""
        node = self.node
        last_heard: dict[str, float] = {}
        while True:
            await asyncio.sleep(max(node.options.heartbeat_interval * 5, 0.1))
            core = node.core
            if node.watcher is not None or core is None:
                return
            if not node.is_leader or not core.committed_in_term() or self.lock.locked():
                last_heard.clear()
                continue
            m = core.membership
            now = node.clock()
            for v in m.voters:
                pr = core.progress.get(v)
                if v == node.id or (pr is not None and pr.recent_active) or v not in last_heard:
                    last_heard[v] = now
            if await self._replace_a_dead_voter(m, {v: now - t for v, t in last_heard.items()}):
                continue
            wanted = self.seats.wanted_voters(m)
            ready = [i for i in wanted if i in core.progress and core.progress[i].recent_active
                     and core.progress[i].state == ProgressState.REPLICATE
                     and core.progress[i].match >= core.committed]
            if not ready:
                await self._learners_to_watchers(m, wanted)
                continue
            target = sorted(ready)[0]
            try:
                await self.change(ConfigChange("promote", target))
                log.info("promoted a learner to voter", extra=fields(node=node.id, member=target))
            except AgentdError as exc:
                log.info("could not promote a learner yet", extra=fields(member=target, reason=str(exc)))

    async def _replace_a_dead_voter(self, m: Membership, silent: dict[str, float]) -> bool:
        """Demote one voter silent past the grace. Safe with or without a successor ready: a dead voter
        counts toward the quorum's size but never toward a majority, so dropping it never costs one; a
        caught-up learner (a standby, or a watcher the leader invites) is then promoted to the free seat."""
        node = self.node
        core = node.core
        dead = self.seats.dead_voters(m, silent, node.options.voter_down_grace, node.id)
        if not dead:
            return False
        try:
            await self.change(ConfigChange("demote", dead[0]))
            ready = sorted(x.id for x in m.members if not x.voter and x.id in core.progress
                           and core.progress[x.id].recent_active)
            log.warning("demoted a voter that is down; its seat goes to a caught-up learner", extra=fields(
                node=node.id, voter=dead[0], silent=round(silent[dead[0]], 1), learners=ready))
            return True
        except AgentdError as exc:
            log.info("could not demote a voter yet", extra=fields(voter=dead[0], reason=str(exc)))
            return False

    async def _learners_to_watchers(self, m: Membership, wanted: list[str]) -> None:
        """Learners beyond the standby ones, of a release that can watch, leave Raft and watch instead (a
        cluster of agentd 0.1.0 made every host a learner: this converts it during a rolling upgrade)."""
        progress = self.node.core.progress
        active = lambda i: i in progress and progress[i].recent_active  # noqa: E731
        for member_id in self.seats.spare_learners(m, wanted, self.node.can_watch, active):
            try:
                await self.change(ConfigChange("remove", member_id))
                log.info("a learner leaves Raft to watch instead", extra=fields(node=self.node.id, member=member_id))
            except AgentdError as exc:
                log.info("could not turn a learner into a watcher yet", extra=fields(member=member_id,
                                                                                     reason=str(exc)))
