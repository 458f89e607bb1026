"""gRPC services for cluster access: `agentd.v1.Security` (join tokens, API keys) and `agentd.v1.Join`.

Security calls change the replicated state, so they run on the leader: any
agent accepts one and forwards it (marked, never twice), as Control calls are.
Secrets are made on the leader and returned once; only their hashes enter the
log. Every time that matters (creation, expiry, use, revocation) is the
leader's clock, carried in the command, so every node applies the same.

Join is the one call anyone may make (the token is the credential). The agent
that receives it:

1. refuses at once what its own copy of the state already proves wrong (a
   token used, expired or with another secret); a token it does not know yet
   may be newer than its copy, so the leader decides those;
2. if it does not hold the CA key, forwards the request to an agent that does
   (a signer; the leader first, then the other members);
3. as a signer, checks and signs the certificate request, then has the leader
   consume the token through the log, and only then returns the certificate.
   Two signers racing with one token both propose; the log orders them and the
   second is refused.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from agentd.api.control import FORWARD_TIMEOUT, FORWARDED, ChannelPool, RaftView, redirect, status_for
from agentd.cluster.state import (
    ClusterState,
    cert_revoke_command,
    key_add_command,
    key_revoke_command,
    node_approve_command,
    node_hold_command,
    secret_rotate_command,
    token_add_command,
    token_consume_command,
    token_revoke_command,
)
from agentd.errors import AgentdError, InvalidInput, NotAvailable
from agentd.logs import fields
from agentd.security import apikeys, tokens
from agentd.security.auth import Redirect, current_caller, forward_metadata
from agentd.security.ca import ROLE_NODE, CertificateAuthority, check_name, sign_csr
from agentd.security.join import csr_node_name
from agentd.v1 import control_pb2 as cpb
from agentd.v1 import control_pb2_grpc as cpb_grpc
from agentd.v1 import security_pb2 as pb
from agentd.v1 import security_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

NOT_A_SIGNER = "not a signer"
CONFIRM_TIMEOUT = 2.0  # how long a revocation waits for every member to apply it before replying


def token_info(r: tokens.JoinTokenRecord, now: float) -> pb.JoinTokenInfo:
    if r.used_at is not None:
        state = "used"
    elif now >= r.expires_at:
        state = "expired"
    else:
        state = "active"
    return pb.JoinTokenInfo(id=r.id, description=r.description, node_name=r.node_name or "",
                            created_at=r.created_at, expires_at=r.expires_at, used_at=r.used_at or 0.0,
                            used_by=r.used_by or "", state=state)


def key_info(r: apikeys.ApiKeyRecord, now: float) -> pb.ApiKeyInfo:
    return pb.ApiKeyInfo(id=r.id, name=r.name, tenant=r.tenant, models=list(r.models), admin=r.admin,
                         state=r.state(now), created_at=r.created_at, expires_at=r.expires_at or 0.0,
                         revoked_at=r.revoked_at or 0.0)


def _forwarded(context: grpc.aio.ServicerContext) -> bool:
    return any(k == FORWARDED for k, _ in (context.invocation_metadata() or ()))


async def _committed(raft: Any, command: bytes) -> str:
    """Propose and return the state machine's sentence; a refusal becomes InvalidInput."""
    result = await raft.propose(command)
    if not getattr(result, "ok", False):
        raise InvalidInput(getattr(result, "message", "refused by the state machine"))
    return result.message


