"""The Raft state machine: pure, deterministic, single-threaded.

No clocks, sockets, files or asyncio here. Time arrives as `tick()`, peers'
messages as `step()`, clients as `propose()`/`read_index()`; everything the
outside world must do comes back from `ready()` (persist, then send, then
apply), in the style of etcd's raft package. The same object therefore runs
under the asyncio driver and under the seeded simulator in the tests, and a
restart is "build a new core from what storage holds".

Beyond the paper's basics it implements pre-vote and check-quorum (so a
partitioned or resumed old leader neither disrupts nor commits), the leader
lease on votes (dissertation §4.2.3), ReadIndex reads, single-server
membership changes with learners, snapshots, leadership transfer, and a fast
failover hint: when the transport sees the leader's connection break, voters
campaign in id order one slot apart instead of sitting out a full timeout.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable

from agentd.cluster.raft.log import RaftLog
from agentd.cluster.raft.progress import Progress, ProgressState
from agentd.cluster.raft.types import (
    AppendRequest,
    AppendResponse,
    ConfigChange,
    Entry,
    EntryKind,
    HardState,
    Heartbeat,
    HeartbeatResponse,
    Member,
    Membership,
    Message,
    RaftConfig,
    ReadState,
    Ready,
    Role,
    Snapshot,
    SnapshotRequest,
    SoftState,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)
from agentd.errors import InvalidInput, NotAvailable
from agentd.logs import fields

log = logging.getLogger(__name__)


class NotLeader(NotAvailable):
    """This node cannot take the request; `leader` is who can (None when unknown)."""

    def __init__(self, leader: str | None, message: str | None = None):
        self.leader = leader
        super().__init__(message or (f"not leader; leader is {leader}" if leader else "not leader; no leader known"))


class RaftCore:
    def __init__(
        self,
        node_id: str,
        *,
        hard_state: HardState = HardState(),
        snapshot: Snapshot | None = None,
        entries: Iterable[Entry] = (),
        config: RaftConfig = RaftConfig(),
        rng: random.Random,
        can_vote: bool = True,
    ) -> None:
        self.id = node_id
        self.cfg = config
        self._rng = rng
        self.log = RaftLog(snapshot, list(entries), hard_state.commit)
        self.term = hard_state.term
        self.vote = hard_state.vote
        self.role = Role.FOLLOWER
        self.leader: str | None = None
        # A node that lost its disk or has not finished joining must not vote:
        # its empty log would let a stale candidate win (see docs/raft.md).
        self.can_vote = can_vote
        self.progress: dict[str, Progress] = {}
        self._votes: dict[str, bool] = {}
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._timeout = self._random_timeout()
        self._transferee: str | None = None
        self._read_seq = 0
        self._pending_reads: list[tuple[int, int, int]] = []  # (ctx, index, seq)
        self._reads_before_commit: list[int] = []  # ctx waiting for the first commit of our term
        self._ready_reads: list[ReadState] = []
        self._dropped_reads: list[int] = []
        self._msgs: list[Message] = []
        self._snapshot_out: Snapshot | None = None
        self._install = False
        self._prev_hard = HardState(self.term, self.vote, self.log.committed)
        self._prev_soft = self.soft_state()

    # ------------------------------------------------------------ properties

    @property
    def membership(self) -> Membership:
        return self.log.membership()

    @property
    def committed(self) -> int:
        return self.log.committed

    def soft_state(self) -> SoftState:
        return SoftState(self.role, self.leader, self.term)

    def promotable(self) -> bool:
        return self.can_vote and self.membership.is_voter(self.id)

    def _quorum(self, voters: tuple[str, ...]) -> int:
        return len(voters) // 2 + 1

    def _random_timeout(self) -> int:
        return self._rng.randint(self.cfg.election_ticks_min, self.cfg.election_ticks_max)

    def committed_in_term(self) -> bool:
        """Whether this leader has committed an entry of its own term (safe to serve reads)."""
        return self.log.term(self.log.committed) == self.term

    # ------------------------------------------------------------ ready

    def has_ready(self) -> bool:
        log_ = self.log
        hard, soft = self._prev_hard, self._prev_soft
        return bool(
            self._msgs
            or self._snapshot_out is not None
            or log_.unstable_from <= log_.last_index()
            or log_.committed > log_.applied
            or self._ready_reads
            or self._dropped_reads
            or self.term != hard.term
            or self.vote != hard.vote
            or log_.committed != hard.commit
            or self.role != soft.role
            or self.leader != soft.leader
            or self.term != soft.term
        )

    def ready(self) -> Ready:
        """Drain the output. The caller must persist, then send, then apply (see Ready)."""
        hard = HardState(self.term, self.vote, self.log.committed)
        soft = self.soft_state()
        rd = Ready(
            hard_state=hard if hard != self._prev_hard else None,
            entries=tuple(self.log.unstable()),
            snapshot=self._snapshot_out,
            install=self._install,
            messages=tuple(self._msgs),
            committed=tuple(self.log.next_committed()),
            reads=tuple(self._ready_reads),
            soft_state=soft if soft != self._prev_soft else None,
            dropped_reads=tuple(self._dropped_reads),
        )
        self.log.mark_stable()
        self._prev_hard, self._prev_soft = hard, soft
        self._msgs, self._ready_reads, self._dropped_reads = [], [], []
        self._snapshot_out, self._install = None, False
        return rd

    def _send(self, msg: Message) -> None:
        self._msgs.append(msg)
        if self.role == Role.LEADER and isinstance(msg, AppendRequest | Heartbeat | SnapshotRequest):
            pr = self.progress.get(msg.to)
            if pr is not None:
                pr.awaiting = True  # from now on its silence counts (check-quorum)

    # ------------------------------------------------------------ role changes

    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = None
        self.leader = None
        self._votes = {}
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._timeout = self._random_timeout()
        self._transferee = None
        self.progress = {}
        self._drop_reads()

    def _drop_reads(self) -> None:
        self._dropped_reads.extend(ctx for ctx, _, _ in self._pending_reads)
        self._dropped_reads.extend(self._reads_before_commit)
        self._pending_reads, self._reads_before_commit = [], []

    def _become_follower(self, term: int, leader: str | None) -> None:
        was_leader = self.role == Role.LEADER
        self._reset(term)
        self.role = Role.FOLLOWER
        self.leader = leader
        if was_leader:
            log.info("stepped down", extra=fields(node=self.id, term=term, leader=leader))

    def _become_pre_candidate(self) -> None:
        # Pre-vote changes neither term nor vote: a node that cannot win never
        # bumps the cluster's term (dissertation §9.6).
        self.role = Role.PRE_CANDIDATE
        self.leader = None
        self._votes = {}
        self._election_elapsed = 0
        self._timeout = self._random_timeout()

    def _become_candidate(self) -> None:
        self._reset(self.term + 1)
        self.vote = self.id
        self.role = Role.CANDIDATE

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.role = Role.LEADER
        self.leader = self.id
        last = self.log.last_index()
        for mid in self.membership.ids:
            if mid != self.id:
                self.progress[mid] = Progress(next=last + 1)
        log.info("became leader", extra=fields(node=self.id, term=self.term, last_index=last))
        # An entry of our own term lets earlier terms' entries commit (Figure 8)
        # and tells us when reads and membership changes become safe.
        self._append_local(EntryKind.NOOP, b"")
        self._broadcast_append()

    # ------------------------------------------------------------ time

    def advance(self, ticks: int) -> None:
        """`ticks` ticks of wall clock passed since the last call (the driver's clock).

        At most one heartbeat interval of them counts. More means this node's
        own loop was stalled (SIGSTOP, a long callback): what peers sent
        meanwhile may still be waiting unread, so the missed time proves
        nothing about their silence and must neither make a leader step down
        nor a follower campaign. A whole heartbeat interval does count, so a
        resumed leader heartbeats at once: the answers tell it within a round
        trip whether it still leads (one deposed meanwhile gets the newer term).
        """
        for _ in range(min(ticks, self.cfg.heartbeat_ticks)):
            self.tick()

    def tick(self) -> None:
        if self.role == Role.LEADER:
            self._tick_leader()
        else:
            self._election_elapsed += 1
            if self._election_elapsed >= self._timeout:
                self._election_elapsed = 0
                if self.promotable():
                    self._campaign(pre_vote=self.cfg.pre_vote)
                else:
                    self._timeout = self._random_timeout()

    def _tick_leader(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        for pr in self.progress.values():
            if pr.awaiting:
                pr.silent_ticks += 1
            if pr.state == ProgressState.SNAPSHOT:
                pr.snapshot_elapsed += 1
                if pr.snapshot_elapsed >= 4 * self.cfg.election_ticks_max:
                    pr.become_probe()  # the snapshot or its answer was lost; start over
        if self.cfg.check_quorum and not self._quorum_active():
            log.warning("cannot hear a quorum of voters", extra=fields(node=self.id, term=self.term))
            self._become_follower(self.term, None)
            return
        if self._election_elapsed >= self.cfg.election_ticks_min:
            self._election_elapsed = 0
            for pr in self.progress.values():
                pr.recent_active = False
            if self._transferee is not None:
                log.info("leadership transfer timed out", extra=fields(node=self.id, target=self._transferee))
                self._transferee = None
        if self._heartbeat_elapsed >= self.cfg.heartbeat_ticks:
            self._heartbeat_elapsed = 0
            self._broadcast_heartbeat()

    def _quorum_active(self) -> bool:
        """Check-quorum: a voter counts as gone only when it left something this leader sent unanswered for a
        whole election timeout. A leader that sent nothing, or whose own loop stalled (see `advance`), has no
        evidence against anyone; a leader cut off from a quorum sends heartbeats nobody answers, and steps down
        about one election timeout after the cut."""
        voters = self.membership.voters
        limit = self.cfg.election_ticks_min
        active = sum(1 for v in voters
                     if v == self.id or (v in self.progress and self.progress[v].silent_ticks < limit))
        return active >= self._quorum(voters)

    # ------------------------------------------------------------ elections

    def campaign(self) -> None:
        """Start an election now (bootstrap of a single voter, tests)."""
        if self.role != Role.LEADER and self.promotable():
            self._campaign(pre_vote=False)

    def _campaign(self, *, pre_vote: bool, transfer: bool = False) -> None:
        if pre_vote:
            self._become_pre_candidate()
            vote_term = self.term + 1
        else:
            self._become_candidate()
            vote_term = self.term
        self._votes[self.id] = True
        if self._tally() == "won":
            self._on_election_won(pre_vote)
            return
        for voter in self.membership.voters:
            if voter != self.id:
                self._send(VoteRequest(vote_term, self.id, voter, self.log.last_index(), self.log.last_term(),
                                       pre_vote=pre_vote, transfer=transfer))

    def _tally(self) -> str:
        voters = self.membership.voters
        granted = sum(1 for v in voters if self._votes.get(v) is True)
        rejected = sum(1 for v in voters if self._votes.get(v) is False)
        q = self._quorum(voters)
        if granted >= q:
            return "won"
        if rejected >= q:
            return "lost"
        return "pending"

    def _on_election_won(self, pre_vote: bool) -> None:
        if pre_vote:
            self._campaign(pre_vote=False)
        else:
            self._become_leader()

    def _handle_vote_request(self, m: VoteRequest) -> None:
        can_vote = (
            self.vote == m.sender
            or (self.vote is None and self.leader is None)
            or (m.pre_vote and m.term > self.term)
        )
        # A learner or a server that knows no configuration yet (a node that
        # rejoined under a reused name with an empty disk) only votes for
        # voters of the configuration it knows. Otherwise a long-removed node
        # with a stale configuration and a stale log could win with its vote.
        if not self.membership.is_voter(self.id) and not self.membership.is_voter(m.sender):
            can_vote = False
        if self.can_vote and can_vote and self.log.is_up_to_date(m.last_index, m.last_term):
            # A granted pre-vote answers in the candidate's future term so the
            # candidate can tell it from a stale answer.
            self._send(VoteResponse(m.term, self.id, m.sender, True, m.pre_vote))
            if not m.pre_vote:
                self.vote = m.sender
                self._election_elapsed = 0
        else:
            self._send(VoteResponse(self.term, self.id, m.sender, False, m.pre_vote))

    def _handle_vote_response(self, m: VoteResponse) -> None:
        expected = Role.PRE_CANDIDATE if m.pre_vote else Role.CANDIDATE
        if self.role != expected:
            return
        self._votes.setdefault(m.sender, m.granted)
        outcome = self._tally()
        if outcome == "won":
            self._on_election_won(m.pre_vote)
        elif outcome == "lost":
            self._become_follower(self.term, None)

    # ------------------------------------------------------------ step

    def step(self, m: Message) -> None:
        """Handle one message from a peer. Never raises on a well-typed message."""
        if m.term > self.term:
            if isinstance(m, VoteRequest):
                in_lease = (
                    self.cfg.check_quorum
                    and self.leader is not None
                    and self._election_elapsed < self.cfg.election_ticks_min
                )
                if in_lease and not m.transfer:
                    return  # we heard from a live leader recently: do not let this node disrupt it
                if m.pre_vote:
                    self._handle_vote_request(m)
                    return
                self._become_follower(m.term, None)
            elif isinstance(m, VoteResponse) and m.pre_vote and m.granted:
                pass  # carries the term the pre-candidate asked about, not a newer cluster term
            else:
                leader = m.sender if isinstance(m, AppendRequest | Heartbeat | SnapshotRequest) else None
                self._become_follower(m.term, leader)
        elif m.term < self.term:
            # Tell a stale leader or pre-candidate about the newer term so it
            # steps down at once (e.g. a leader resumed after SIGSTOP).
            if isinstance(m, AppendRequest | Heartbeat | SnapshotRequest):
                self._send(AppendResponse(self.term, self.id, m.sender, False, 0, last_index=self.log.last_index()))
            elif isinstance(m, VoteRequest):
                self._send(VoteResponse(self.term, self.id, m.sender, False, m.pre_vote))
            return

        if isinstance(m, VoteRequest):
            self._handle_vote_request(m)
        elif self.role == Role.LEADER:
            self._step_leader(m)
        else:
            self._step_follower(m)

    def _step_follower(self, m: Message) -> None:
        if isinstance(m, AppendRequest | Heartbeat | SnapshotRequest):
            if self.role != Role.FOLLOWER or self.leader != m.sender:
                self._become_follower(self.term, m.sender)
            self._election_elapsed = 0
            if isinstance(m, AppendRequest):
                self._handle_append(m)
            elif isinstance(m, Heartbeat):
                self.log.commit_to(m.commit)
                self._send(HeartbeatResponse(self.term, self.id, m.sender, m.seq))
            else:
                self._handle_snapshot(m)
        elif isinstance(m, VoteResponse):
            self._handle_vote_response(m)
        elif isinstance(m, TimeoutNow) and self.role == Role.FOLLOWER and self.promotable():
            log.info("leadership transferred to us", extra=fields(node=self.id, term=self.term))
            self._campaign(pre_vote=False, transfer=True)

    def _handle_append(self, m: AppendRequest) -> None:
        if m.prev_index < self.log.committed:
            self._send(AppendResponse(self.term, self.id, m.sender, True, self.log.committed))
            return
        last_new = self.log.maybe_append(m.prev_index, m.prev_term, m.entries)
        if last_new is not None:
            self.log.commit_to(min(m.commit, last_new))
            self._send(AppendResponse(self.term, self.id, m.sender, True, last_new))
        else:
            hint_index, hint_term = self.log.conflict_hint(m.prev_index)
            self._send(AppendResponse(self.term, self.id, m.sender, False, m.prev_index, hint_index, hint_term,
                                      self.log.last_index()))

    def _handle_snapshot(self, m: SnapshotRequest) -> None:
        meta = m.snapshot.meta
        if meta.index <= self.log.committed:
            self._send(AppendResponse(self.term, self.id, m.sender, True, self.log.committed))
        elif self.log.matches(meta.index, meta.term):
            self.log.commit_to(meta.index)  # we already hold that prefix: fast-forward
            self._send(AppendResponse(self.term, self.id, m.sender, True, meta.index))
        else:
            log.info("installing snapshot", extra=fields(node=self.id, index=meta.index, term=meta.term))
            self.log.restore(m.snapshot)
            self._snapshot_out, self._install = m.snapshot, True
            self._send(AppendResponse(self.term, self.id, m.sender, True, self.log.last_index()))

    def _step_leader(self, m: Message) -> None:
        pr = self.progress.get(m.sender)
        if pr is None:
            return  # not (or no longer) a member
        if isinstance(m, AppendResponse | HeartbeatResponse):
            pr.awaiting, pr.silent_ticks = False, 0
        if isinstance(m, AppendResponse):
            pr.recent_active = True
            if m.success:
                self._on_append_success(m.sender, pr, m.index)
            else:
                self._on_append_reject(m.sender, pr, m)
        elif isinstance(m, HeartbeatResponse):
            pr.recent_active = True
            pr.paused = False
            if m.seq > pr.acked_seq:
                pr.acked_seq = m.seq
                self._confirm_reads()
            if pr.state == ProgressState.REPLICATE and pr.is_paused(self.cfg.max_inflight):
                pr.inflight.popleft()  # an append may have been lost: let one more through
            if pr.match < self.log.last_index():
                self._send_append(m.sender, allow_empty=True)

    def _on_append_success(self, peer: str, pr: Progress, index: int) -> None:
        if pr.update(index):
            if pr.state != ProgressState.REPLICATE:
                pr.become_replicate()
            if self._maybe_commit():
                self._broadcast_append()
        self._fill(peer)
        if self.role == Role.LEADER and peer == self._transferee and pr.match == self.log.last_index():
            self._send(TimeoutNow(self.term, self.id, peer))

    def _fill(self, peer: str) -> None:
        """Send appends to `peer` until its window is full or it has everything."""
        while peer in self.progress and self._send_append(peer):
            pass

    def _on_append_reject(self, peer: str, pr: Progress, m: AppendResponse) -> None:
        if m.index <= pr.match or pr.state == ProgressState.SNAPSHOT:
            return  # stale: it has acknowledged more than that since
        if pr.state == ProgressState.PROBE and m.index != pr.next - 1:
            return  # the answer to an older probe
        nxt = m.hint_index
        if m.hint_term:
            found = self.log.last_index_of_term(m.hint_term, m.index)
            if found is not None:
                nxt = found + 1
        pr.become_probe()
        pr.next = max(min(nxt, m.index), pr.match + 1, 1)
        self._send_append(peer)

    # ------------------------------------------------------------ replication

    def _send_append(self, peer: str, allow_empty: bool = False) -> bool:
        pr = self.progress[peer]
        if pr.is_paused(self.cfg.max_inflight):
            return False
        prev = pr.next - 1
        prev_term = self.log.term(prev)
        if prev_term is None:
            snap = self.log.snapshot
            if snap is None or prev > self.log.last_index():
                pr.next = self.log.last_index() + 1  # cannot happen; recover rather than loop
                return False
            pr.become_snapshot(snap.meta.index)
            self._send(SnapshotRequest(self.term, self.id, peer, snap))
            return False
        ents = self.log.entries(pr.next, pr.next + self.cfg.max_append_entries, self.cfg.max_append_bytes)
        if not ents and not allow_empty:
            return False
        self._send(AppendRequest(self.term, self.id, peer, prev, prev_term, tuple(ents), self.log.committed))
        if pr.state == ProgressState.REPLICATE and ents:
            pr.next = ents[-1].index + 1
            pr.inflight.append(ents[-1].index)
        elif pr.state == ProgressState.PROBE:
            pr.paused = True
        return bool(ents)

    def _broadcast_append(self) -> None:
        for peer in self.progress:
            self._send_append(peer, allow_empty=True)

    def _broadcast_heartbeat(self) -> None:
        for peer, pr in self.progress.items():
            self._send(Heartbeat(self.term, self.id, peer, min(pr.match, self.log.committed), self._read_seq))

    def _maybe_commit(self) -> bool:
        voters = self.membership.voters
        if not voters:
            return False
        matches = sorted(
            (self.log.last_index() if v == self.id else (self.progress[v].match if v in self.progress else 0)
             for v in voters),
            reverse=True,
        )
        candidate = matches[self._quorum(voters) - 1]
        # Figure 8: only an entry of the current term commits by counting.
        if candidate <= self.log.committed or self.log.term(candidate) != self.term:
            return False
        first_commit_in_term = not self.committed_in_term()
        self.log.commit_to(candidate)
        if first_commit_in_term:
            self._on_first_commit()
        self._maybe_leave_after_removal()
        return True

    def _on_first_commit(self) -> None:
        waiting, self._reads_before_commit = self._reads_before_commit, []
        for ctx in waiting:
            self._register_read(ctx)

    def _maybe_leave_after_removal(self) -> None:
        if self.role != Role.LEADER or self.log.last_config_index() > self.log.committed:
            return
        if self.membership.is_voter(self.id):
            return
        # Our removal is committed: hand over to the most caught-up voter so the
        # cluster does not wait out an election timeout, then stop leading.
        best = max(
            (v for v in self.membership.voters if v in self.progress),
            key=lambda v: self.progress[v].match,
            default=None,
        )
        if best is not None and self.progress[best].match == self.log.last_index():
            self._send(TimeoutNow(self.term, self.id, best))
        log.info("removed from the cluster; stepping down", extra=fields(node=self.id, term=self.term))
        self._become_follower(self.term, None)

    def _append_local(self, kind: EntryKind, data: bytes) -> int:
        e = Entry(self.log.last_index() + 1, self.term, kind, data)
        self.log.append([e])
        self._maybe_commit()
        return e.index

    # ------------------------------------------------------------ clients

    def propose(self, data: bytes) -> tuple[int, int]:
        """Append a command; returns (index, term). It is applied only if committed at that index and term."""
        self._check_leader()
        if self._transferee is not None:
            raise NotLeader(self._transferee, f"leadership is moving to {self._transferee}; retry there")
        index = self._append_local(EntryKind.NORMAL, data)
        self._broadcast_append()
        return index, self.term

    def propose_config(self, change: ConfigChange) -> tuple[int, int]:
        """One membership change at a time (dissertation §4.1)."""
        self._check_leader()
        if self.log.last_config_index() > self.log.committed:
            raise NotAvailable("another membership change is still in progress; retry")
        if not self.committed_in_term():
            # Ongaro's fix for single-server changes: a new leader must commit
            # an entry of its term before it may change the configuration.
            raise NotAvailable("leader has not committed an entry in its term yet; retry")
        if change.op == "promote":
            self._check_caught_up(change.member_id)
        if change.op == "demote" and change.member_id == self.id:
            raise InvalidInput("a leader does not demote itself: transfer leadership first")
        new = self._apply_change(self.membership, change)
        old_voters, new_voters = set(self.membership.voters), set(new.voters)
        if len(old_voters ^ new_voters) > 1:
            raise InvalidInput("a membership change may add or remove at most one voter")
        if not new_voters:
            raise InvalidInput("cannot remove the last voter")
        index = self._append_local(EntryKind.CONFIG, new.encode())
        self._sync_progress()
        self._maybe_commit()
        self._broadcast_append()
        return index, self.term

    def _check_caught_up(self, member_id: str) -> None:
        """A voter that cannot vote yet (it knows no configuration) could leave the cluster without a quorum."""
        pr = self.progress.get(member_id)
        if pr is None:
            return  # _apply_change names the real problem
        behind = self.log.committed - pr.match
        if pr.match < self.log.last_config_index() or behind > self.cfg.max_append_entries:
            raise NotAvailable(f"learner {member_id} has not caught up yet (at {pr.match}, "
                               f"commit {self.log.committed}); retry")

    @staticmethod
    def _apply_change(cur: Membership, ch: ConfigChange) -> Membership:
        """New servers join as learners and are promoted once caught up, so there is no add-voter."""
        if ch.op not in ("add_learner", "promote", "demote", "remove", "set_address"):
            raise InvalidInput(f"unknown membership change {ch.op!r}")
        existing = cur.get(ch.member_id)
        if not ch.member_id:
            raise InvalidInput("member id must not be empty")
        if ch.op == "add_learner":
            if existing is not None:
                raise InvalidInput(f"{ch.member_id} is already a member")
            return cur.with_member(Member(ch.member_id, ch.address, False))
        if existing is None:
            raise InvalidInput(f"{ch.member_id} is not a member")
        if ch.op == "promote":
            if existing.voter:
                raise InvalidInput(f"{ch.member_id} is already a voter")
            return cur.with_member(Member(existing.id, existing.address, True))
        if ch.op == "demote":  # a voter that is gone: it keeps its identity and comes back as a non-voter
            if not existing.voter:
                raise InvalidInput(f"{ch.member_id} is not a voter")
            return cur.with_member(Member(existing.id, existing.address, False))
        if ch.op == "remove":
            return cur.without(ch.member_id)
        return cur.with_member(Member(existing.id, ch.address, existing.voter))  # set_address

    def _sync_progress(self) -> None:
        ids = set(self.membership.ids) - {self.id}
        for gone in set(self.progress) - ids:
            del self.progress[gone]
        for new in ids - set(self.progress):
            self.progress[new] = Progress(next=self.log.last_index() + 1)

    def read_index(self, ctx: int) -> None:
        """Ask for a linearizable read point; it comes back as ReadState(ctx, index) in a Ready."""
        self._check_leader()
        if not self.committed_in_term():
            self._reads_before_commit.append(ctx)
            return
        self._register_read(ctx)

    def _register_read(self, ctx: int) -> None:
        if len(self.membership.voters) == 1 and self.membership.is_voter(self.id):
            self._ready_reads.append(ReadState(ctx, self.log.committed))
            return
        self._read_seq += 1
        self._pending_reads.append((ctx, self.log.committed, self._read_seq))
        self._broadcast_heartbeat()

    def _confirm_reads(self) -> None:
        voters = self.membership.voters
        acks = sorted(
            (self._read_seq if v == self.id else (self.progress[v].acked_seq if v in self.progress else 0)
             for v in voters),
            reverse=True,
        )
        confirmed = acks[self._quorum(voters) - 1] if voters else 0
        while self._pending_reads and self._pending_reads[0][2] <= confirmed:
            ctx, index, _ = self._pending_reads.pop(0)
            self._ready_reads.append(ReadState(ctx, index))

    def transfer_leadership(self, target: str) -> None:
        self._check_leader()
        if target == self.id:
            return
        if not self.membership.is_voter(target) or target not in self.progress:
            raise InvalidInput(f"cannot transfer leadership to {target}: not a voter")
        self._transferee = target
        self._election_elapsed = 0
        pr = self.progress[target]
        if pr.match == self.log.last_index():
            self._send(TimeoutNow(self.term, self.id, target))
        else:
            self._send_append(target, allow_empty=True)

    def _check_leader(self) -> None:
        if self.role != Role.LEADER:
            raise NotLeader(self.leader)

    # ------------------------------------------------------------ reports from the driver

    def report_unreachable(self, peer: str) -> None:
        pr = self.progress.get(peer)
        if self.role == Role.LEADER and pr is not None and pr.state == ProgressState.REPLICATE:
            pr.become_probe()

    def report_snapshot(self, peer: str, ok: bool) -> None:
        pr = self.progress.get(peer)
        if self.role != Role.LEADER or pr is None or pr.state != ProgressState.SNAPSHOT:
            return
        if not ok:
            pr.pending_snapshot = 0
        pr.become_probe()
        pr.paused = True  # resume on the next heartbeat answer

    def report_leader_lost(self, peer: str) -> None:
        """The transport saw `peer`'s connection break. Only a hint; safety never depends on it."""
        if not self.cfg.fast_failover or self.role != Role.FOLLOWER or self.leader != peer:
            return
        self.leader = None  # also lifts the lease, so we grant others' pre-votes
        voters = sorted(v for v in self.membership.voters if v != peer)
        if self.id not in voters or not self.promotable():
            return
        rank = voters.index(self.id)
        delay = rank * self.cfg.failover_slot_ticks + 1 + self._rng.randint(0, 1)
        self._election_elapsed = 0
        self._timeout = min(delay, self._timeout)
        log.info("leader connection lost; campaigning soon",
                 extra=fields(node=self.id, lost=peer, term=self.term, in_ticks=self._timeout))

    def compact(self, index: int, data: bytes) -> Snapshot:
        """The state machine's snapshot at applied `index` replaces the log up to it."""
        snap = self.log.compact(index, data)
        self._snapshot_out, self._install = snap, False
        return snap

    def forget_progress(self, peer: str) -> None:
        """`peer` restarted with an empty disk: what it acknowledged before is gone.

        Within a term a follower's log never shrinks below its acknowledgements,
        so the leader never backs up below `match`; only the join path, which
        knows the disk is new, may reset it.
        """
        if self.role == Role.LEADER and peer in self.progress:
            self.progress[peer] = Progress(next=self.log.last_index() + 1)
            self._send_append(peer, allow_empty=True)

    def set_can_vote(self, value: bool) -> None:
        self.can_vote = value
