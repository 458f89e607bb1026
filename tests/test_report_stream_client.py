"""The host's side of Agent/ReportStream (agentd/api/report_stream.py) against real gRPC servers on loopback.

What a message carries (everything first, then only changes, else a bare renewal; everything again on a new
stream), a new stream when the leader's address changes or the stream broke, and the fallback to the unary
Report for a leader without the method (agentd 0.1.0), tried again after UNARY_RETRY. A new stream names the
inventory by digest: it crosses only when the receiver does not hold it, or predates digests.
"""

from __future__ import annotations

import json

import grpc
import pytest

from agentd.api import report_stream
from agentd.api.report_stream import ReportStream, StreamEnded
from agentd.reports import inventory_digest
from agentd.security.auth import ADMITTED_METADATA
from agentd.v1 import control_pb2 as pb

VERSION = ("0.2.0", 2, 2, "")


class Leader:
    """A gRPC server whose ReportStream records every message and answers each; `end_after` ends streams.
    It holds the inventories it was sent (by digest) and asks for one it does not hold, as agentd/reports.py
    does; `digests=False`: a release before digests, which refuses a first message without the inventory."""

    def __init__(self, *, streams: bool = True, end_after: int = 0, digests: bool = True):
        self.messages: list[list[pb.ReportUpdate]] = []  # per stream
        self.metadata: list[dict] = []  # per stream, what its call carried
        self.end_after = end_after
        self.digests = digests
        self.held: set[bytes] = set()
        self.server = grpc.aio.server()
        handlers = {}
        if streams:
            handlers["ReportStream"] = grpc.stream_stream_rpc_method_handler(
                self._stream, request_deserializer=pb.ReportUpdate.FromString,
                response_serializer=pb.ReportReply.SerializeToString)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("agentd.v1.Agent", handlers),))
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"

    async def _stream(self, requests, context):
        mine: list[pb.ReportUpdate] = []
        self.messages.append(mine)
        self.metadata.append(dict(context.invocation_metadata()))
        async for m in requests:
            mine.append(m)
            if m.inventory_json:
                self.held.add(inventory_digest(m.inventory_json))
            elif len(mine) == 1 and not self.digests:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a report stream's first message carries "
                                    "its inventory")
            resend = not m.inventory_json and bool(m.inventory_digest) and m.inventory_digest not in self.held
            yield pb.ReportReply(leader_id="L", agent_version="0.2.0", state_format=2, cluster_time=123.5,
                                 resend_inventory=resend)
            if self.end_after and len(mine) >= self.end_after:
                return


def inv(rack: str) -> str:
    return json.dumps({"name": "h", "labels": {"rack": rack}})


async def send(rs: ReportStream, ch: grpc.aio.Channel, target: str, rack: str = "a",
               instances: list[pb.Instance] | None = None) -> pb.ReportReply:
    return await rs.send(ch, target, inventory_json=inv(rack), instances=instances or [], version=VERSION,
                         wall_time=1.0)


async def test_everything_first_then_only_changes_and_everything_again_on_a_new_stream():
    leader, other = Leader(), Leader()
    await leader.server.start()
    await other.server.start()
    rs = ReportStream("h", "127.0.0.1:1")
    try:
        async with grpc.aio.insecure_channel(leader.address) as ch, grpc.aio.insecure_channel(other.address) as ch2:
            reply = await send(rs, ch, leader.address)
            assert (reply.leader_id, reply.cluster_time) == ("L", 123.5)
            await send(rs, ch, leader.address)  # nothing changed: a bare renewal
            await send(rs, ch, leader.address, rack="b")  # the inventory changed
            part = pb.Instance(instance_id="d-r0", state="RUNNING")
            await send(rs, ch, leader.address, rack="b", instances=[part])
            await send(rs, ch, leader.address, rack="b", instances=[])  # none now: not the same as unchanged
            assert len(leader.messages) == 1 and rs.opened == 1
            named, first, bare, changed_inv, changed_inst, emptied = leader.messages[0]
            # the inventory by digest first; this leader does not hold it: the same message again, with it
            assert not named.inventory_json and named.inventory_digest == inventory_digest(inv("a"))
            assert named.agent_version == "0.2.0" and named.instances_changed
            assert first.node == "h" and first.inventory_json == inv("a") and first.instances_changed
            assert first.inventory_digest == inventory_digest(inv("a"))
            assert (first.agent_version, first.state_format, first.wire_version) == ("0.2.0", 2, 2)
            assert first.wall_time == 1.0
            assert bare == pb.ReportUpdate(node="h", address="127.0.0.1:1", wall_time=1.0)
            assert changed_inv.inventory_json == inv("b") and not changed_inv.instances_changed
            assert changed_inv.inventory_digest == inventory_digest(inv("b"))
            assert not changed_inv.agent_version
            assert changed_inst.instances_changed and list(changed_inst.instances) == [part]
            assert not changed_inst.inventory_json and not changed_inst.inventory_digest
            assert emptied.instances_changed and not emptied.instances

            assert (rs.inventories_sent, rs.inventories_named) == (2, 0)
            await send(rs, ch2, other.address, rack="b")  # the leader moved: a new stream, everything on it
            assert rs.opened == 2 and len(other.messages) == 1
            _, m = other.messages[0]
            assert m.inventory_json == inv("b") and m.instances_changed and m.agent_version == "0.2.0"
    finally:
        await leader.server.stop(None)
        await other.server.stop(None)


