"""A voter that does not lead relays the report streams of the hosts that report to it (docs/cluster.md,
"Reports through a voter").

A watcher host sends its report stream to the voter it watches from. That voter answers every message
itself and keeps the lease renewals to itself: the leader hears, on one `Agent/RelayReports` stream per
voter, one batch at a time, only what changed (a host's inventory, its instance states, its agent version,
the proxy's activity) and a compact lease summary, the hosts the voter heard from within `live` seconds.
The leader renews the lease of every host a voter vouches for, and answers each batch with what it has to
say to particular hosts (peer restarts, an invitation to stand by in Raft, a refusal), which the voter
hands on in its next reply to that host.

The voter serves hosts only while its own exchange with the leader is fresh (`healthy`): a voter cut off
from the leader, or one whose leader does not relay (agentd 0.1.0 and the releases before relaying answer
`UNIMPLEMENTED`), ends its hosts' streams (UNAVAILABLE) and they report to the leader directly. A host's
identity was checked when its stream opened (its certificate against the node it names); the leader
accepts relayed reports only from current voters.

Every timeout here derives from `node_down_grace` (`RelayTimings`, agentd/cluster/report_timing.py, which
states the rule): a host whose voter stalls leaves it for the leader well before its lease runs out. Full
reports go in bounded batches (`BATCH_FULL`, `BATCH_BYTES`), so that a voter with a thousand hosts new on its
stream never sends the leader one batch it cannot answer within `reply_timeout`; a batch answered late
ends the stream, not the hosts' service: they are served while the last answer is at most `healthy` old.

Only what the receiver lacks crosses: a host whose stream opens names its inventory by digest, which the
voter takes when it holds that inventory (the host was here before) and asks for otherwise
(`resend_inventory`); a host new on the relay stream (a new stream after a leader change or a late answer)
goes to the leader by digest too, once the leader's first answer on that stream says it takes digests
(`takes_digests`: the stream's first batch carries only the lease summary), and whole, in the bounded
batches, only when the leader answers that it does not hold it. A leader from before digests gets whole
reports, as before.

Consensus layer: it moves messages and holds no domain logic (the leader's `agentd/reports.py` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from agentd.cluster.report_timing import COALESCE, DEFAULT, FORGET, RelayTimings
from agentd.cluster.stream_call import CallEnded, exchange
from agentd.errors import InvalidInput, NotAvailable, PeerError
from agentd.logs import fields
from agentd.v1 import control_pb2 as pb
from agentd.v1 import control_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

UNSUPPORTED_RETRY = 60.0  # a leader that cannot take relayed reports is asked again after this long
# A batch carries at most this many hosts' full reports (their first on a stream, or a new inventory) and
# this many bytes of them; the rest follow in the next batches, sent as soon as the leader answers. Taking
# one full report costs the leader about 0.2 ms of CPU (an 8-GPU inventory validated, the report recorded):
# 128 of them stay far below the shortest reply timeout even on a loaded core, and 1 MiB below gRPC's
# message limits. The first batch of a relay with 1,024 hosts was 1,024 full reports at once.
BATCH_FULL = 128
BATCH_BYTES = 1 << 20


@dataclass
class _Host:
    """The latest of everything one host said, and what of it the leader has not heard on the current stream."""

    node: str
    address: str = ""
    inventory_json: str = ""
    inventory_digest: bytes = b""  # as the host named it; b"" from a host before digests (sent whole)
    instances: list[pb.Instance] = field(default_factory=list)
    version: tuple[str, int, int, str] | None = None
    activity: list[pb.ModelActivity] = field(default_factory=list)
    watches_from: str = ""  # the voter whose Watch stream it follows (agentd nodes: WATCHES)
    wall: tuple[float, float] | None = None  # (its wall clock, our monotonic clock when heard)
    heard: float = 0.0
    fresh: bool = True  # new on the leader's stream: send everything (the inventory by digest if the leader can)
    whole: bool = False  # the leader asked for the inventory: it goes whole on the next `fresh` update
    inventory_dirty: bool = False
    instances_dirty: bool = False
    version_dirty: bool = False
    watches_dirty: bool = False
    activity_sent: tuple[float, tuple[tuple[str, int], ...]] = (0.0, ())
    restarts: list[pb.PeerRestart] = field(default_factory=list)
    join_raft: bool = False
    refused: tuple[int, str] | None = None


class ReportRelay:
    def __init__(self, node: str, raft: Any, channel: Callable[[str], grpc.aio.Channel], *,
                 timings: RelayTimings = DEFAULT, mono: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.node = node
        self.timings = timings  # derived from node_down_grace (agentd/cluster/report_timing.py)
        self.raft = raft
        self._channel = channel
        self._mono = mono
        self._wall = wall
        self.hosts: dict[str, _Host] = {}
        self._call: Any = None
        self._target = ""  # leader address of the open stream
        self._leader = ""  # leader id of the open stream
        self._unsupported: dict[str, float] = {}  # leader address -> until when it is not asked
        self._wake = asyncio.Event()
        self._last_ok = float("-inf")  # when the leader last answered a batch
        self._last_batch = float("-inf")
        self.reply = pb.RelayReply()  # the leader's last answer: its term, version, format, time
        self.batches = 0  # answered batches, for tests and benchmarks
        self.inventories_sent = 0  # whole inventories relayed to the leader, for tests and benchmarks
        self.inventories_named = 0  # ... named by digest instead (the leader was asked whether it holds them)
        self._more = False  # the last batch left full reports for the next one
        self._digests: bool | None = None  # whether the leader of the open stream takes digests; None: not known

    # ------------------------------------------------------------------ host side (AgentService.ReportStream)

    def voter(self) -> bool:
        member = self.raft.members.get(self.node)
        return member is not None and bool(getattr(member, "voter", False))

    def serving(self) -> bool:
        """Whether this agent takes report streams to relay now."""
        # Across a leader change too: the hosts' messages wait here (at most `healthy` seconds) and go to the
        # new leader, in full, on the new stream; sending every host to the new leader at once would not.
        return self.voter() and not self.raft.is_leader and self._mono() - self._last_ok <= self.timings.healthy

    def on_update(self, node: str, m: pb.ReportUpdate) -> pb.ReportReply:
        """One message of a host's stream: note it, answer it. Raises NotAvailable when this agent stopped
        relaying (the host reports to the leader itself), or the leader's refusal of that host."""
        if not self.serving():
            raise NotAvailable(f"{self.node} no longer relays reports to the leader: report to the leader")
        now = self._mono()
        h = self.hosts.get(node)
        if h is None or m.agent_version:  # the first message of a (new) stream carries everything
            known = ""
            if not m.inventory_json and m.inventory_digest:  # ... but its inventory by name, if held here
                if h is None or not h.inventory_json or h.inventory_digest != m.inventory_digest:
                    return self._reply(pb.ReportReply(resend_inventory=True))  # nothing taken: it comes again
                known = h.inventory_json
            h = self.hosts[node] = _Host(node, inventory_json=known, inventory_digest=m.inventory_digest,
                                         restarts=h.restarts if h else [])
            self._wake.set()
        elif m.inventory_json:  # changed on the stream
            h.inventory_dirty = True
        if h.refused is not None:
            code, why = h.refused
            del self.hosts[node]
            raise (InvalidInput if code == grpc.StatusCode.INVALID_ARGUMENT.value[0] else PeerError)(why)
        h.address = m.address or h.address
        if m.inventory_json:
            h.inventory_json = m.inventory_json
            h.inventory_digest = m.inventory_digest
        if m.instances_changed:
            h.instances = list(m.instances)
            h.instances_dirty = True
        if m.agent_version:
            h.version = (m.agent_version, m.state_format, m.wire_version, m.upgrade_required)
            h.version_dirty = True
        if m.watches_from and m.watches_from != h.watches_from:
            h.watches_from = m.watches_from
            h.watches_dirty = True
        if h.inventory_dirty or h.instances_dirty or h.version_dirty or h.watches_dirty:
            self._wake.set()
        h.activity = list(m.activity)
        if m.wall_time:
            h.wall = (m.wall_time, now)
        h.heard = now
        restarts, h.restarts = h.restarts, []
        join, h.join_raft = h.join_raft, False
        return self._reply(pb.ReportReply(peer_restarts=restarts, join_raft=join))

    def _reply(self, reply: pb.ReportReply) -> pb.ReportReply:
        """`reply` with what the leader's last answer said of itself."""
        leader = self.reply
        reply.term, reply.leader_id = leader.term, leader.leader_id
        reply.agent_version, reply.state_format = leader.agent_version, leader.state_format
        reply.cluster_time = self.cluster_time()
        return reply

    def cluster_time(self) -> float:
        """The leader's cluster time as of its last answer, moved on by our clock since (0: not known)."""
        if not self.reply.cluster_time:
            return 0.0
        return self.reply.cluster_time + (self._mono() - self._last_ok)

    def vouched(self) -> list[str]:
        now = self._mono()
        return sorted(n for n, h in self.hosts.items() if now - h.heard <= self.timings.live and h.refused is None)

    # ------------------------------------------------------------------ leader side (RelayReports)

    async def run(self) -> None:
        """Forever: a batch to the leader when something changed (coalesced), else every `renew` seconds."""
        while True:
            if not self._more:  # else the rest of the full reports go at once
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.timings.renew):
                        await self._wake.wait()
                    await asyncio.sleep(COALESCE)
            self._wake.clear()
            try:
                await self.step()
            except asyncio.CancelledError:
                self.close()
                raise
            except Exception:
                log.exception("relaying reports failed", extra=fields(node=self.node))
                self.close()

    async def step(self) -> None:
        raft = self.raft
        address = raft.leader_address or ""
        if not self.voter() or raft.is_leader or (address and self._skip(address)):
            self.close()
            return
        if not address or not raft.leader_id:  # an election: hosts wait here up to `healthy` for its winner
            if self._call is not None:
                self.close(keep_serving=True)
            return
        now = self._mono()
        for node in [n for n, h in self.hosts.items() if now - h.heard > FORGET]:
            del self.hosts[node]
        if self._call is None or self._target != address or self._leader != raft.leader_id or self._call.done():
            self.close(keep_serving=True)
            self._call = pb_grpc.AgentStub(self._channel(address)).RelayReports()
            self._target, self._leader = address, raft.leader_id
            self._digests = None  # its first answer says; the first batch is the lease summary alone
            for h in self.hosts.values():
                h.fresh = True
        batch = self._batch(now)
        call = self._call
        try:
            async with asyncio.timeout(self.timings.reply_timeout):
                reply = await exchange(call, batch)
        except CallEnded:  # the leader had ended it (how, grpc lost): a new stream next
            log.info("relay stream to the leader ended", extra=fields(node=self.node, leader=address,
                                                                      error="before the batch went out"))
            self.close()
            return
        except grpc.aio.AioRpcError as exc:
            self._failed(address, exc.code(), exc.details() or "")
            return
        except TimeoutError:
            log.info("the leader did not answer relayed reports in time", extra=fields(
                node=self.node, leader=address, timeout=self.timings.reply_timeout, hosts=len(batch.updates)))
            self.close(keep_serving=True)  # a new stream next; hosts are served while the last answer is fresh
            return
        if reply is grpc.aio.EOF:
            self._failed(address, await call.code(), await call.details() or "")
            return
        self._answered(reply)

    def _skip(self, address: str) -> bool:
        until = self._unsupported.get(address)
        if until is None:
            return False
        if self._mono() >= until:
            del self._unsupported[address]
            return False
        return True

    def _batch(self, now: float) -> pb.RelayBatch:
        """What changed since the last batch, and the lease summary. Full reports beyond `BATCH_FULL` (or
        `BATCH_BYTES`) wait for the next batch, which `run` sends as soon as the leader answers this one:
        no single batch takes the leader long, whatever the number of hosts new on the stream."""
        self._last_batch = now
        self._more = False
        renew = self.timings.renew
        batch = pb.RelayBatch(relay=self.node, live=self.vouched())
        if self._digests is None:  # a new stream: whether this leader takes digests comes with its answer
            self._more = any(h.fresh for h in self.hosts.values())
            return batch
        full = size = 0
        live = self.timings.live
        for h in self.hosts.values():
            if h.version is None or not h.inventory_json or now - h.heard > live:
                continue  # a host silent here (gone, or moved elsewhere) is not spoken for: its turn when it's back
            named = h.fresh and not h.inventory_dirty and not h.whole and self._digests and bool(h.inventory_digest)
            whole = (h.fresh or h.inventory_dirty) and not named
            if whole and full and (full >= BATCH_FULL or size + len(h.inventory_json) > BATCH_BYTES):
                self._more = True  # its turn comes in the next batch; it stays dirty until then
                continue
            u = pb.ReportUpdate(node=h.node, address=h.address)
            send = False
            if whole or named:
                u.inventory_digest = h.inventory_digest
            if whole:
                u.inventory_json = h.inventory_json
                full += 1
                size += len(h.inventory_json)
                self.inventories_sent += 1
                send = True
            elif named:
                self.inventories_named += 1
            if h.fresh or h.instances_dirty:
                u.instances_changed = True
                u.instances.extend(h.instances)
                send = True
            if h.fresh or h.version_dirty:
                u.agent_version, u.state_format, u.wire_version, u.upgrade_required = h.version
                send = True
            if h.watches_from and (h.fresh or h.watches_dirty):
                u.watches_from = h.watches_from
                send = True
            active = tuple(sorted((a.deployment, a.in_flight) for a in h.activity))
            if h.activity and (send or active != h.activity_sent[1] or now - h.activity_sent[0] >= renew):
                u.activity.extend(h.activity)
                h.activity_sent = (now, active)
                send = True
            if not send:
                continue
            if h.wall is not None:  # its clock as of now, not as of when it spoke
                u.wall_time = h.wall[0] + (now - h.wall[1])
            h.fresh = h.whole = h.inventory_dirty = h.instances_dirty = h.version_dirty = h.watches_dirty = False
            batch.updates.append(u)
        return batch

    def _answered(self, reply: pb.RelayReply) -> None:
        if not self.batches:
            log.info("relaying reports to the leader", extra=fields(node=self.node, leader=self._leader))
        self.batches += 1
        self._last_ok = self._mono()
        self._digests = reply.takes_digests
        self.reply = pb.RelayReply(term=reply.term, leader_id=reply.leader_id, agent_version=reply.agent_version,
                                   state_format=reply.state_format, cluster_time=reply.cluster_time)
        for r in reply.hosts:
            h = self.hosts.get(r.node)
            if h is None:
                continue
            h.restarts.extend(r.peer_restarts)
            h.join_raft = h.join_raft or r.join_raft
            if r.resend_inventory:  # the leader does not hold what the digest named: all of it, whole, next
                h.fresh = h.whole = True
                self._more = True
            if r.refused:
                h.refused = (r.refused_code, r.refused)

    def _failed(self, address: str, code: grpc.StatusCode, details: str) -> None:
        self.close()
        if code in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED):
            # agentd before relaying, or a leader that does not count this agent a voter (yet): hosts report
            # to the leader directly meanwhile
            self._unsupported[address] = self._mono() + (UNSUPPORTED_RETRY if code == grpc.StatusCode.UNIMPLEMENTED
                                                          else self.timings.renew * 5)
        log.info("relay stream to the leader ended", extra=fields(node=self.node, leader=address, code=code.name,
                                                                  error=details[:200]))

    def close(self, keep_serving: bool = False) -> None:
        """End the stream to the leader; unless `keep_serving` (a new stream follows at once), stop taking
        hosts' reports until a leader answers a batch again."""
        if self._call is not None:
            self._call.cancel()
        self._call = None
        self._target = self._leader = ""
        self._more = False
        if not keep_serving:
            self._last_ok = float("-inf")


