"""Raft messages over gRPC (grpc.aio): one outbound stream per peer, raw-bytes handlers inbound.

Outbound, each peer gets a bounded queue and a task that keeps one `Send`
stream open and writes messages in order. When a stream fails the queued
messages are dropped (Raft retransmits), the core hears "unreachable", and the
task reconnects with capped backoff.

Inbound, the handlers take raw bytes so that garbage gets INVALID_ARGUMENT
with a sentence instead of grpc's generic deserialisation error, and a bad
peer never reaches the core. When an inbound stream ends, or our stream to a
peer breaks, the node is told: if that peer is its leader it can campaign
at once instead of waiting out an election timeout (SIGKILL closes sockets,
so the other side sees the break within milliseconds).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from agentd.cluster.raft.codec import StreamDecoder, encode
from agentd.cluster.raft.types import Message, SnapshotRequest
from agentd.errors import AgentdError, InvalidInput, NotAvailable, PeerError, UpgradeRequired
from agentd.logs import fields
from agentd.v1 import raft_pb2 as pb
from agentd.v1 import raft_pb2_grpc
from agentd.version import AGENT_VERSION, BASELINE_VERSION, VERSION_METADATA_KEY, incompatibility

log = logging.getLogger(__name__)

SERVICE = "agentd.v1.Raft"
FORWARDED = "x-agentd-raft-forwarded"
LEADER_HINT = "x-agentd-leader"  # trailing metadata of a Join or Leave sent to a follower: where the leader is


class AskTheLeader(NotAvailable):
    """A follower does not forward another host's Join or Leave: the leader must see that host's own
    certificate (a member may speak only for itself), so the caller is told where the leader is."""

    def __init__(self, message: str, leader_address: str):
        super().__init__(message)
        self.leader_address = leader_address

# Reconnect quickly to a restarted peer: grpc's default backoff grows to 120 s.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_send_message_length", 8 << 20),
    ("grpc.max_receive_message_length", 8 << 20),
]


@dataclass(frozen=True)
class TransportEvents:
    """How the transport reports to the node (all called on the event loop)."""

    message: Callable[[Message], None]
    unreachable: Callable[[str], None]  # our stream to this peer failed
    connection_lost: Callable[[str], None]  # a stream from or to this peer ended
    snapshot_sent: Callable[[str, bool], None]
    join: Callable[[pb.RaftJoinRequest, bool], Awaitable[pb.RaftJoinReply]]
    leave: Callable[[pb.RaftLeaveRequest, bool], Awaitable[pb.RaftLeaveReply]]


class _Peer:
    """The outbound side towards one peer."""

    def __init__(self, transport: GrpcTransport, peer_id: str, address: str) -> None:
        self.t = transport
        self.id = peer_id
        self.address = address
        self.queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=transport.queue_size)
        self.channel = transport.open_channel(address)
        self.call: grpc.aio.StreamUnaryCall | None = None
        self.closing = False
        self.dropped = 0
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"raft-send-{peer_id}")

    def offer(self, msg: Message) -> None:
        try:
            self.queue.put_nowait(msg)
        except asyncio.QueueFull:
            self.dropped += 1  # Raft retransmits; a slow peer must not grow our memory
            if isinstance(msg, SnapshotRequest):
                self.t.events.snapshot_sent(self.id, False)

    async def _run(self) -> None:
        backoff = 0.05
        while not self.closing:
            msg = await self.queue.get()
            try:
                await self._write(msg)
                backoff = 0.05
            except (TimeoutError, grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError,
                    ConnectionError) as exc:
                # grpc turns a cancelled write into an RPC error: do not mistake our own
                # shutdown for a broken peer (and do not swallow the cancellation).
                if self.closing:
                    return
                self._broken(msg, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
            except Exception:  # a bug must not silently kill the peer's sender
                if self.closing:
                    return
                log.exception("cannot send raft message", extra=fields(peer=self.id, type=type(msg).__name__))

    async def _write(self, msg: Message) -> None:
        if self.call is None or self.call.done():
            self.call = self.t.stub(self.channel).Send(wait_for_ready=False,
                                                       metadata=((VERSION_METADATA_KEY, AGENT_VERSION),))
            call = self.call
            call.add_done_callback(lambda _c: self._on_call_done(call))
        call = self.call
        for part in encode(msg, self.t.cluster_id, self.t.address):
            write = asyncio.ensure_future(call.write(part))
            try:
                done, _ = await asyncio.wait([write], timeout=self.t.write_timeout)
            except asyncio.CancelledError:  # our sender is closing: the write goes with it, its error unread
                write.cancel()
                raise
            if not done:
                # The peer stopped reading (a stalled loop, a full window) but the connection stands: we end
                # the stream ourselves, so its end is no news (no leader-lost hint: the election timer judges)
                if call is self.call:
                    self.call = None
                write.cancel()
                call.cancel()
                raise TimeoutError(f"a write to {self.id} took over {self.t.write_timeout} s")
            write.result()
        if isinstance(msg, SnapshotRequest):
            self.t.events.snapshot_sent(self.id, True)

    def _on_call_done(self, call: grpc.aio.StreamUnaryCall) -> None:
        if call is self.call and not self.t.closed:
            self.call = None
            self.t.events.connection_lost(self.id)

    def _broken(self, msg: Message, exc: BaseException) -> None:
        if self.call is not None:
            self.call.cancel()
            self.call = None
        lost = [msg]
        while not self.queue.empty():
            lost.append(self.queue.get_nowait())
        detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__
        log.debug("raft stream broken", extra=fields(peer=self.id, address=self.address, error=detail,
                                                        dropped=len(lost)))
        self.t.events.unreachable(self.id)
        if not isinstance(exc, TimeoutError):  # a peer that is only slow has not lost its connection
            self.t.events.connection_lost(self.id)
        for m in lost:
            if isinstance(m, SnapshotRequest):
                self.t.events.snapshot_sent(self.id, False)

    async def close(self) -> None:
        self.closing = True
        self.task.cancel()
        await asyncio.wait([self.task], timeout=1.0)
        if self.call is not None:
            self.call.cancel()
        await self.channel.close()


class GrpcTransport:
    def __init__(self, node_id: str, address: str, events: TransportEvents, *, write_timeout: float = 1.0,
                 queue_size: int = 4096, max_snapshot: int = 1 << 30) -> None:
        self.node_id = node_id
        self.address = address
        self.events = events
        self.cluster_id = ""
        self.write_timeout = write_timeout
        self.queue_size = queue_size
        self.max_snapshot = max_snapshot
        self.closed = False
        self._peers: dict[str, _Peer] = {}
        self._members: dict[str, str] = {}  # id -> address from the membership (authoritative)
        self._learned: dict[str, str] = {}  # id -> address peers told us (joining nodes, candidates)
        self.ready = False  # inbound messages are refused until the node has started
        self._credentials: grpc.ChannelCredentials | None = None  # None: plaintext (--insecure)
        self._channel_options: list[tuple[str, Any]] = list(CHANNEL_OPTIONS)

    # ------------------------------------------------------------ wiring

    def set_credentials(self, credentials: grpc.ChannelCredentials | None,
                        options: Sequence[tuple[str, Any]] = ()) -> None:
        """Dial peers over TLS with these client credentials (the node certificate); before `start`."""
        self._credentials = credentials
        self._channel_options = [*CHANNEL_OPTIONS, *options]

    def open_channel(self, address: str) -> grpc.aio.Channel:
        """A channel to a peer: mutual TLS once credentials are set, plaintext otherwise."""
        if self._credentials is None:
            return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        return grpc.aio.secure_channel(address, self._credentials, options=self._channel_options)

    @staticmethod
    def stub(channel: grpc.aio.Channel) -> raft_pb2_grpc.RaftStub:
        return raft_pb2_grpc.RaftStub(channel)

    def register(self, server: grpc.aio.Server) -> None:
        handlers = {
            "Send": grpc.stream_unary_rpc_method_handler(
                self._on_stream, response_serializer=pb.RaftSendReply.SerializeToString),
            "Join": grpc.unary_unary_rpc_method_handler(
                self._on_join, response_serializer=pb.RaftJoinReply.SerializeToString),
            "Leave": grpc.unary_unary_rpc_method_handler(
                self._on_leave, response_serializer=pb.RaftLeaveReply.SerializeToString),
        }
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])

    def set_members(self, addresses: dict[str, str]) -> None:
        gone = set(self._members) - set(addresses)
        self._members = {k: v for k, v in addresses.items() if k != self.node_id and v}
        for peer_id in gone:  # removed from the cluster: stop talking to it
            self._learned.pop(peer_id, None)
            peer = self._peers.pop(peer_id, None)
            if peer is not None:
                asyncio.get_running_loop().create_task(peer.close())

    def learn(self, peer_id: str, address: str) -> None:
        if peer_id != self.node_id and address:
            self._learned[peer_id] = address

    def address_of(self, peer_id: str) -> str | None:
        return self._members.get(peer_id) or self._learned.get(peer_id)

    # ------------------------------------------------------------ outbound

    def send(self, msgs: Iterable[Message]) -> None:
        for m in msgs:
            if self.closed:
                continue
            address = self.address_of(m.to)
            if address is None:
                continue
            peer = self._peers.get(m.to)
            if peer is not None and peer.address != address:
                old = self._peers.pop(m.to)
                asyncio.get_running_loop().create_task(old.close())
                peer = None
            if peer is None:
                peer = self._peers[m.to] = _Peer(self, m.to, address)
            peer.offer(m)

    async def close(self) -> None:
        self.closed = True
        peers, self._peers = list(self._peers.values()), {}
        await asyncio.gather(*(p.close() for p in peers), return_exceptions=True)

    # ------------------------------------------------------------ inbound

    async def _on_stream(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.RaftSendReply:
        theirs = next((v for k, v in (context.invocation_metadata() or ()) if k == VERSION_METADATA_KEY),
                      BASELINE_VERSION)  # agentd 0.1.0 says nothing
        if why := incompatibility(AGENT_VERSION, str(theirs)):
            log.warning("raft stream from an incompatible agent refused", extra=fields(reason=why))
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, why)
        decoder = StreamDecoder(self.max_snapshot)
        sender: str | None = None
        received = 0
        try:
            async for raw in request_iterator:
                if not self.ready:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"raft node {self.node_id} is not running")
                m = self._parse(raw)
                if m is None:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed raft message (not protobuf)")
                if m.cluster_id and self.cluster_id and m.cluster_id != self.cluster_id:
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                        f"message from cluster {m.cluster_id}; this node is in {self.cluster_id}")
                if m.to != self.node_id:
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                        f"message for {m.to!r} reached node {self.node_id!r}")
                if sender is None:
                    sender = m.sender
                elif m.sender != sender:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"stream from {sender!r} carried a message from {m.sender!r}")
                try:
                    msg = decoder.decode(m)
                except InvalidInput as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid raft message: {exc}")
                received += 1
                if m.sender_address:
                    self.learn(m.sender, m.sender_address)
                if msg is not None:
                    self.events.message(msg)
        finally:
            if sender is not None and not self.closed:
                self.events.connection_lost(sender)
        return pb.RaftSendReply(received=received)

    @staticmethod
    def _parse(raw: bytes) -> pb.RaftMessage | None:
        try:
            return pb.RaftMessage.FromString(raw)
        except (DecodeError, ValueError):
            return None

    async def _on_join(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.RaftJoinReply:
        try:
            req = pb.RaftJoinRequest.FromString(raw)
        except (DecodeError, ValueError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed join request (not protobuf)")
        return await self._call(context, self.events.join(req, _forwarded(context)))

    async def _on_leave(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.RaftLeaveReply:
        try:
            req = pb.RaftLeaveRequest.FromString(raw)
        except (DecodeError, ValueError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed leave request (not protobuf)")
        return await self._call(context, self.events.leave(req, _forwarded(context)))

    async def _call(self, context: grpc.aio.ServicerContext, work: Awaitable):
        if not self.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"raft node {self.node_id} is not running")
        try:
            return await work
        except InvalidInput as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except NotAvailable as exc:
            if isinstance(exc, AskTheLeader) and exc.leader_address:
                context.set_trailing_metadata(((LEADER_HINT, exc.leader_address),))
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except (PeerError, UpgradeRequired) as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except AgentdError as exc:
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))


def _forwarded(context: grpc.aio.ServicerContext) -> bool:
    return any(k == FORWARDED for k, _ in (context.invocation_metadata() or ()))
