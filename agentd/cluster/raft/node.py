"""RaftNode: the asyncio driver that runs one RaftCore in a real process.

It owns the clock (ticks), the disk (FileStorage, fsync in a worker thread),
the network (GrpcTransport) and the state machine. Its loop drains the
core's Ready batches strictly in order: persist, then send, then apply, so no
message ever leaves before the state it depends on is on disk, and a command
resolves only after it is committed and applied here.

What the rest of agentd uses: `start`, `stop`, `propose`, `read_barrier`,
`add_member`, `remove_member`, `transfer_leadership`, `subscribe`, and the
read-only properties (`is_leader`, `leader_id`, `leader_address`, `term`,
`commit_index`, `last_applied`, `members`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc

from agentd.cluster.raft.core import NotLeader, RaftCore
from agentd.cluster.raft.membership import MembershipKeeper
from agentd.cluster.raft.storage import FileStorage, PersistedState, Storage
from agentd.cluster.raft.transport import (
    CHANNEL_OPTIONS,
    FORWARDED,
    SERVICE,
    GrpcTransport,
    TransportEvents,
)
from agentd.cluster.raft.types import (
    ConfigChange,
    Entry,
    EntryKind,
    HardState,
    Member,
    Membership,
    Message,
    RaftConfig,
    Ready,
    Role,
)
from agentd.cluster.raft.watch import (
    WATCHER_MARKER,
    Watcher,
    WatchFeed,
    encode_event,
    read_watcher_marker,
    write_watcher_marker,
)
from agentd.errors import AgentdError, InvalidInput, NotAvailable, PeerError, UpgradeRequired
from agentd.logs import fields
from agentd.v1 import raft_pb2 as pb

log = logging.getLogger(__name__)


class StateMachine(Protocol):
    """What the node replicates. Must be deterministic: every node applies the same entries in order."""

    def apply(self, index: int, term: int, command: bytes) -> Any: ...

    def snapshot(self) -> bytes: ...

    def restore(self, data: bytes) -> None: ...


@dataclass(frozen=True)
class LeaderChange:
    is_leader: bool
    leader_id: str | None
    term: int


@dataclass(frozen=True)
class RaftOptions:
    """Timing and limits; `from_settings` maps the daemon's configuration."""

    heartbeat_interval: float = 0.1
    election_timeout_min: float = 0.8  # the same defaults as agentd.config.Settings
    election_timeout_max: float = 1.2
    ticks_per_heartbeat: int = 5
    max_voters: int = 5
    voters: tuple[str, ...] = ()  # names that vote; empty = the first max_voters members
    snapshot_threshold: int = 8192  # applied entries between snapshots
    propose_timeout: float = 10.0
    join_timeout: float = 60.0
    catch_up_timeout: float = 30.0
    max_command_bytes: int = 1 << 20
    max_snapshot_bytes: int = 1 << 30
    fast_failover: bool = True
    # Watchers (docs/cluster.md): with every voter seat taken, a joiner that can watch stays out of Raft, except
    # for this many standby learners (kept caught up, promoted when a voter is removed).
    can_watch: bool = False
    standby_learners: int = 2
    # A voter silent this long is demoted (it keeps its identity and comes back as a non-voter) once a
    # caught-up learner can take its seat (the daemon: node_down_grace).
    voter_down_grace: float = 30.0

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> RaftOptions:
        values = {
            "heartbeat_interval": settings.heartbeat_interval,
            "election_timeout_min": settings.election_timeout_min,
            "election_timeout_max": settings.election_timeout_max,
            "max_voters": settings.max_voters,
            "voters": tuple(settings.voters),
            "can_watch": True,
            "standby_learners": settings.standby_learners,
            "voter_down_grace": settings.node_down_grace,
        }
        values.update(overrides)
        return cls(**values)

    @property
    def tick_interval(self) -> float:
        return self.heartbeat_interval / self.ticks_per_heartbeat

    def raft_config(self) -> RaftConfig:
        tick = self.tick_interval
        lo = max(self.ticks_per_heartbeat + 1, round(self.election_timeout_min / tick))
        hi = max(lo, round(self.election_timeout_max / tick))
        return RaftConfig(heartbeat_ticks=self.ticks_per_heartbeat, election_ticks_min=lo, election_ticks_max=hi,
                          fast_failover=self.fast_failover, failover_slot_ticks=self.ticks_per_heartbeat)