async def test_a_stream_the_leader_ended_is_replaced_by_a_new_one_that_says_everything():
    leader = Leader(end_after=3)  # the first stream: the named inventory, asked for, sent; a bare renewal
    await leader.server.start()
    rs = ReportStream("h", "127.0.0.1:1")
    try:
        async with grpc.aio.insecure_channel(leader.address) as ch:
            await send(rs, ch, leader.address)
            await send(rs, ch, leader.address)
            # the read finds the end, or the write meets it (agentd/cluster/stream_call.py): an end either way
            with pytest.raises(StreamEnded):
                await send(rs, ch, leader.address)
            await send(rs, ch, leader.address)
            assert [len(s) for s in leader.messages] == [3, 1]
            (m,) = leader.messages[1]
            # a new stream starts with everything; the inventory by digest, as this leader holds it
            assert m.agent_version and m.instances_changed and not m.inventory_json
            assert m.inventory_digest == inventory_digest(inv("a"))
            assert (rs.inventories_sent, rs.inventories_named) == (1, 1)
    finally:
        await leader.server.stop(None)


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    """The report client's monotonic clock, which the test moves on."""
    now = [1000.0]
    monkeypatch.setattr(report_stream.time, "monotonic", lambda: now[0])
    return now


async def test_a_leader_without_the_stream_gets_unary_reports_until_the_retry(clock):
    leader = Leader(streams=False)
    await leader.server.start()
    rs = ReportStream("h", "127.0.0.1:1")
    try:
        async with grpc.aio.insecure_channel(leader.address) as ch:
            assert not rs.unary(leader.address)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await send(rs, ch, leader.address)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert rs.unary(leader.address) and not rs.unary("127.0.0.1:2")
            clock[0] += report_stream.UNARY_RETRY + 1  # upgraded in place, maybe: try the stream again
            assert not rs.unary(leader.address)
    finally:
        await leader.server.stop(None)


async def test_a_changed_inventory_crosses_whole_and_a_held_one_by_digest_only():
    leader = Leader()
    await leader.server.start()
    rs = ReportStream("h", "127.0.0.1:1")
    try:
        async with grpc.aio.insecure_channel(leader.address) as ch:
            await send(rs, ch, leader.address, rack="a")  # asked for, then sent whole
            rs.close()  # a fallback, a leader change: a new stream
            await send(rs, ch, leader.address, rack="a")  # held: named only
            rs.close()
            await send(rs, ch, leader.address, rack="b")  # changed meanwhile: not held, so it crosses whole
            assert [[bool(m.inventory_json) for m in s] for s in leader.messages] == [[False, True], [False],
                                                                                      [False, True]]
            assert leader.messages[2][1].inventory_json == inv("b")
            assert (rs.inventories_sent, rs.inventories_named) == (2, 1)
    finally:
        await leader.server.stop(None)


async def test_a_receiver_before_digests_gets_the_inventory_at_once_and_on_every_new_stream(clock):
    leader = Leader(digests=False)
    await leader.server.start()
    rs = ReportStream("h", "127.0.0.1:1")
    try:
        async with grpc.aio.insecure_channel(leader.address) as ch:
            reply = await send(rs, ch, leader.address)  # refused, then whole on a new stream, in the same call
            assert reply.leader_id == "L" and rs.opened == 2
            rs.close()
            await send(rs, ch, leader.address)  # no second refusal: whole from the start
            assert [[bool(m.inventory_json) for m in s] for s in leader.messages] == [[False], [True], [True]]
            clock[0] += report_stream.UNARY_RETRY + 1  # upgraded in place, maybe: digests are tried again
            rs.close()
            await send(rs, ch, leader.address)
            assert [bool(m.inventory_json) for m in leader.messages[-1]] == [True]
            assert len(leader.messages) == 5
    finally:
        await leader.server.stop(None)


async def test_a_stream_names_the_hosts_admission_index_once_it_has_one():
    """A voter that has not applied a new host's admission waits for that index rather than refuse the stream
    (agentd.security.auth, ADMITTED_METADATA); a host that did not join in this run names none."""
    leader = Leader()
    await leader.server.start()
    rs = ReportStream("h", "127.0.0.1:1")
    try:
        async with grpc.aio.insecure_channel(leader.address) as ch:
            await send(rs, ch, leader.address)
            rs.close()
            rs.admitted_index = 4242
            await send(rs, ch, leader.address)
        assert ADMITTED_METADATA not in leader.metadata[0]
        assert leader.metadata[1][ADMITTED_METADATA] == "4242"
    finally:
        rs.close()
        await leader.server.stop(None)
