"""A host's reports to the leader on one long-lived Agent/ReportStream call (docs/cluster.md, "Liveness by lease").

With one unary Report a second per host, the leader paid a call's setup,
an inventory comparison and a full report's bookkeeping for each host each
second. Here a host keeps one stream open to the leader it knows and sends
on it only what changed since its previous message on that stream: the
inventory when it changed, the instance states when they changed (and, on a
watcher, the voter it watches from when that changed), else a bare renewal of
its lease. The leader answers each message with what ReportReply
always carried (peer restarts, its version and format, join_raft, the cluster
time). A new stream starts over with everything: the leader remembers nothing
across streams, so a new leader, a restarted agent or a broken connection
cannot leave the leader with half a report.

A new stream's first message names the inventory by its digest instead of
carrying it (a fallback from a voter, a leader change: the receiver most often
holds it already); a receiver that does not hold it answers `resend_inventory`,
and the same message follows with the inventory. A receiver from before digests
refuses such a first message (INVALID_ARGUMENT): it gets whole inventories on
new streams for `UNARY_RETRY` seconds, the message again at once.

A leader that answers UNIMPLEMENTED (agentd 0.1.0) gets the unary Report: the
caller asks `unary(address)` and falls back, for `UNARY_RETRY` seconds; then the
stream is tried again, so a leader upgraded in place at the same address gets
streams again without restarting its hosts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from agentd.cluster.report_timing import DEFAULT
from agentd.cluster.stream_call import CallEnded, exchange
from agentd.reports import inventory_digest
from agentd.security.auth import admitted_metadata
from agentd.v1 import control_pb2 as pb
from agentd.v1 import control_pb2_grpc as pb_grpc

UNARY_RETRY = 60.0  # seconds a leader that answered UNIMPLEMENTED gets unary reports before the stream is tried again


class StreamEnded(Exception):
    """The leader ended the stream without an error status (it is shutting down), or before a message went
    out (how, grpc does not say: agentd/cluster/stream_call.py): open a new one."""


@dataclass
class _Sent:
    """What the leader has acknowledged on the current stream."""

    inventory_json: str = ""
    instances: tuple[bytes, ...] | None = None
    version: tuple[str, int, int, str] | None = None
    watches_from: str = ""


@dataclass
class ReportStream:
    node: str
    address: str
    # For one message's reply; the stream itself has no deadline. The daemon derives it from node_down_grace
    # (RelayTimings.host_timeout: a host whose voter hangs leaves it well before its lease runs out).
    timeout: float = DEFAULT.host_timeout
    target: str = ""  # the leader address the open stream goes to
    admitted_index: int = 0  # this host's admission (the join reply's): a voter behind it waits for it, not refuses
    _call: Any = None
    _sent: _Sent = field(default_factory=_Sent)
    _unary: dict[str, float] = field(default_factory=dict)  # leader address -> until when it gets unary reports
    _whole: dict[str, float] = field(default_factory=dict)  # address -> until when its first messages carry it all
    opened: int = 0  # streams opened, for tests and benchmarks
    inventories_sent: int = 0  # messages that carried the whole inventory, for tests and benchmarks
    inventories_named: int = 0  # first messages whose inventory the receiver held: named by digest, not sent

    def unary(self, target: str) -> bool:
        """Whether the leader at `target` lacks ReportStream (agentd 0.1.0): report with the unary call."""
        return self._until(self._unary, target)

    async def send(self, channel: grpc.aio.Channel, target: str, *, inventory_json: str,
                   instances: Sequence[pb.Instance], version: tuple[str, int, int, str], wall_time: float = 0.0,
                   activity: Sequence[Any] = (), watches_from: str = "") -> pb.ReportReply:
        """Send what changed since the leader's last acknowledgement on the stream to `target` (opening one
        when there is none to it) and return the leader's reply. Any failure closes the stream, so the next
        report starts a new one with everything; an UNIMPLEMENTED leader is remembered (`unary`)."""
        fresh = self._call is None or self.target != target or self._call.done()
        if fresh:
            self._open(channel, target)
        sent = self._sent
        m = pb.ReportUpdate(node=self.node, address=self.address, wall_time=wall_time)
        if inventory_json != sent.inventory_json:
            m.inventory_json = inventory_json
            m.inventory_digest = inventory_digest(inventory_json)
        rows = tuple(i.SerializeToString(deterministic=True) for i in instances)
        if rows != sent.instances:
            m.instances_changed = True
            m.instances.extend(instances)
        if version != sent.version:
            m.agent_version, m.state_format, m.wire_version, m.upgrade_required = version
        if watches_from and watches_from != sent.watches_from:  # a watcher's voter (agentd nodes: WATCHES)
            m.watches_from = watches_from
        m.activity.extend(activity)  # the proxy's idle clocks move on every report: not a change to diff
        named = fresh and bool(m.inventory_json) and not self._until(self._whole, target)
        if named:
            m.inventory_json = ""  # the receiver may hold it: it says when it does not
        try:
            async with asyncio.timeout(self.timeout):  # one reply's wait, however many exchanges it takes
                reply = None
                try:
                    reply = await self._exchange(target, m)
                except grpc.aio.AioRpcError as exc:
                    if not (named and exc.code() == grpc.StatusCode.INVALID_ARGUMENT):
                        raise
                    # A receiver from before digests: a first message carries the inventory.
                    self._whole[target] = time.monotonic() + UNARY_RETRY
                    self._open(channel, target)
                if named and reply is not None and not reply.resend_inventory:
                    self.inventories_named += 1
                elif named:
                    m.inventory_json = inventory_json
                    reply = await self._exchange(target, m)
        except BaseException:
            self.close()
            raise
        if m.inventory_json:
            self.inventories_sent += 1
        self._sent = _Sent(inventory_json, rows, version, watches_from or sent.watches_from)
        return reply

    def _open(self, channel: grpc.aio.Channel, target: str) -> None:
        self.close()
        self._call = pb_grpc.AgentStub(channel).ReportStream(metadata=admitted_metadata(self.admitted_index))
        self.target = target
        self.opened += 1

    @staticmethod
    def _until(marks: dict[str, float], target: str) -> bool:
        until = marks.get(target)
        if until is not None and time.monotonic() >= until:
            del marks[target]
            return False
        return until is not None

    async def _exchange(self, target: str, m: pb.ReportUpdate) -> pb.ReportReply:
        """One message and its reply on the open stream; an error status is raised (UNIMPLEMENTED remembered)."""
        call = self._call
        try:
            reply = await exchange(call, m)
        except CallEnded:
            raise StreamEnded(f"the stream to {target} had ended before this report went out") from None
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._unary[target] = time.monotonic() + UNARY_RETRY
            raise
        if reply is grpc.aio.EOF:
            code = await call.code()
            details = await call.details()
            if code == grpc.StatusCode.UNIMPLEMENTED:
                self._unary[target] = time.monotonic() + UNARY_RETRY
            if code != grpc.StatusCode.OK:
                raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)
            raise StreamEnded(f"the leader at {target} ended the report stream")
        return reply

    def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        self._call = None
        self.target = ""
        self._sent = _Sent()
