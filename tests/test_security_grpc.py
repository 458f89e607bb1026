"""Mutual TLS and role-based authorization on a real grpc.aio server on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random

import grpc
import pytest

from agentd.errors import PeerError
from agentd.security import apikeys as K
from agentd.security import ca as C
from agentd.security.auth import ADMITTED_METADATA, AuthInterceptor, admitted_metadata, current_caller
from agentd.security.tls import (
    INSECURE_WARNING,
    TlsIdentity,
    add_secure_ports,
    channel_credentials,
    fetch_pinned_ca,
    load_identity,
)
from agentd.v1 import control_pb2 as pb
from agentd.v1 import control_pb2_grpc as pb_grpc

T0 = 1_900_000_000.0


def ident(authority, name, role) -> TlsIdentity:
    i = C.issue_identity(authority, name, role=role, addresses=["127.0.0.1", "localhost"])
    return TlsIdentity(ca_pem=i.ca_pem, cert_pem=i.cert_pem, key_pem=i.key_pem, name=name, role=role)


@pytest.fixture(scope="module")
def pki():
    authority = C.create_ca()
    rogue = C.create_ca()
    r = random.Random(7)
    admin_key, rec_a = K.new_api_key(tenant="ops", admin=True, now=T0, random_bytes=r.randbytes)
    user_key, rec_u = K.new_api_key(tenant="acme", now=T0, random_bytes=r.randbytes)
    revoked_key, rec_r = K.new_api_key(tenant="ops", admin=True, now=T0, random_bytes=r.randbytes)
    store = K.add_key(K.add_key(K.add_key({}, rec_a), rec_u), rec_r)
    store, _ = K.revoke_key(store, rec_r.id, now=T0 + 1)
    return {
        "ca": authority, "server": ident(authority, "n1", "node"), "peer": ident(authority, "n2", "node"),
        "admin": ident(authority, "alice", "admin"), "rogue_admin": ident(rogue, "mallory", "admin"),
        "rogue_node": ident(rogue, "n2", "node"), "store": store,
        "admin_key": admin_key, "user_key": user_key, "revoked_key": revoked_key,
    }


class Control(pb_grpc.ControlServicer):
    async def Leader(self, request, context):
        c = current_caller()
        return pb.LeaderReply(leader_id=f"{c.kind}:{c.name}:{c.role}", term=7)

    async def Watch(self, request, context):
        for i in range(3):
            yield pb.Event(kind="tick", name=current_caller().role, index=i)


class Agent(pb_grpc.AgentServicer):
    async def Report(self, request, context):
        return pb.ReportReply(term=3, leader_id=current_caller().name)


async def _vote(request, context):
    return b"granted"

RAFT = grpc.method_handlers_generic_handler(
    "agentd.v1.Raft", {"RequestVote": grpc.unary_unary_rpc_method_handler(_vote)})
JOIN = grpc.method_handlers_generic_handler(
    "agentd.v1.Join", {"Join": grpc.unary_unary_rpc_method_handler(_vote)})


@pytest.fixture
async def server(pki):
    verify = lambda tok: K.verify_key(pki["store"], tok, now=T0 + 10)  # noqa: E731
    srv = grpc.aio.server(interceptors=[AuthInterceptor(verify)])
    pb_grpc.add_ControlServicer_to_server(Control(), srv)
    pb_grpc.add_AgentServicer_to_server(Agent(), srv)
    srv.add_generic_rpc_handlers((RAFT, JOIN))
    port, token_port = add_secure_ports(srv, pki["server"], listen="127.0.0.1:0", token_listen="127.0.0.1:0")
    await srv.start()
    yield port, token_port
    await srv.stop(None)


def channel(port, creds):
    # Certificates name 127.0.0.1; the override pins which name is checked.
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", "n1")])


async def leader(port, creds, metadata=None):
    async with channel(port, creds) as ch:
        return await pb_grpc.ControlStub(ch).Leader(pb.LeaderRequest(), timeout=5, metadata=metadata)


async def code_of(coro):
    try:
        await coro
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


async def test_node_and_admin_certificates_are_told_apart(pki, server):
    port, _ = server
    assert (await leader(port, channel_credentials(pki["admin"]))).leader_id == "cert:alice:admin"
    assert (await leader(port, channel_credentials(pki["peer"]))).leader_id == "cert:n2:node"
    async with channel(port, channel_credentials(pki["peer"])) as ch:
        assert (await pb_grpc.AgentStub(ch).Report(pb.ReportRequest(node="n2"), timeout=5)).leader_id == "n2"
        assert await ch.unary_unary("/agentd.v1.Raft/RequestVote")(b"", timeout=5) == b"granted"
    async with channel(port, channel_credentials(pki["admin"])) as ch:
        code, details = await code_of(pb_grpc.AgentStub(ch).Report(pb.ReportRequest(), timeout=5))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "role node" in details
        code, _ = await code_of(ch.unary_unary("/agentd.v1.Raft/RequestVote")(b"", timeout=5))
        assert code == grpc.StatusCode.PERMISSION_DENIED, "an admin is not a voter"


@pytest.mark.parametrize("who", ["none", "rogue_node", "rogue_admin"])
async def test_mtls_port_refuses_peers_without_a_valid_certificate(pki, server, who):
    port, _ = server
    if who == "none":
        creds = channel_credentials(ca_pem=pki["ca"].cert_pem)
    else:  # trusts our CA (so the server is fine) but presents a certificate from another CA
        creds = channel_credentials(dataclasses.replace(pki[who], ca_pem=pki["ca"].cert_pem))
    async with channel(port, creds) as ch:
        code, _ = await code_of(ch.unary_unary("/agentd.v1.Raft/RequestVote")(b"", timeout=3))
    assert code == grpc.StatusCode.UNAVAILABLE, "the TLS handshake itself must fail"


async def test_token_port_takes_admin_bearer_only(pki, server):
    _, tport = server
    ca_pem = pki["ca"].cert_pem
    reply = await leader(tport, channel_credentials(ca_pem=ca_pem, bearer_token=pki["admin_key"]))
    assert reply.leader_id.startswith("token:") and reply.leader_id.endswith(":admin")
    code, details = await code_of(leader(tport, channel_credentials(ca_pem=ca_pem, bearer_token=pki["user_key"])))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "needs role admin or node" in details
    code, details = await code_of(leader(tport, channel_credentials(ca_pem=ca_pem, bearer_token=pki["revoked_key"])))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in details
    code, details = await code_of(leader(tport, channel_credentials(ca_pem=ca_pem)))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "client certificate or an admin bearer token" in details


async def test_anonymous_callers_may_only_join(pki, server):
    _, tport = server
    async with channel(tport, channel_credentials(ca_pem=pki["ca"].cert_pem)) as ch:
        assert await ch.unary_unary("/agentd.v1.Join/Join")(b"", timeout=5) == b"granted"
        code, _ = await code_of(ch.unary_unary("/agentd.v1.Raft/RequestVote")(b"", timeout=5))
        assert code == grpc.StatusCode.UNAUTHENTICATED, "no certificate, no vote"
        code, _ = await code_of(pb_grpc.AgentStub(ch).Report(pb.ReportRequest(), timeout=5))
        assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_streaming_rpcs_are_authorized_too(pki, server):
    port, tport = server
    async with channel(port, channel_credentials(pki["admin"])) as ch:
        events = [e async for e in pb_grpc.ControlStub(ch).Watch(pb.WatchRequest(), timeout=5)]
    assert [(e.name, e.index) for e in events] == [("admin", 0), ("admin", 1), ("admin", 2)]
    async with channel(tport, channel_credentials(ca_pem=pki["ca"].cert_pem, bearer_token=pki["user_key"])) as ch:
        stream = pb_grpc.ControlStub(ch).Watch(pb.WatchRequest(), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            _ = [e async for e in stream]
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_joiner_fetches_the_ca_by_pin_from_either_port(pki, server):
    port, tport = server
    for p in (tport, port):
        assert fetch_pinned_ca(f"127.0.0.1:{p}", pki["ca"].fingerprint) == pki["ca"].cert_pem
    with pytest.raises(PeerError, match="does not present a CA matching"):
        fetch_pinned_ca(f"127.0.0.1:{tport}", "sha256:" + "0" * 64)


async def test_insecure_mode_warns_and_allows(pki, caplog):
    caplog.set_level(logging.WARNING)
    srv = grpc.aio.server(interceptors=[AuthInterceptor(lambda t: None, insecure=True)])
    pb_grpc.add_ControlServicer_to_server(Control(), srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            reply = await pb_grpc.ControlStub(ch).Leader(pb.LeaderRequest(), timeout=5)
    finally:
        await srv.stop(None)
    assert reply.leader_id == "insecure::admin"
    assert INSECURE_WARNING in caplog.text


async def test_a_host_admitted_a_moment_ago_is_let_in_and_a_stranger_refused_after_the_grace(pki, monkeypatch):
    """A follower that has not applied a host's admission yet waits for it instead of refusing the host."""
    loop = asyncio.get_running_loop()
    admitted_at = loop.time() + 0.3  # n2's admission reaches this agent 0.3 s after its first call
    members = lambda name: name == "n1" or (name == "n2" and loop.time() >= admitted_at)  # noqa: E731
    srv = grpc.aio.server(interceptors=[AuthInterceptor(lambda t: None, is_member=members, member_grace=2.0)])
    pb_grpc.add_ControlServicer_to_server(Control(), srv)
    port, _ = add_secure_ports(srv, pki["server"], listen="127.0.0.1:0", token_listen="127.0.0.1:0")
    await srv.start()
    stranger = ident(pki["ca"], "n3", "node")
    try:
        assert (await leader(port, channel_credentials(pki["peer"]))).leader_id == "cert:n2:node"
        started = loop.time()
        code, details = await code_of(leader(port, channel_credentials(stranger)))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "'n3' is not a member" in details
        assert loop.time() - started >= 2.0, "refused only once the grace ran out"
        monkeypatch.setattr("agentd.security.auth.MEMBER_WAITERS", 0)  # no room to wait: refused at once
        code, _ = await code_of(leader(port, channel_credentials(stranger)))
        assert code == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await srv.stop(None)