@dataclass
class RelayChoice:
    """On a watcher host: which voter its report stream goes to. The voter it watches from, while that is a
    voter that does not lead, else another voter that does not lead (each host its own, by a hash of its
    name, so they spread); none (the leader itself) when every voter leads or is avoided. A voter that failed
    a report (killed, cut off from the leader, a release before relaying) is avoided for `AVOID` seconds.

    A host that leaves its voter goes on at once to another voter, which takes it into its bounded batches;
    to the leader itself only after a random delay up to `jitter` (RelayTimings.jitter, derived from
    node_down_grace so that its lease outlives the wait): when the voters stop relaying (a stalled leader),
    all their hosts leave them at once, and they reach the leader spread over that time. One wait per
    departure from a path that worked: a host that got no report through since it started or since its last
    wait goes on at once (at start-up the voters relay only once the leader answered them, and a host that
    waited then would be missing from a new leader's first placements). A leader that lost its place is
    avoided too: after a failover it is most likely dead, and trying it first costs a host a report timeout
    while the new leader waits for its hosts' first reports."""

    node: str
    mono: Callable[[], float] = time.monotonic
    jitter: float = DEFAULT.jitter
    rng: random.Random = field(default_factory=random.Random)
    _avoid: dict[str, float] = field(default_factory=dict)  # voter address -> until when
    _wait_due: bool = False  # a report got through since the last wait: leaving for the leader waits once
    _leader: str = ""  # the leader's address when last asked

    AVOID = 10.0

    def target(self, raft: Any) -> str:
        """The voter's address, or "" to report to the leader directly."""
        watcher = getattr(raft, "watcher", None)
        if watcher is None:
            return ""  # members report to the leader themselves
        now = self.mono()
        leader = raft.leader_address or ""
        if leader and leader != self._leader:
            if self._leader:
                self._avoid.setdefault(self._leader, now + self.AVOID)
            self._leader = leader
        for address, until in list(self._avoid.items()):
            if now >= until:
                del self._avoid[address]
        voters = sorted(m.address for m in raft.members.values()
                        if m.voter and m.address and m.address != raft.leader_address and m.address not in self._avoid)
        if not voters:
            return ""
        source = getattr(watcher, "source", "")
        if source in voters:
            return source
        return voters[zlib.crc32(self.node.encode()) % len(voters)]

    def failed(self, address: str, raft: Any) -> float:
        """The voter at `address` failed a report: avoid it. Returns the seconds to wait before the next
        attempt: none to another voter, a random delay up to `jitter` before the leader."""
        self._avoid[address] = self.mono() + self.AVOID
        if not self._wait_due or self.target(raft):
            return 0.0
        self._wait_due = False
        return self.rng.uniform(0.0, self.jitter)

    def served(self) -> None:
        """A report got through (to a voter or the leader): the next departure for the leader waits again."""
        self._wait_due = True
