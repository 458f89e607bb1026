"""A deterministic, seeded cluster of Raft cores on a hostile in-process network.

The network drops, duplicates, delays and reorders messages, partitions the
cluster, crashes nodes (also between persisting and sending) and restarts
them from what their storage held. Clients propose commands, read through
ReadIndex, change the membership, compact logs and transfer leadership at
random. After every step the checker asserts Raft's safety properties:

- election safety: at most one leader per term;
- log matching: two logs agreeing on (index, term) agree on every earlier entry;
- leader completeness / state machine safety: an entry applied anywhere is the
  entry applied at that index everywhere, and every new leader holds it;
- linearizable reads: a read index is never below a commit index some node
  had already reached when the read was asked for.

Everything derives from one seed, so a failure reproduces exactly. No I/O,
no asyncio: the whole simulation is plain function calls, which is why
thousands of steps per seed fit in milliseconds per hundred steps.
"""

from __future__ import annotations

import heapq
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from agentd.cluster.raft.core import RaftCore
from agentd.cluster.raft.storage import MemoryStorage
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
    SnapshotRequest,
)
from agentd.errors import AgentdError


class SafetyViolation(AssertionError):
    """A Raft safety property failed; the message names the property, the nodes and the step."""


SIM_CONFIG = RaftConfig(heartbeat_ticks=2, election_ticks_min=10, election_ticks_max=20,
                        max_append_entries=8, max_inflight=4, failover_slot_ticks=2)


@dataclass
class Faults:
    drop: float = 0.03
    duplicate: float = 0.01
    max_delay: int = 3  # ticks
    crash: float = 0.004
    crash_mid_ready: float = 0.002  # persisted but crashed before sending
    restart: float = 0.05
    partition: float = 0.004
    heal: float = 0.03
    propose: float = 0.3
    read: float = 0.05
    config_change: float = 0.004
    transfer: float = 0.002
    false_hint: float = 0.002
    hint_on_crash: float = 0.8  # the transport notices a crashed leader's connection
    skip_tick: float = 0.05  # clock drift
    compact_every: int = 25


@dataclass
class SimStateMachine:
    """Applies commands to a list; equality of lists is state-machine agreement."""

    applied: list[tuple[int, int, bytes]] = field(default_factory=list)
    last_index: int = 0

    def apply(self, e: Entry) -> None:
        if e.kind == EntryKind.NORMAL:
            self.applied.append((e.index, e.term, e.data))
        self.last_index = e.index

    def snapshot(self) -> bytes:
        return json.dumps({"last": self.last_index, "applied": [[i, t, d.hex()] for i, t, d in self.applied]}).encode()

    def restore(self, data: bytes) -> None:
        raw = json.loads(data)
        self.last_index = raw["last"]
        self.applied = [(i, t, bytes.fromhex(d)) for i, t, d in raw["applied"]]


class SimNode:
    def __init__(self, node_id: str, sim: Simulation) -> None:
        self.id = node_id
        self.sim = sim
        self.storage = MemoryStorage(node_id)
        self.core: RaftCore | None = None
        self.sm = SimStateMachine()
        self.boots = 0

    @property
    def alive(self) -> bool:
        return self.core is not None

    def boot(self) -> None:
        st = self.storage.load()
        self.boots += 1
        rng = random.Random(f"{self.sim.seed}/{self.id}/{self.boots}")
        self.core = RaftCore(self.id, hard_state=st.hard_state, snapshot=st.snapshot, entries=st.entries,
                             config=self.sim.config, rng=rng)
        self.sm = SimStateMachine()
        if st.snapshot is not None:
            self.sm.restore(st.snapshot.data)
            self.sim.check_restored(self)

    def crash(self) -> None:
        self.core = None