async def test_a_host_naming_its_admission_index_waits_for_it_and_a_stranger_is_refused_once_it_is_applied(pki):
    """With the join reply's admission index on the call, the follower waits until it has applied that far, past
    the grace (a follower seconds behind in a 2,048-host join), and then for the grace at most."""
    loop = asyncio.get_running_loop()
    applied = [10]
    members = lambda name: name == "n1" or (name == "n2" and applied[0] >= 12)  # noqa: E731
    srv = grpc.aio.server(interceptors=[AuthInterceptor(lambda t: None, is_member=members, member_grace=0.2,
                                                        applied=lambda: applied[0], member_catchup=5.0)])
    pb_grpc.add_ControlServicer_to_server(Control(), srv)
    port, _ = add_secure_ports(srv, pki["server"], listen="127.0.0.1:0", token_listen="127.0.0.1:0")
    await srv.start()
    stranger = ident(pki["ca"], "n3", "node")

    async def apply_later(delay: float, index: int) -> None:
        await asyncio.sleep(delay)
        applied[0] = index

    try:
        started = loop.time()
        catch_up = asyncio.create_task(apply_later(1.0, 12))  # n2 was admitted at 12; this agent gets there 1 s on
        reply = await leader(port, channel_credentials(pki["peer"]), metadata=admitted_metadata(12))
        assert reply.leader_id == "cert:n2:node" and loop.time() - started >= 0.9  # waited past the 0.2 s grace
        await catch_up
        # A stranger naming an index applied already: refused after the grace, not the catch-up.
        started = loop.time()
        code, details = await code_of(leader(port, channel_credentials(stranger), metadata=admitted_metadata(11)))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "'n3' is not a member" in details
        assert 0.2 <= loop.time() - started < 1.5
        # ... or one not applied yet: refused the grace after it is, not at the end of the 5 s catch-up.
        started = loop.time()
        catch_up = asyncio.create_task(apply_later(0.5, 13))
        code, _ = await code_of(leader(port, channel_credentials(stranger), metadata=admitted_metadata(13)))
        assert code == grpc.StatusCode.PERMISSION_DENIED and 0.65 <= loop.time() - started < 2.5
        await catch_up
        # Garbage in the metadata counts as no index: the grace.
        code, _ = await code_of(leader(port, channel_credentials(stranger),
                                       metadata=((ADMITTED_METADATA, "not-a-number"),)))
        assert code == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await srv.stop(None)