class RaftNode:
    def __init__(
        self,
        node_id: str,
        address: str,
        data_dir: Path | str,
        state_machine: StateMachine,
        *,
        options: RaftOptions | None = None,
        join: Sequence[str] = (),
        server: grpc.aio.Server | None = None,
        listen: str | None = None,
        storage: Storage | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`server`: a grpc.aio server to add the Raft service to (the caller starts it before `start`).

        Without one the node runs its own server on `listen` (default: `address`).
        """
        if not node_id:
            raise InvalidInput("node id must not be empty")
        self.id = node_id
        self.address = address
        self.options = options or RaftOptions()
        self.sm = state_machine
        self.join_addresses = [a for a in join if a and a != address]
        self._data_dir = Path(data_dir)
        self._storage: Storage = storage or FileStorage(Path(data_dir) / "raft", node_id)
        self._rng = rng or random.Random()
        self._clock = clock
        self.transport = GrpcTransport(
            node_id, address,
            TransportEvents(self._on_message, self._on_unreachable, self._on_connection_lost,
                            self._on_snapshot_sent, self._handle_join, self._handle_leave),
            write_timeout=max(self.options.election_timeout_min, 0.2),
            max_snapshot=self.options.max_snapshot_bytes,
        )
        self._own_server = server is None
        self._server = server or grpc.aio.server(options=CHANNEL_OPTIONS)
        self._listen = listen or address
        self.transport.register(self._server)
        # Watchers (agentd/cluster/raft/watch.py): a member serves its applied entries; a watcher follows one.
        self.feed = WatchFeed()
        self.watcher: Watcher | None = None
        # The log index that admitted this node (its join reply's; 0 when it did not join in this run): its calls
        # to voters name it, so a voter behind it waits instead of refusing it (agentd.security.auth).
        self.admitted_index = 0
        self.can_watch: Callable[[str], bool] = lambda member_id: False  # the daemon: runs a release that can
        self.on_removed: Callable[[], bool] = lambda: False  # True: a learner removed to make it a watcher
        self.on_watcher_joined: Callable[[str, str], Awaitable[None]] = _nothing  # the daemon records the host
        self._server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
            "Watch": grpc.unary_stream_rpc_method_handler(
                self._on_watch, request_deserializer=pb.RaftWatchRequest.FromString,
                response_serializer=encode_event)})])  # entries go out as bytes encoded once per feed
        self.core: RaftCore | None = None
        self.cluster_id = ""
        self._last_applied = 0
        # Why this node stopped applying (an entry or snapshot of a newer state format): it keeps voting and
        # storing the log, so a quorum holds, and applies again once restarted on a newer agentd.
        self.upgrade_required = ""
        self._compacting = False  # a snapshot of the state machine is being serialised in a worker thread
        # Why this node stopped for good (its storage failed, or the loop crashed): it must say nothing more,
        # and the daemon exits so the service manager restarts it (docs/cluster.md, "A member that cannot persist").
        self.fatal = ""
        self.on_fatal: Callable[[str], None] = lambda reason: None
        # Proposals are checked against it before they enter the log: "" admits, a reason refuses.
        self.admit: Callable[[bytes], str] = lambda command: ""
        # Joins too, by the joiner's name and state format: one that cannot apply what the cluster writes, or
        # that the operator removed for good, stays out.
        self.admit_joiner: Callable[[str, int], str] = lambda node_id, state_format: ""
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._proposals: dict[int, tuple[int, asyncio.Future]] = {}
        self._reads: dict[int, asyncio.Future] = {}
        self._read_waiting: list[tuple[int, asyncio.Future]] = []  # (index, future) until applied
        self._ctx = itertools.count(1)
        self._subscribers: list[Callable[[LeaderChange], None]] = []
        self.membership = MembershipKeeper(self)  # joins, leaves and the leader's seat decisions
        self._leader_event = asyncio.Event()
        self._applied_event = asyncio.Event()
        self._stopping = False
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.bound_port: int | None = None

    # ------------------------------------------------------------ properties

    @property
    def is_leader(self) -> bool:
        return self.watcher is None and self.core is not None and self.core.role == Role.LEADER

    @property
    def leader_id(self) -> str | None:
        if self.watcher is not None:
            return self.watcher.leader_id
        return self.core.leader if self.core else None

    @property
    def leader_address(self) -> str | None:
        if self.watcher is not None:
            return self.watcher.leader_address
        leader = self.leader_id
        if leader is None:
            return None
        if leader == self.id:
            return self.address
        return self.transport.address_of(leader)

    @property
    def role(self) -> Role:
        return self.core.role if self.core else Role.FOLLOWER

    @property
    def term(self) -> int:
        if self.watcher is not None:
            return self.watcher.term
        return self.core.term if self.core else 0

    @property
    def commit_index(self) -> int:
        if self.watcher is not None:
            return self.watcher.commit_index
        return self.core.committed if self.core else 0

    @property
    def last_applied(self) -> int:
        return self.watcher.last_applied if self.watcher is not None else self._last_applied

    @property
    def members(self) -> dict[str, Member]:
        """The latest membership (in force as soon as it is in the log): id -> Member(address, voter).

        A watcher is no member: it returns the members its voter last told it of."""
        if self.watcher is not None:
            return dict(self.watcher.members)
        return {m.id: m for m in self.core.membership.members} if self.core else {}

    def subscribe(self, callback: Callable[[LeaderChange], None]) -> Callable[[], None]:
        """Call `callback` on every change of leader or term; returns an unsubscribe function."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback) if callback in self._subscribers else None

    async def wait_for_leader(self, timeout: float | None = None) -> str:
        """The leader's id once one is known."""
        async with asyncio.timeout(timeout):
            while self.leader_id is None:
                self._leader_event.clear()
                await self._leader_event.wait()
        return self.leader_id

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open storage, bootstrap or join if new, start serving and ticking.

        Returns once the node runs; a joining node returns once it is a member.
        Raises RaftStorageError for a damaged data directory and PeerError when
        no join address accepted us within `join_timeout`.
        """
        marker = await asyncio.to_thread(read_watcher_marker, self._watcher_marker)
        if marker is not None:  # a watcher restarting: no log to load, a snapshot from a voter catches it up
            await self._serve_if_own()
            self._become_watcher(marker["cluster_id"], [*marker.get("seeds", []), *self.join_addresses])
            return
        state = await asyncio.to_thread(self._storage.load)
        joining = False
        if state.is_empty() and not self.join_addresses:
            state = await asyncio.to_thread(self._bootstrap)
        elif not state.cluster_id:
            if not self.join_addresses:
                raise NotAvailable(f"node {self.id} never finished joining a cluster: start it with --join")
            joining = True
        self.cluster_id = state.cluster_id
        self.transport.cluster_id = state.cluster_id
        self.core = RaftCore(self.id, hard_state=state.hard_state, snapshot=state.snapshot, entries=state.entries,
                             config=self.options.raft_config(), rng=self._rng, can_vote=not joining)
        if state.snapshot is not None:
            self.sm.restore(state.snapshot.data)
            self._last_applied = state.snapshot.meta.index
        self._sync_addresses()
        await self._serve_if_own()
        self.transport.ready = True
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(), name=f"raft-loop-{self.id}"),
                       loop.create_task(self._ticker(), name=f"raft-tick-{self.id}"),
                       loop.create_task(self.membership.reconcile_voters(), name=f"raft-voters-{self.id}")]
        self._tasks.append(loop.create_task(self.membership.keep_seat(self._seat_lost), name=f"raft-seat-{self.id}"))
        if self.core.membership.voters == (self.id,):
            self.core.campaign()  # a single voter need not wait for an election timeout
        self._kick()
        me = self.core.membership.get(self.id)
        if not joining and me is not None and me.address != self.address and self.join_addresses + [
                m.address for m in self.core.membership.members if m.id != self.id]:
            self._tasks.append(loop.create_task(self.membership.readdress(), name=f"raft-readdress-{self.id}"))
        log.info("raft node started", extra=fields(node=self.id, address=self.address, term=self.core.term,
                                                  last_index=self.core.log.last_index(), joining=joining))
        if joining:
            try:
                await self._join()
            except BaseException:
                await self.stop(graceful=False)
                raise

    async def _serve_if_own(self) -> None:
        if self._own_server and self.bound_port is None:
            self.bound_port = self._server.add_insecure_port(self._listen)
            if not self.bound_port:
                raise NotAvailable(f"cannot listen on {self._listen}")
            await self._server.start()

    # ------------------------------------------------------------ watchers (agentd/cluster/raft/watch.py)

    @property
    def _watcher_marker(self) -> Path:
        return self._data_dir / "raft" / WATCHER_MARKER

    def _become_watcher(self, cluster_id: str, seeds: Sequence[str]) -> None:
        """Follow the committed state from voters' Watch streams instead of holding the log."""
        self.cluster_id = self.transport.cluster_id = cluster_id
        self.watcher = Watcher(self.id, cluster_id, self.sm, [a for a in seeds if a and a != self.address],
                               self.transport.open_channel, on_leader=self._on_watched_leader)
        if self.core is not None:
            self.watcher.members = {m.id: m for m in self.core.membership.members}
        self._tasks.append(asyncio.get_running_loop().create_task(self._watch(), name=f"raft-watch-{self.id}"))
        log.info("following the cluster as a watcher", extra=fields(node=self.id, cluster=cluster_id,
                                                                     last_applied=self.watcher.last_applied))

    async def _watch(self) -> None:
        try:
            await self.watcher.run()
        finally:
            if self.watcher is not None and self.watcher.upgrade_required:
                self.upgrade_required = self.watcher.upgrade_required

    def _on_watched_leader(self, leader: str | None, term: int) -> None:
        if leader:
            self._leader_event.set()
        else:
            self._leader_event.clear()
        change = LeaderChange(False, leader, term)
        for cb in list(self._subscribers):
            cb(change)

    async def _seat_lost(self, reply: pb.RaftJoinReply) -> None:
        """The leader says this learner holds no seat (its removal never reached it): watch, as on removal."""
        if self.watcher is None and self.on_removed():
            await self._convert_to_watcher()

    async def _convert_to_watcher(self) -> None:
        """A learner the leader removed to make room (only voters hold the log): keep the state, watch on."""
        for t in self._tasks:
            if t is not asyncio.current_task():
                t.cancel()
        self._tasks = [t for t in self._tasks if t is asyncio.current_task()]
        self._fail_all(NotAvailable(f"{self.id} became a watcher; retry against the leader"))
        seeds = [m.address for m in self.core.membership.members if m.id != self.id]
        await asyncio.to_thread(write_watcher_marker, self._watcher_marker, self.cluster_id, seeds)
        self._become_watcher(self.cluster_id, seeds)

    async def _on_watch(self, req: pb.RaftWatchRequest, context: grpc.aio.ServicerContext):
        if self.watcher is not None or self.core is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{self.id} holds no log: watch a voter")
        if req.cluster_id and self.cluster_id and req.cluster_id != self.cluster_id:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"watcher of cluster {req.cluster_id}; this node is in {self.cluster_id}")
        async for ev in self.feed.serve(req, self, self.sm, self._clock):
            yield ev

    def _bootstrap(self) -> PersistedState:
        cluster_id = uuid.uuid4().hex
        membership = Membership((Member(self.id, self.address, True),))
        first = Entry(1, 1, EntryKind.CONFIG, membership.encode())
        self._storage.save(Ready(hard_state=HardState(1, None, 1), entries=(first,)))
        self._storage.set_cluster_id(cluster_id)
        log.info("bootstrapped a new single-node cluster", extra=fields(node=self.id, cluster=cluster_id))
        return PersistedState(self.id, cluster_id, HardState(1, None, 1), None, [first])

    async def stop(self, graceful: bool = True) -> None:
        """Stop; a graceful leader first hands leadership to the most caught-up voter."""
        if self._stopping:
            return
        if graceful and self.is_leader and len(self.core.membership.voters) > 1:
            with contextlib.suppress(AgentdError, TimeoutError):
                await self.transfer_leadership(timeout=self.options.election_timeout_min)
        self._stopping = True
        self.transport.ready = False
        if self.watcher is not None:
            await self.watcher.close()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        self._fail_all(NotAvailable(f"raft node {self.id} stopped"))
        await self.transport.close()
        for ch in self._channels.values():
            await ch.close()
        if self._own_server:
            await self._server.stop(0)
        self._storage.close()
        log.info("raft node stopped", extra=fields(node=self.id))

    # ------------------------------------------------------------ client API

    async def propose(self, command: bytes, timeout: float | None = None) -> Any:
        """Replicate `command`; returns the state machine's result once committed and applied here."""
        if self.watcher is not None:
            raise NotAvailable(self._not_leader())
        if len(command) > self.options.max_command_bytes:
            raise InvalidInput(f"command of {len(command)} bytes exceeds {self.options.max_command_bytes}")
        core = self._running_core()
        if core.role == Role.LEADER and (why := self.admit(command)):
            raise UpgradeRequired(why)
        try:
            index, term = core.propose(command)
        except NotLeader:
            raise NotAvailable(self._not_leader()) from None
        fut = asyncio.get_running_loop().create_future()
        self._proposals[index] = (term, fut)
        self._kick()
        return await self._await(fut, timeout, f"command at index {index} was not applied within {{t}}s "
                                               "(it may still commit)")

    async def read_barrier(self, timeout: float | None = None) -> int:
        if self.watcher is not None:
            raise NotAvailable(self._not_leader())
        return await self._read_barrier(timeout)

    async def _read_barrier(self, timeout: float | None = None) -> int:
        """Linearizable read point: once this returns, the local state reflects every write committed before the call.

        Only the leader can serve it (ReadIndex: it confirms with a quorum that it
        still leads, then waits until it has applied its commit index).
        """
        core = self._running_core()
        ctx = next(self._ctx)
        try:
            core.read_index(ctx)
        except NotLeader:
            raise NotAvailable(self._not_leader()) from None
        fut = asyncio.get_running_loop().create_future()
        self._reads[ctx] = fut
        self._kick()
        t = self.options.election_timeout_max if timeout is None else timeout
        return await self._await(fut, t, "leadership not confirmed within {t}s")

    async def add_member(self, member_id: str, address: str, voter: bool = True,
                         timeout: float | None = None) -> dict[str, Member]:
        """Add (or update the address of) a member. A voter joins as a learner and is promoted once caught up."""
        return await self.membership.add_member(member_id, address, voter, timeout)

    async def remove_member(self, member_id: str, timeout: float | None = None) -> dict[str, Member]:
        """Remove a member (a leader removing itself steps down once that commits)."""
        return await self.membership.remove_member(member_id, timeout)

    async def transfer_leadership(self, target: str | None = None, timeout: float | None = None) -> str:
        """Hand leadership to `target` (default: the most caught-up voter); returns the new leader."""
        core = self._leader_core()
        if target is None:
            others = [v for v in core.membership.voters if v != self.id and v in core.progress]
            if not others:
                raise NotAvailable("no other voter to transfer leadership to")
            target = max(others, key=lambda v: (core.progress[v].recent_active, core.progress[v].match))
        try:
            core.transfer_leadership(target)
        except NotLeader:
            raise NotAvailable(self._not_leader()) from None
        self._kick()
        t = self.options.election_timeout_min if timeout is None else timeout
        try:
            async with asyncio.timeout(t):
                while self.leader_id != target:
                    self._leader_event.clear()
                    await self._leader_event.wait()
        except TimeoutError:
            raise NotAvailable(f"leadership did not move to {target} within {t}s") from None
        return target

    async def leave(self, timeout: float | None = None) -> None:
        """Ask the cluster to remove this node (through the leader)."""
        if self.is_leader:
            await self.remove_member(self.id, timeout)
            return
        req = pb.RaftLeaveRequest(node_id=self.id)
        await self._forward("Leave", req, timeout or self.options.propose_timeout)

    # ------------------------------------------------------------ the loop

    def _kick(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        try:
            await self._drain_forever()
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug or a state machine that cannot restore: continuing could apply
            # entries out of order, so this node stops and says why.
            log.critical("raft loop failed; stopping the node", exc_info=True, extra=fields(node=self.id))
            self._fail_node("the Raft loop failed (see the log)")

    async def _drain_forever(self) -> None:
        core = self.core
        while True:
            await self._wake.wait()
            self._wake.clear()
            while core.has_ready():
                rd = core.ready()
                try:
                    if rd.must_persist:
                        await asyncio.to_thread(self._storage.save, rd)
                except (OSError, AgentdError) as exc:
                    # Without durable storage this node must not say anything more.
                    log.critical("cannot persist raft state; stopping the node", exc_info=True,
                                 extra=fields(node=self.id))
                    self._fail_node(f"cannot persist Raft state: {exc}")
                    return
                self.transport.send(rd.messages)
                if rd.soft_state is not None:
                    self._on_soft_state(rd)
                self._apply(rd)
                self._maybe_snapshot()

    def _fail_node(self, reason: str) -> None:
        self.fatal = reason
        self.transport.ready = False  # refuse peers at once, before the stop below has run
        asyncio.get_running_loop().create_task(self.stop(graceful=False))
        try:
            self.on_fatal(reason)
        except Exception:
            log.exception("on_fatal failed", extra=fields(node=self.id))

    async def _ticker(self) -> None:
        interval = self.options.tick_interval
        last = self._clock()
        while True:
            await asyncio.sleep(interval)
            now = self._clock()
            n = int((now - last) / interval)
            if n <= 0:
                continue
            last += n * interval
            # After a stall (SIGSTOP, a long callback) the core counts only part of the missed ticks
            # (RaftCore.advance): peers' answers may still be queued unread, and a stall of our own must
            # neither make a leader step down nor a follower campaign.
            self.core.advance(n)
            self._kick()

    def _stop_applying(self, exc: UpgradeRequired) -> None:
        """Apply nothing more until restarted on a newer agentd: skipping would leave this copy different."""
        self.upgrade_required = str(exc)
        log.critical("stopped applying the replicated state: this agent needs an upgrade",
                     extra=fields(node=self.id, reason=self.upgrade_required, last_applied=self._last_applied))
        for index in sorted(self._proposals):
            _, fut = self._proposals.pop(index)
            _fail(fut, UpgradeRequired(self.upgrade_required))

    def _apply(self, rd: Ready) -> None:
        if self.upgrade_required:
            return
        if rd.install and rd.snapshot is not None:
            try:
                self.sm.restore(rd.snapshot.data)
            except UpgradeRequired as exc:
                self._stop_applying(exc)
                return
            self._last_applied = rd.snapshot.meta.index
            self.feed.reset()
            for index in [i for i in self._proposals if i <= self._last_applied]:
                _, fut = self._proposals.pop(index)
                _fail(fut, NotAvailable("replaced by a snapshot from the leader; outcome unknown, check and retry"))
        membership_changed = False
        for e in rd.committed:
            result: Any = None
            error: BaseException | None = None
            if e.kind == EntryKind.NORMAL:
                try:
                    result = self.sm.apply(e.index, e.term, e.data)
                except UpgradeRequired as exc:
                    self._stop_applying(exc)
                    break
                except Exception as exc:  # a state machine bug; keep the log moving
                    log.exception("state machine failed to apply an entry", extra=fields(index=e.index))
                    error = exc
            elif e.kind == EntryKind.CONFIG:
                membership_changed = True
                result = Membership.decode(e.data)
            self._last_applied = e.index
            self.feed.applied(e)
            pending = self._proposals.pop(e.index, None)
            if pending is not None:
                term, fut = pending
                if term != e.term:
                    _fail(fut, NotAvailable("leadership changed before the command committed; it was not applied"))
                elif error is not None:
                    _fail(fut, error)
                elif not fut.done():
                    fut.set_result(result)
        if rd.committed or rd.install:
            self._applied_event.set()
        for rs in rd.reads:
            fut = self._reads.pop(rs.ctx, None)
            if fut is not None:
                self._read_waiting.append((rs.index, fut))
        for ctx in rd.dropped_reads:
            fut = self._reads.pop(ctx, None)
            if fut is not None:
                _fail(fut, NotAvailable(self._not_leader()))
        if self._read_waiting:
            still = []
            for index, fut in self._read_waiting:
                if index <= self._last_applied:
                    if not fut.done():
                        fut.set_result(index)
                else:
                    still.append((index, fut))
            self._read_waiting = still
        if membership_changed or rd.install or any(e.kind == EntryKind.CONFIG for e in rd.entries):
            self._sync_addresses()
            if membership_changed and self.core.membership.get(self.id) is None and self.watcher is None:
                if self.on_removed():
                    log.info("removed from Raft to make room: this agent goes on as a watcher",
                             extra=fields(node=self.id))
                    asyncio.get_running_loop().create_task(self._convert_to_watcher())
                else:
                    log.warning("this node was removed from the cluster; it follows no leader and never campaigns",
                                extra=fields(node=self.id))

    def _maybe_snapshot(self) -> None:
        core = self.core
        if self._compacting or self._last_applied - core.log.snap_index < self.options.snapshot_threshold:
            return
        if self._last_applied > core.log.applied:
            return
        index = self._last_applied
        later = getattr(self.sm, "snapshot_later", None)
        if later is None:
            self._compact(index, self.sm.snapshot())
            return
        serialise = later()  # this moment's state, taken now; serialised off the loop (heartbeats go on)
        self._compacting = True

        async def compact() -> None:
            try:
                data = await asyncio.to_thread(serialise)
                if self.core is core and core.log.snap_index < index <= core.log.applied:
                    self._compact(index, data)
            finally:
                self._compacting = False

        self._tasks.append(asyncio.get_running_loop().create_task(compact(), name=f"raft-compact-{self.id}"))

    def _compact(self, index: int, data: bytes) -> None:
        self.core.compact(index, data)
        log.info("compacted the raft log", extra=fields(node=self.id, index=index, bytes=len(data)))
        self._kick()

    def _on_soft_state(self, rd: Ready) -> None:
        ss = rd.soft_state
        if ss.role != Role.LEADER:
            for ctx, fut in list(self._reads.items()):
                _fail(fut, NotAvailable(self._not_leader()))
                self._reads.pop(ctx, None)
        if ss.leader is not None:
            self._leader_event.set()
        change = LeaderChange(ss.role == Role.LEADER, ss.leader, ss.term)
        for cb in list(self._subscribers):
            try:
                cb(change)
            except Exception:
                log.exception("leadership subscriber failed", extra=fields(node=self.id))
        self._leader_event.set()

    def _sync_addresses(self) -> None:
        self.transport.set_members({m.id: m.address for m in self.core.membership.members})

    # ------------------------------------------------------------ transport events

    def _on_message(self, msg: Message) -> None:
        if self.core is None or self._stopping:
            return
        self.core.step(msg)
        self._kick()

    def _on_unreachable(self, peer: str) -> None:
        if self.core is not None:
            self.core.report_unreachable(peer)
            self._kick()

    def _on_connection_lost(self, peer: str) -> None:
        if self.core is not None and not self._stopping and self.core.leader == peer:
            self.core.report_leader_lost(peer)
            self._kick()

    def _on_snapshot_sent(self, peer: str, ok: bool) -> None:
        if self.core is not None:
            self.core.report_snapshot(peer, ok)
            self._kick()

    # ------------------------------------------------------------ membership (agentd/cluster/raft/membership.py)

    async def _handle_join(self, req: pb.RaftJoinRequest, forwarded: bool) -> pb.RaftJoinReply:
        return await self.membership.handle_join(req, forwarded)

    async def _handle_leave(self, req: pb.RaftLeaveRequest, forwarded: bool) -> pb.RaftLeaveReply:
        return await self.membership.handle_leave(req, forwarded)

    async def _forward(self, method: str, req: Any, timeout: float) -> Any:
        address = self.leader_address
        if not address:
            raise NotAvailable("no leader elected yet; retry")
        stub = GrpcTransport.stub(self._channel(address))
        try:
            return await getattr(stub, method)(req, timeout=timeout, metadata=((FORWARDED, self.id),))
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error(exc, f"leader {self.leader_id} at {address}") from None

    def _channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = self.transport.open_channel(address)
        return ch

    def channel(self, address: str) -> grpc.aio.Channel:
        return self._channel(address)

    def leader_core(self) -> RaftCore:
        return self._leader_core()

    def kick(self) -> None:
        self._kick()

    def clock(self) -> float:
        return self._clock()

    async def _join(self) -> None:
        """Join through the join addresses; the reply makes this node a member (learner or voter) or a watcher."""
        reply = await self.membership.join(self.options.can_watch)
        self.admitted_index = reply.admitted_index
        for m in reply.members:
            self.transport.learn(m.id, m.address)
        if reply.watcher:
            seeds = [m.address for m in reply.members]
            await asyncio.to_thread(write_watcher_marker, self._watcher_marker, reply.cluster_id, seeds)
            for t in self._tasks:  # no log to keep: the Raft loop has nothing to do here
                t.cancel()
            self._tasks = []
            self._become_watcher(reply.cluster_id, seeds)
            self.watcher.members = {m.id: Member(m.id, m.address, m.voter) for m in reply.members}
            self.watcher.busy_voter = reply.leader_id  # streams first from a voter that does not lead
            self.watcher.admitted_index = reply.admitted_index
            log.info("joined the cluster as a watcher", extra=fields(node=self.id, cluster=reply.cluster_id,
                                                                    leader=reply.leader_id))
            return
        await asyncio.to_thread(self._storage.set_cluster_id, reply.cluster_id)
        self.cluster_id = reply.cluster_id
        self.transport.cluster_id = reply.cluster_id
        self.core.set_can_vote(True)
        log.info("joined the cluster", extra=fields(node=self.id, cluster=reply.cluster_id,
                                                   leader=reply.leader_id, voter=reply.voter))

    async def become_member(self) -> None:
        """A watcher the leader asked to stand by: join Raft as a learner (its state stays; the log comes by
        snapshot from the leader)."""
        if self.watcher is None or self._stopping:
            return
        watcher, self.watcher = self.watcher, None
        seeds = [m.address for m in watcher.members.values() if m.address] + self.join_addresses
        await watcher.close()
        for t in self._tasks:
            if t is not asyncio.current_task():
                t.cancel()
        self.join_addresses = [a for a in dict.fromkeys(seeds) if a and a != self.address]
        # A watcher's storage was opened at start and never written: it starts the log empty.
        self.core = RaftCore(self.id, hard_state=HardState(), snapshot=None, entries=[],
                             config=self.options.raft_config(), rng=self._rng, can_vote=False)
        self._last_applied = 0  # the leader's snapshot restores the state machine before anything is applied
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(), name=f"raft-loop-{self.id}"),
                       loop.create_task(self._ticker(), name=f"raft-tick-{self.id}"),
                       loop.create_task(self.membership.reconcile_voters(), name=f"raft-voters-{self.id}"),
                       loop.create_task(self.membership.keep_seat(self._seat_lost), name=f"raft-seat-{self.id}")]
        log.info("a watcher joins Raft as a standby learner", extra=fields(node=self.id))
        wanted, self.options = self.options, dataclasses.replace(self.options, can_watch=False)
        try:
            await self._join()
        except AgentdError as exc:
            log.warning("could not join Raft; watching on", extra=fields(node=self.id, reason=str(exc)))
            for t in self._tasks:
                t.cancel()
            self._tasks = []
            self._become_watcher(self.cluster_id, self.join_addresses)
            return
        finally:
            self.options = wanted
        await asyncio.to_thread(self._watcher_marker.unlink, missing_ok=True)

    async def apply_config(self, change: ConfigChange) -> None:
        """Propose one membership change and wait until it is applied; retries while another is in flight.
        The caller holds `membership.lock` (agentd/cluster/raft/membership.py decides what changes)."""
        while True:
            core = self._leader_core()
            try:
                index, term = core.propose_config(change)
                break
            except NotLeader:
                raise NotAvailable(self._not_leader()) from None
            except NotAvailable:
                await asyncio.sleep(self.options.heartbeat_interval)
        fut = asyncio.get_running_loop().create_future()
        self._proposals[index] = (term, fut)
        self._kick()
        await self._await(fut, self.options.propose_timeout, "membership change not committed within {t}s")
        log.info("membership changed", extra=fields(node=self.id, op=change.op, member=change.member_id,
                                                   index=index))

    # ------------------------------------------------------------ helpers

    def _running_core(self) -> RaftCore:
        if self.core is None or self._stopping:
            raise NotAvailable(f"raft node {self.id} is not running")
        return self.core

    def _leader_core(self) -> RaftCore:
        core = self._running_core()
        if core.role != Role.LEADER:
            raise NotAvailable(self._not_leader())
        return core

    def _not_leader(self) -> str:
        if self.leader_id and self.leader_id != self.id:
            return f"not leader; leader is {self.leader_id} at {self.leader_address or 'an unknown address'}"
        return "not leader; no leader elected yet"

    async def _await(self, fut: asyncio.Future, timeout: float | None, message: str) -> Any:
        t = self.options.propose_timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(asyncio.shield(fut), t)
        except TimeoutError:
            fut.add_done_callback(_consume)  # nobody waits for it any more
            raise NotAvailable(message.format(t=t)) from None

    def _fail_all(self, exc: AgentdError) -> None:
        for _, fut in self._proposals.values():
            _fail(fut, exc)
        for fut in self._reads.values():
            _fail(fut, exc)
        for _, fut in self._read_waiting:
            _fail(fut, exc)
        self._proposals, self._reads, self._read_waiting = {}, {}, []


async def _nothing(*args: Any) -> None:
    return None


def _consume(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


def _fail(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _rpc_error(exc: grpc.aio.AioRpcError, who: str) -> AgentdError:
    msg = f"{who}: {exc.details() or exc.code().name}"
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInput(msg)
    if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
        return PeerError(msg)
    return NotAvailable(msg)