class SecurityService(pb_grpc.SecurityServicer):
    def __init__(self, *, node_id: str, raft: Any, state: ClusterState, channels: ChannelPool, ca_pin: str,
                 clock: Callable[[], float] = time.time,
                 random_bytes: Callable[[int], bytes] = secrets.token_bytes,
                 ca: CertificateAuthority | None = None):
        self.node_id = node_id
        self.raft: RaftView = raft
        self.state = state
        self.channels = channels
        self.ca_pin = ca_pin
        self.ca = ca  # with its key on signers: they renew hosts' certificates
        self.clock = clock
        self.random_bytes = random_bytes

    async def _on_leader(self, method: str, request: Any, context: grpc.aio.ServicerContext,
                         local: Callable[[], Awaitable[Any]]) -> Any:
        try:
            if self.raft.is_leader:
                return await local()
            if _forwarded(context) or not self.raft.leader_address:
                raise NotAvailable("no leader elected yet" if not self.raft.leader_address
                                   else "leadership changed while the call was forwarded; retry")
            try:  # the leader judges the original caller: its bearer token travels, a certificate is redirected
                metadata = forward_metadata(self.node_id, FORWARDED, self.raft.leader_address,
                                            f"the leader ({self.raft.leader_id})")
            except Redirect as r:
                await redirect(context, r)
            stub = pb_grpc.SecurityStub(self.channels.get(self.raft.leader_address))
            try:
                return await getattr(stub, method)(request, timeout=FORWARD_TIMEOUT, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")
        except AgentdError as exc:
            await context.abort(status_for(exc), str(exc))

    # ------------------------------------------------------------ join tokens

    async def CreateJoinToken(self, request, context):
        async def local():
            now = self.clock()
            if not request.node_name and not request.any_node:
                raise InvalidInput("a join token is bound to the host name it is for: give it "
                                   "('agentd token create --node NAME'); a token any host may use needs --any-node")
            node_name = check_name(request.node_name) if request.node_name else None
            if request.needs_approval and not node_name:
                raise InvalidInput("a token whose host needs approval must be bound to that host (--node NAME)")
            token, record = tokens.create_join_token(
                self.ca_pin, now=now, ttl=request.ttl_seconds or tokens.DEFAULT_TTL,
                description=request.description[:200], node_name=node_name, random_bytes=self.random_bytes)
            if request.needs_approval:  # held before the token exists: the host never gets work unapproved
                await _committed(self.raft, node_hold_command(node_name))
            await _committed(self.raft, token_add_command(record))
            log.info("join token created", extra=fields(token=record.id, expires_at=record.expires_at,
                                                        node_name=node_name or "", held=request.needs_approval))
            return pb.CreateJoinTokenReply(token=token, info=token_info(record, now))
        return await self._on_leader("CreateJoinToken", request, context, local)

    async def ListJoinTokens(self, request, context):
        async def local():
            now = self.clock()
            rows = sorted(self.state.join_tokens.values(), key=lambda r: (r.created_at, r.id))
            return pb.ListJoinTokensReply(tokens=[token_info(r, now) for r in rows])
        return await self._on_leader("ListJoinTokens", request, context, local)

    async def RevokeJoinToken(self, request, context):
        async def local():
            message = await _committed(self.raft, token_revoke_command(request.id))
            log.info(message, extra=fields(token=request.id))
            return pb.RevokeJoinTokenReply(message=message)
        return await self._on_leader("RevokeJoinToken", request, context, local)

    async def ConsumeJoinToken(self, request, context):
        async def local():
            ok, reason = await self.consume(request.token_id, request.secret_hash, request.node_name)
            return pb.ConsumeJoinTokenReply(ok=ok, reason=reason)
        return await self._on_leader("ConsumeJoinToken", request, context, local)

    async def consume(self, token_id: str, secret_hash: str, node_name: str) -> tuple[bool, str]:
        """On the leader: mark the token used through the log; (accepted, the state machine's sentence)."""
        result = await self.raft.propose(token_consume_command(token_id, secret_hash, node_name, self.clock()))
        return bool(result.ok), result.message

    # ------------------------------------------------------------ API keys

    async def CreateApiKey(self, request, context):
        async def local():
            now = self.clock()
            key, record = apikeys.new_api_key(
                tenant=request.tenant, models=list(request.models), name=request.name, admin=request.admin,
                ttl=request.ttl_seconds or None, now=now, random_bytes=self.random_bytes)
            await _committed(self.raft, key_add_command(record))
            log.info("API key created", extra=fields(key=record.id, tenant=record.tenant, admin=record.admin))
            return pb.CreateApiKeyReply(key=key, info=key_info(record, now))
        return await self._on_leader("CreateApiKey", request, context, local)

    async def ListApiKeys(self, request, context):
        async def local():
            now = self.clock()
            return pb.ListApiKeysReply(keys=[key_info(r, now) for r in apikeys.list_keys(self.state.api_keys)])
        return await self._on_leader("ListApiKeys", request, context, local)

    async def RevokeApiKey(self, request, context):
        async def local():
            now = self.clock()
            await _committed(self.raft, key_revoke_command(request.id, now))
            index = self.raft.last_applied
            lagging = await self.wait_applied_everywhere(index)
            record = self.state.api_keys[request.id]
            log.info("API key revoked", extra=fields(key=record.id, tenant=record.tenant, index=index,
                                                     lagging=lagging))
            return pb.RevokeApiKeyReply(info=key_info(record, now), index=index, lagging=lagging)
        return await self._on_leader("RevokeApiKey", request, context, local)

    # ------------------------------------------------------------ certificates

    async def RevokeCertificate(self, request, context):
        async def local():
            name = check_name(request.name)
            if name == self.node_id:
                raise InvalidInput(f"{name!r} is the leader: move leadership first ('agentd nodes' shows the "
                                   "members; stop or drain this agent), then revoke its certificate")
            message = await _committed(self.raft, cert_revoke_command(name, self.clock()))
            index = self.raft.last_applied
            removed = False
            if name in self.raft.members:  # a revoked host is no member: it must not vote, nor be counted
                await self.raft.remove_member(name)
                removed = True
            lagging = await self.wait_applied_everywhere(index)
            log.warning("certificate revoked", extra=fields(name=name, index=index, removed=removed,
                                                            lagging=lagging))
            return pb.RevokeCertificateReply(message=message, index=index, lagging=lagging, removed=removed)
        return await self._on_leader("RevokeCertificate", request, context, local)

    async def ApproveNode(self, request, context):
        async def local():
            name = check_name(request.name)
            tenants = sorted({check_name(t, "tenant") for t in request.tenants})
            message = await _committed(self.raft, node_approve_command(name, tenants))
            log.info(message, extra=fields(node=name, tenants=tenants))
            return pb.ApproveNodeReply(message=message)
        return await self._on_leader("ApproveNode", request, context, local)

    async def RotateClusterSecret(self, request, context):
        async def local():
            result = await self.raft.propose(secret_rotate_command(apikeys.new_cluster_secret(self.random_bytes)))
            if not getattr(result, "ok", False):
                raise InvalidInput(getattr(result, "message", "refused by the state machine"))
            lagging = await self.wait_applied_everywhere(self.raft.last_applied)
            log.warning("cluster secret rotated", extra=fields(lagging=lagging))
            return pb.RotateClusterSecretReply(message=result.message, lagging=lagging,
                                               instances_on_old_secret=result.data.get("instances_on_old_secret", 0))
        return await self._on_leader("RotateClusterSecret", request, context, local)

    async def RenewCertificate(self, request, context):
        """A host asks for a fresh certificate for its own name, with its current (valid, unrevoked) one."""
        caller = current_caller()
        if caller is None or caller.kind != "cert" or caller.role != ROLE_NODE:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "only a host renews, with its own certificate")
        if self.ca is None or self.ca.key is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{NOT_A_SIGNER}: {self.node_id} does not hold the CA key")
        try:
            name = csr_node_name(request.csr_pem)
            if name != caller.name:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"the certificate of {caller.name!r} may renew only itself, not {name!r}")
            cert = sign_csr(self.ca, request.csr_pem, role=ROLE_NODE)
        except AgentdError as exc:
            await context.abort(status_for(exc), str(exc))
        log.info("renewed a host's certificate", extra=fields(node=name))
        return pb.RenewCertificateReply(cert_pem=cert, ca_pem=self.ca.cert_pem, signer=self.node_id)

    async def wait_applied_everywhere(self, index: int, timeout: float = CONFIRM_TIMEOUT) -> list[str]:
        """Wait until every member has applied `index`; returns those that did not within `timeout`.

        Each agent checks keys against its own copy of the state, so a
        revocation is in force on an agent exactly when it has applied it.
        Waiting here turns "committed" into "refused everywhere" for the
        caller (unreachable members excepted, and named).
        """
        members = {mid: getattr(m, "address", "") for mid, m in self.raft.members.items() if mid != self.node_id}

        async def confirm(address: str) -> bool:
            stub = cpb_grpc.ControlStub(self.channels.get(address))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    reply = await stub.Status(cpb.StatusRequest(), timeout=max(0.05, deadline - time.monotonic()))
                    if reply.last_applied >= index:
                        return True
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.02)
            return False

        names = sorted(members)
        results = await asyncio.gather(*(confirm(members[n]) for n in names if members[n]))
        return [n for n, ok in zip([n for n in names if members[n]], results, strict=True) if not ok]