class Simulation:
    def __init__(self, seed: int, *, voters: int = 3, spares: int = 2, faults: Faults | None = None,
                 config: RaftConfig = SIM_CONFIG) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.faults = faults or Faults()
        self.config = config
        self.now = 0
        self.nodes: dict[str, SimNode] = {}
        ids = [f"n{i}" for i in range(1, voters + spares + 1)]
        initial = Membership(tuple(Member(i, f"sim://{i}", True) for i in ids[:voters]))
        for i in ids:
            node = self.nodes[i] = SimNode(i, self)
            if i in initial.ids:
                # Pre-bootstrapped: every initial voter holds the same first config entry.
                boot = Entry(1, 1, EntryKind.CONFIG, initial.encode())
                node.storage.save(Ready(hard_state=HardState(1, None, 1), entries=(boot,)))
                node.boot()
        self._queue: list[tuple[int, int, Message]] = []
        self._seq = 0
        self.blocked: set[frozenset[str]] = set()
        # checker state
        self.leaders: dict[int, str] = {}
        self.committed: dict[int, tuple[int, EntryKind, bytes]] = {}
        self.max_commit = 1
        self._reads: dict[int, tuple[str, int]] = {}
        self._read_ctx = 0
        self._proposals = 0
        self.stats = {"elections": 0, "commits": 0, "snapshots_installed": 0, "reads": 0, "config_changes": 0,
                      "crashes": 0, "delivered": 0, "dropped": 0}

    # ------------------------------------------------------------ network

    def _send(self, msgs: tuple[Message, ...]) -> None:
        f = self.faults
        for m in msgs:
            copies = 2 if self.rng.random() < f.duplicate else 1
            for _ in range(copies):
                if self.rng.random() < f.drop:
                    self.stats["dropped"] += 1
                    continue
                self._seq += 1
                heapq.heappush(self._queue, (self.now + self.rng.randint(0, f.max_delay), self._seq, m))

    def _deliver_due(self) -> None:
        due = []
        while self._queue and self._queue[0][0] <= self.now:
            due.append(heapq.heappop(self._queue)[2])
        self.rng.shuffle(due)
        for m in due:
            target = self.nodes.get(m.to)
            if target is None or not target.alive or frozenset((m.sender, m.to)) in self.blocked:
                self.stats["dropped"] += 1
                sender = self.nodes.get(m.sender)
                if sender is not None and sender.alive and self.rng.random() < 0.5:
                    sender.core.report_unreachable(m.to)
                    if isinstance(m, SnapshotRequest):
                        sender.core.report_snapshot(m.to, False)
                    self._process(sender)
                continue
            self.stats["delivered"] += 1
            target.core.step(m)
            self._process(target)
            if isinstance(m, SnapshotRequest):
                sender = self.nodes[m.sender]
                if sender.alive:
                    sender.core.report_snapshot(m.to, True)
                    self._process(sender)

    # ------------------------------------------------------------ node output

    def _process(self, node: SimNode) -> None:
        while node.alive and node.core.has_ready():
            rd = node.core.ready()
            node.storage.save(rd)
            if rd.must_persist and self.rng.random() < self.faults.crash_mid_ready:
                self._crash(node)
                return
            self._send(rd.messages)
            if rd.install:
                node.sm.restore(rd.snapshot.data)
                self.stats["snapshots_installed"] += 1
                self.check_restored(node)
            for e in rd.committed:
                self._check_apply(node, e)
                node.sm.apply(e)
            self.max_commit = max(self.max_commit, node.core.committed)
            for rs in rd.reads:
                who, floor = self._reads.pop(rs.ctx)
                if rs.index < floor:
                    raise SafetyViolation(f"step {self.now}: read on {who} got index {rs.index} below commit "
                                          f"{floor} reached before the read started")
                self.stats["reads"] += 1
            for ctx in rd.dropped_reads:
                self._reads.pop(ctx, None)
            if rd.soft_state is not None and rd.soft_state.role == Role.LEADER:
                self._check_new_leader(node)
            core = node.core
            if node.sm.last_index - core.log.snap_index >= self.faults.compact_every:
                core.compact(node.sm.last_index, node.sm.snapshot())

    # ------------------------------------------------------------ checks

    def _check_apply(self, node: SimNode, e: Entry) -> None:
        if e.index != node.sm.last_index + 1:
            raise SafetyViolation(f"step {self.now}: {node.id} applied {e.index} after {node.sm.last_index}")
        seen = self.committed.get(e.index)
        mine = (e.term, e.kind, e.data)
        if seen is None:
            self.committed[e.index] = mine
            self.stats["commits"] += 1
        elif seen != mine:
            raise SafetyViolation(f"step {self.now}: {node.id} applied {mine} at {e.index}, others applied {seen}")

    def check_restored(self, node: SimNode) -> None:
        for i, t, d in node.sm.applied:
            seen = self.committed.get(i)
            if seen is not None and seen != (t, EntryKind.NORMAL, d):
                raise SafetyViolation(f"step {self.now}: snapshot on {node.id} disagrees at {i}")

    def _check_new_leader(self, node: SimNode) -> None:
        core = node.core
        self.stats["elections"] += 1
        prev = self.leaders.setdefault(core.term, node.id)
        if prev != node.id:
            raise SafetyViolation(f"step {self.now}: two leaders in term {core.term}: {prev} and {node.id}")
        for i, (t, _, _) in self.committed.items():
            if i <= core.log.snap_index:
                continue
            if core.log.term(i) != t:
                raise SafetyViolation(f"step {self.now}: new leader {node.id} (term {core.term}) lacks "
                                      f"committed entry {i}/{t}")

    def check_log_matching(self) -> None:
        alive = [n for n in self.nodes.values() if n.alive]
        for a_i, a in enumerate(alive):
            for b in alive[a_i + 1 :]:
                la, lb = a.core.log, b.core.log
                lo = max(la.first_index(), lb.first_index())
                hi = min(la.last_index(), lb.last_index())
                top = None
                for i in range(hi, lo - 1, -1):
                    if la.term(i) == lb.term(i):
                        top = i
                        break
                if top is None:
                    continue
                for i in range(lo, top + 1):
                    if la.entry(i) != lb.entry(i):
                        raise SafetyViolation(f"step {self.now}: log matching broken between {a.id} and {b.id} "
                                              f"at {i} (they agree at {top})")

    # ------------------------------------------------------------ client and fault actions

    def leader_nodes(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.alive and n.core.role == Role.LEADER]

    def _members(self) -> Membership:
        best = max((n for n in self.nodes.values() if n.alive), key=lambda n: n.core.log.last_index(), default=None)
        return best.core.membership if best else Membership()

    def _crash(self, node: SimNode) -> None:
        self.stats["crashes"] += 1
        node.crash()
        for other in self.nodes.values():
            if other.alive and other.core.leader == node.id and self.rng.random() < self.faults.hint_on_crash:
                other.core.report_leader_lost(node.id)
                self._process(other)

    def _random_actions(self) -> None:
        f, rng = self.faults, self.rng
        alive = [n for n in self.nodes.values() if n.alive]
        dead = [n for n in self.nodes.values() if not n.alive and n.boots > 0]
        if alive and rng.random() < f.crash:
            self._crash(rng.choice(alive))
        if dead and rng.random() < f.restart:
            rng.choice(dead).boot()
        if rng.random() < f.partition:
            ids = list(self.nodes)
            rng.shuffle(ids)
            cut = rng.randint(1, len(ids) - 1)
            self.blocked = {frozenset((a, b)) for a in ids[:cut] for b in ids[cut:]}
        if self.blocked and rng.random() < f.heal:
            self.blocked = set()
        leader = self._pick_leader(f.propose)
        if leader is not None:
            self._proposals += 1
            self._try(leader, lambda c: c.propose(f"cmd-{self.seed}-{self._proposals}".encode()))
        leader = self._pick_leader(f.read)
        if leader is not None:
            self._read_ctx += 1
            ctx = self._read_ctx
            self._reads[ctx] = (leader.id, self.max_commit)
            if not self._try(leader, lambda c: c.read_index(ctx)):
                self._reads.pop(ctx, None)
        leader = self._pick_leader(f.config_change)
        if leader is not None:
            self._change_membership(leader)
        leader = self._pick_leader(f.transfer)
        if leader is not None:
            voters = [v for v in leader.core.membership.voters if v != leader.id]
            if voters:
                self._try(leader, lambda c: c.transfer_leadership(rng.choice(voters)))
        alive = [n for n in self.nodes.values() if n.alive]
        if alive and rng.random() < f.false_hint:
            n = rng.choice(alive)
            if n.core.leader and n.core.leader != n.id:
                n.core.report_leader_lost(n.core.leader)
                self._process(n)

    def _pick_leader(self, probability: float) -> SimNode | None:
        leaders = self.leader_nodes()
        if leaders and self.rng.random() < probability:
            return self.rng.choice(leaders)
        return None

    def _change_membership(self, leader: SimNode) -> None:
        rng = self.rng
        m = leader.core.membership
        spares = [i for i in self.nodes if i not in m.ids]
        learners = [x.id for x in m.members if not x.voter]
        choices: list[ConfigChange] = []
        if spares:
            choices.append(ConfigChange("add_learner", rng.choice(spares), "sim://new"))
        if learners:
            choices.append(ConfigChange("promote", rng.choice(learners)))
        if len(m.voters) > 2:
            choices.append(ConfigChange("remove", rng.choice(m.ids)))
        if not choices:
            return
        ch = rng.choice(choices)
        if ch.op == "add_learner":
            node = self.nodes[ch.member_id]
            if node.alive:
                return
            node.storage = MemoryStorage(node.id)  # a fresh machine under a reused name
        if self._try(leader, lambda c: c.propose_config(ch)):
            self.stats["config_changes"] += 1
            if ch.op == "add_learner":
                self.nodes[ch.member_id].boot()

    def _try(self, node: SimNode, action: Callable[[RaftCore], object]) -> bool:
        try:
            action(node.core)
        except AgentdError:
            return False
        self._process(node)
        return True

    # ------------------------------------------------------------ driving

    def step(self) -> None:
        self.now += 1
        self._random_actions()
        for node in list(self.nodes.values()):
            if node.alive and self.rng.random() >= self.faults.skip_tick:
                node.core.tick()
                self._process(node)
        self._deliver_due()

    def run(self, steps: int, check_every: int = 50) -> None:
        for n in range(steps):
            self.step()
            if n % check_every == 0:
                self.check_log_matching()
        self.check_log_matching()

    def settle(self, max_steps: int = 2000) -> SimNode:
        """Heal everything, restart the members, and wait for a leader that commits a new entry everywhere."""
        self.faults = Faults(drop=0, duplicate=0, crash=0, crash_mid_ready=0, restart=0, partition=0, heal=0,
                             propose=0, read=0, config_change=0, transfer=0, false_hint=0, skip_tick=0,
                             compact_every=self.faults.compact_every, max_delay=1)
        self.blocked = set()
        members = self._members()
        for i in members.ids:
            if not self.nodes[i].alive:
                self.nodes[i].boot()
        marker: tuple[int, int] | None = None
        for _ in range(max_steps):
            self.step()
            leaders = self.leader_nodes()
            if marker is None and len(leaders) == 1 and leaders[0].core.committed_in_term():
                try:
                    marker = leaders[0].core.propose(b"settle")
                except AgentdError:
                    continue
                self._process(leaders[0])
            if marker is not None:
                index, term = marker
                members = self._members()
                if all(self.nodes[i].alive and self.nodes[i].sm.last_index >= index for i in members.ids):
                    if self.committed.get(index, (None,))[0] == term:
                        self.check_log_matching()
                        return leaders[0] if leaders else self.nodes[members.voters[0]]
                    marker = None  # overwritten by a newer leader: propose again
        raise SafetyViolation(f"seed {self.seed}: no progress within {max_steps} steps after healing "
                              f"(liveness)")