def test_identity_files_from_init_ca_work_for_a_server(tmp_path):
    authority = C.init_ca(tmp_path)
    C.save_identity(tmp_path, "node", C.issue_identity(authority, "n1", role="node", addresses=["127.0.0.1"]))
    assert load_identity(tmp_path).role == "node"


def test_identify_caches_callers_by_certificate_and_stays_bounded(pki, monkeypatch):
    from agentd.security import auth

    monkeypatch.setattr(auth, "CERT_CACHE_SIZE", 2)
    cache: dict = {}
    ctx = {"x509_pem_cert": [pki["peer"].cert_pem]}
    first = auth.identify(ctx, (), lambda t: None, cache)
    assert (first.kind, first.name, first.role) == ("cert", "n2", "node")
    assert auth.identify(ctx, (), lambda t: None, cache) is first
    for who in ("admin", "server", "rogue_admin"):
        auth.identify({"x509_pem_cert": [pki[who].cert_pem]}, (), lambda t: None, cache)
    assert len(cache) == 2 and pki["peer"].cert_pem not in cache
    assert auth.identify({}, [("authorization", "Bearer nope")], lambda t: None) is None
    assert auth.identify({}, [], lambda t: None).role == "anonymous"


async def test_a_watcher_streams_the_state_under_its_own_name_only(pki):
    """Raft/Watch (server streaming, parsed request): the node_id must be the caller's certificate name."""
    from agentd.v1 import raft_pb2 as rpb

    async def watch(request, context):
        yield rpb.RaftWatchEvent(leader=rpb.RaftWatchLeader(leader_id=request.node_id))

    handlers = grpc.method_handlers_generic_handler("agentd.v1.Raft", {"Watch": grpc.unary_stream_rpc_method_handler(
        watch, request_deserializer=rpb.RaftWatchRequest.FromString,
        response_serializer=rpb.RaftWatchEvent.SerializeToString)})
    srv = grpc.aio.server(interceptors=[AuthInterceptor(lambda t: None)])
    srv.add_generic_rpc_handlers((handlers,))
    port, _ = add_secure_ports(srv, pki["server"], listen="127.0.0.1:0", token_listen=None)
    await srv.start()
    try:
        async with channel(port, channel_credentials(pki["peer"])) as ch:
            call = ch.unary_stream("/agentd.v1.Raft/Watch", request_serializer=rpb.RaftWatchRequest.SerializeToString,
                                   response_deserializer=rpb.RaftWatchEvent.FromString)
            own = [e async for e in call(rpb.RaftWatchRequest(node_id="n2"), timeout=5)]
            assert own[0].leader.leader_id == "n2"
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                _ = [e async for e in call(rpb.RaftWatchRequest(node_id="n1"), timeout=5)]
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "of 'n2' may not speak for 'n1'" in exc.value.details()
    finally:
        await srv.stop(None)