class JoinService(pb_grpc.JoinServicer):
    """Answers `agentd join`: a host with a valid join token gets a node certificate."""

    def __init__(self, *, node_id: str, raft: Any, state: ClusterState, channels: ChannelPool,
                 ca: CertificateAuthority, security: SecurityService,
                 clock: Callable[[], float] = time.time):
        self.node_id = node_id
        self.raft: RaftView = raft
        self.state = state
        self.channels = channels
        self.ca = ca
        self.security = security
        self.clock = clock

    @property
    def signer(self) -> bool:
        return self.ca.key is not None

    async def Join(self, request, context):
        try:
            name = csr_node_name(request.csr_pem)
            secret_hash = tokens.hash_secret(request.token_id, request.secret)
            if request.token_id in self.state.join_tokens:  # unknown here may be newer than our copy
                decision = tokens.check_token(self.state.join_tokens, request.token_id, secret_hash,
                                              now=self.clock(), node_name=name)
                if not decision.ok:
                    log.warning("refused a join", extra=fields(node=name, reason=decision.reason))
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, decision.reason)
            if not self.signer:
                if _forwarded(context):
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                        f"{NOT_A_SIGNER}: {self.node_id} does not hold the CA key")
                return await self._forward(request, context)
            return await self._sign(request, context, name, secret_hash)
        except AgentdError as exc:
            await context.abort(status_for(exc), str(exc))

    async def _sign(self, request, context, name: str, secret_hash: str) -> pb.JoinReply:
        now = self.clock()
        if name in self.raft.members or name in self.state.revoked_certs:
            # A certificate for a member's (or a revoked) name would let its holder speak as that member.
            # Re-issuing one (a host that lost its disk) takes a token made for that name on purpose.
            record = self.state.join_tokens.get(request.token_id)
            if record is None or record.node_name != name:
                reason = (f"{name!r} is already a member of the cluster: to give it a new certificate, create a "
                          f"token bound to it ('agentd token create --node-name {name}')")
                log.warning("refused a join", extra=fields(node=name, reason=reason))
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)
        cert = sign_csr(self.ca, request.csr_pem, role=ROLE_NODE)  # a bad request fails before the token is spent
        if self.raft.is_leader:
            ok, reason = await self.security.consume(request.token_id, secret_hash, name)
        elif self.raft.leader_address:
            stub = pb_grpc.SecurityStub(self.channels.get(self.raft.leader_address))
            try:
                reply = await stub.ConsumeJoinToken(pb.ConsumeJoinTokenRequest(
                    token_id=request.token_id, secret_hash=secret_hash, node_name=name), timeout=FORWARD_TIMEOUT)
            except grpc.aio.AioRpcError as exc:
                raise NotAvailable(f"cannot reach the leader to use the join token: {exc.details()}") from None
            ok, reason = reply.ok, reply.reason
        else:
            raise NotAvailable("no leader elected yet; retry the join")
        if not ok:
            log.warning("refused a join", extra=fields(node=name, reason=reason))
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
        log.info("signed a node certificate for a joining host",
                 extra=fields(node=name, token=request.token_id, at=now))
        return pb.JoinReply(cert_pem=cert, ca_pem=self.ca.cert_pem, peers=self._peers(), signer=self.node_id)

    def _peers(self) -> list[str]:
        return [m.address for _, m in sorted(self.raft.members.items()) if getattr(m, "address", "")]

    def _signer_candidates(self) -> Iterable[str]:
        seen = set()
        order = [self.raft.leader_address or "", *self._peers()]
        own = getattr(self.raft.members.get(self.node_id), "address", None)
        for address in order:
            if address and address not in seen and address != own:
                seen.add(address)
                yield address

    async def _forward(self, request, context) -> pb.JoinReply:
        last = "no other agent is known"
        for address in self._signer_candidates():
            stub = pb_grpc.JoinStub(self.channels.get(address))
            try:
                return await stub.Join(request, timeout=FORWARD_TIMEOUT, metadata=((FORWARDED, self.node_id),))
            except grpc.aio.AioRpcError as exc:
                not_signer = exc.code() == grpc.StatusCode.FAILED_PRECONDITION and NOT_A_SIGNER in (exc.details() or "")
                if not_signer or exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    last = f"{address}: {exc.details()}"
                    continue
                await context.abort(exc.code(), exc.details() or "")
        raise NotAvailable(f"no agent holding the CA key (a signer) answered the join ({last}); "
                           "join through the host where 'agentd init-ca' ran")


def add_security_services(server: grpc.aio.Server, security: SecurityService, join: JoinService) -> None:
    """Register Security and Join, parsing requests ourselves: garbage gets INVALID_ARGUMENT with a sentence
    (Join is open to anyone, so it sees the most garbage)."""
    for service, servicer in (("Security", security), ("Join", join)):
        desc = pb.DESCRIPTOR.services_by_name[service]
        handlers = {}
        for method in desc.methods:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _parsed(getattr(servicer, method.name), getattr(pb, method.input_type.name), method.full_name),
                response_serializer=getattr(pb, method.output_type.name).SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(desc.full_name, handlers),))


def _parsed(behavior: Callable[..., Awaitable[Any]], request_cls: Any, method: str) -> Any:
    async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            request = request_cls.FromString(raw)
        except (DecodeError, ValueError, TypeError):
            log.warning("garbage request refused", extra=fields(method=method, size=len(raw), peer=context.peer()))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{method}: the request ({len(raw)} bytes) is not a valid "
                                f"{request_cls.DESCRIPTOR.full_name} message")
        return await behavior(request, context)
    return handler
