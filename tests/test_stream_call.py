"""A stream the peer ended just before a write (agentd/cluster/stream_call.py), against real gRPC on loopback.

The peer is a threaded gRPC server, so it ends the call while the client's event loop is held up, as a
loaded agent's loop is: Core has the status, the loop has not run its callback when the next message is
written. grpc.aio then sets the call's status to INTERNAL "Internal error from Core" in place of the real
one. The report stream, the relay and `exchange` itself must call that an end of stream, not an error;
a peer's own INTERNAL must still come through with its words.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from types import SimpleNamespace

import grpc
import pytest

from agentd.api.report_stream import ReportStream, StreamEnded
from agentd.cluster.relay import ReportRelay
from agentd.cluster.stream_call import CORE_REFUSED_SEND, CallEnded, exchange
from agentd.logs import JsonFormatter
from agentd.v1 import control_pb2 as pb

VERSION = ("0.2.0", 2, 2, "")
ENDS = {"ok": None, "unavailable": grpc.StatusCode.UNAVAILABLE, "internal": grpc.StatusCode.INTERNAL,
        "refuse": grpc.StatusCode.INTERNAL}


class Peer:
    """A threaded gRPC server whose streams answer the first message, then end with `ENDS[end]`; "refuse"
    ends them at the first message, unanswered."""

    def __init__(self, end: str):
        self.end = ENDS[end]
        self.answer = end != "refuse"
        self.ended = threading.Event()  # the server has ended a call
        self.streams = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handlers = {
            "Raw": grpc.stream_stream_rpc_method_handler(self._stream, request_deserializer=bytes,
                                                         response_serializer=bytes),
            "ReportStream": grpc.stream_stream_rpc_method_handler(
                self._reports, request_deserializer=pb.ReportUpdate.FromString,
                response_serializer=pb.ReportReply.SerializeToString),
            "RelayReports": grpc.stream_stream_rpc_method_handler(
                self._relayed, request_deserializer=pb.RelayBatch.FromString,
                response_serializer=pb.RelayReply.SerializeToString),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("agentd.v1.Agent", handlers),))
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def _answer_once(self, requests, context, reply):
        self.streams += 1
        self.ended.clear()
        context.add_callback(self.ended.set)
        next(requests)
        if self.answer:
            yield reply
        if self.end is not None:
            context.abort(self.end, f"the peer ended the stream ({self.end.name})")

    def _stream(self, requests, context):
        yield from self._answer_once(requests, context, b"answer")

    def _reports(self, requests, context):
        yield from self._answer_once(requests, context, pb.ReportReply(leader_id="L", state_format=2))

    def _relayed(self, requests, context):
        yield from self._answer_once(requests, context, pb.RelayReply(leader_id="L", state_format=2))

    def stop(self) -> None:
        self.server.stop(None)


@pytest.fixture
def peer(request):
    p = Peer(request.param)
    yield p
    p.stop()


def busy_loop(peer: Peer) -> None:
    """Hold up the event loop while the peer ends the call and its status reaches the client's Core (as a
    loaded agent's loop is held up)."""
    assert peer.ended.wait(60)
    time.sleep(0.3)


@pytest.mark.parametrize("peer", ["unavailable"], indirect=True)
async def test_a_write_on_a_stream_the_peer_had_ended_is_an_end_not_an_internal_error(peer):
    async with grpc.aio.insecure_channel(peer.address) as ch:
        call = ch.stream_stream("/agentd.v1.Agent/Raw")()
        assert await exchange(call, b"first") == b"answer"
        busy_loop(peer)
        with pytest.raises(CallEnded):
            await exchange(call, b"second")
        # what grpc.aio made of the call's status, which `exchange` must not pass on as the peer's error
        assert (await call.code(), await call.details()) == (grpc.StatusCode.INTERNAL, CORE_REFUSED_SEND)


@pytest.mark.parametrize("peer", ["internal"], indirect=True)
async def test_a_peers_own_internal_error_comes_through_with_its_words(peer):
    async with grpc.aio.insecure_channel(peer.address) as ch:
        call = ch.stream_stream("/agentd.v1.Agent/Raw")()
        assert await exchange(call, b"first") == b"answer"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()  # the end arrives with its status, no write in between
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert err.value.details() == "the peer ended the stream (INTERNAL)"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await exchange(call, b"second")  # a write on the ended call: its own status again, not CallEnded
        assert err.value.details() == "the peer ended the stream (INTERNAL)"


@pytest.mark.parametrize("peer", ["ok"], indirect=True)
async def test_a_stream_ended_with_ok_reads_as_eof(peer):
    async with grpc.aio.insecure_channel(peer.address) as ch:
        call = ch.stream_stream("/agentd.v1.Agent/Raw")()
        assert await exchange(call, b"first") == b"answer"
        assert await call.read() is grpc.aio.EOF
        assert await exchange(call, b"second") is grpc.aio.EOF


@pytest.mark.parametrize("peer", ["unavailable"], indirect=True)
async def test_the_report_stream_reports_a_lost_end_as_stream_ended_and_opens_a_new_stream(peer):
    rs = ReportStream("h", "127.0.0.1:1")
    async with grpc.aio.insecure_channel(peer.address) as ch:
        async def send():
            return await rs.send(ch, peer.address, inventory_json="{}", instances=[], version=VERSION)

        assert (await send()).leader_id == "L"
        busy_loop(peer)
        with pytest.raises(StreamEnded, match="had ended before this report went out"):
            await send()
        assert (await send()).leader_id == "L"  # a new stream, answered
        assert rs.opened == 2 and peer.streams == 2


def relay_for(address: str, channel: grpc.aio.Channel) -> ReportRelay:
    """A voter's relay whose Raft view names `address` the leader."""
    raft = SimpleNamespace(members={"v": SimpleNamespace(voter=True)}, leader_address=address, leader_id="L",
                           is_leader=False)
    return ReportRelay("v", raft, lambda _address: channel)


def logged(caplog) -> list[str]:
    """The relay's log lines as an operator reads them in the journal."""
    return [JsonFormatter().format(r) for r in caplog.records if r.name == "agentd.cluster.relay"]


@pytest.mark.parametrize("peer", ["unavailable"], indirect=True)
async def test_the_relay_logs_a_lost_end_as_an_end_not_as_internal(peer, caplog):
    caplog.set_level(logging.DEBUG, logger="agentd.cluster.relay")
    async with grpc.aio.insecure_channel(peer.address) as ch:
        relay = relay_for(peer.address, ch)
        await relay.step()
        assert relay.batches == 1
        busy_loop(peer)
        await relay.step()  # the batch meets the ended stream
        lines = logged(caplog)
        assert not [line for line in lines if "INTERNAL" in line or "Internal error" in line], lines
        assert any("relay stream to the leader ended" in line and "before the batch went out" in line
                   for line in lines), lines
        await relay.step()  # a new stream, answered
        assert relay.batches == 2 and peer.streams == 2
        relay.close()


@pytest.mark.parametrize("peer", ["refuse"], indirect=True)
async def test_the_relay_still_logs_a_leaders_own_internal_error(peer, caplog):
    caplog.set_level(logging.DEBUG, logger="agentd.cluster.relay")
    async with grpc.aio.insecure_channel(peer.address) as ch:
        relay = relay_for(peer.address, ch)
        await relay.step()  # the leader's INTERNAL answers the batch
        assert relay.batches == 0
        lines = logged(caplog)
        assert any('"code":"INTERNAL"' in line and "the peer ended the stream (INTERNAL)" in line
                   for line in lines), lines
        relay.close()
