"""Who is calling a gRPC method, and may they?

The TLS layer proves a client certificate was signed by the cluster CA (or
that there is none). This module turns what the connection and the metadata
carry into a `Caller` with a role, and refuses a call whose role the method's
rule does not allow:

* `node`  — a member host's certificate: exactly what a host needs (its own
  Raft traffic, Join and Leave for itself, reports for its own host, logs of
  its own instances, the few host-to-host calls in `DEFAULT_RULES`), never an
  admin action. A node certificate of a host that is not a current member is
  refused everywhere but its own Raft Join;
* `admin` — an admin certificate, or an admin API key sent as `authorization: Bearer`;
* `user`  — a non-admin API key: good for the HTTP /v1/ entry point, not for gRPC;
* `anonymous` — neither: only the join handshake and health checks.

The node that acts judges the original caller. An agent that forwards a call
to the leader passes the caller's own bearer token along; the leader verifies
that token itself (`Caller.via` names the forwarder). A certificate cannot be
forwarded (its key stays with its owner), so an admin certificate caller on a
follower is redirected to the leader instead (`forward_metadata`).

Certificates are checked against the replicated revocation list on every call,
after the parse cache, and open streams of a revoked identity are closed.

The check runs inside the wrapped handler because gRPC only exposes the peer
certificate there (`context.auth_context()`), not to the interceptor itself.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from cryptography import x509
from google.protobuf.message import DecodeError

from agentd.logs import fields
from agentd.security.apikeys import Principal
from agentd.security.ca import ROLE_ADMIN, ROLE_NODE, cert_issued_at, cert_name, cert_role
from agentd.security.tls import warn_insecure
from agentd.v1 import raft_pb2

log = logging.getLogger(__name__)

ROLE_USER = "user"
ANONYMOUS = "anonymous"
INSECURE = "insecure"


@dataclass(frozen=True)
class Caller:
    kind: str  # "cert" | "token" | "anonymous" | "insecure"
    name: str
    role: str  # node | admin | user | anonymous; "admin" in insecure mode
    principal: Principal | None = None
    via: str = ""  # a token caller whose call a member forwarded: that member's name
    issued_at: float = 0.0  # a certificate's issue time (unix seconds), for the revocation list
    token: str = field(default="", repr=False, compare=False)  # a token caller's bearer token, to forward it

    def describe(self) -> str:
        who = f"{self.kind} {self.name!r} (role {self.role})" if self.name else f"{self.kind} caller"
        return f"{who} via {self.via!r}" if self.via else who


class Redirect(Exception):
    """The caller must call another agent itself (its certificate cannot be forwarded)."""

    def __init__(self, address: str, why: str):
        super().__init__(why)
        self.address = address


# Trailing metadata of a redirect: the address the client should call instead (agentd/api/client.py follows it).
REDIRECT_KEY = "x-agentd-redirect"


def forward_metadata(node_id: str, forwarded_key: str, target: str, target_name: str = "the leader",
                     caller: Caller | None = None) -> tuple[tuple[str, str], ...]:
    """The metadata for a call this agent makes on its caller's behalf, or `Redirect`.

    The agent that acts must judge the original caller, never the forwarder's
    certificate: a bearer token travels along and is verified again there; a
    certificate caller (its key never leaves it) is sent to `target` itself.
    Insecure clusters have no credentials and forward as before.
    """
    caller = caller if caller is not None else current_caller()
    if caller is None or caller.kind == INSECURE:
        return ((forwarded_key, node_id),)
    if caller.kind == "token" and caller.token:
        return ((forwarded_key, node_id), ("authorization", f"Bearer {caller.token}"))
    raise Redirect(target, f"{node_id} is not {target_name}: call {target_name} at {target} (a certificate is "
                           "judged by the agent that acts, never forwarded)")


@dataclass(frozen=True)
class MethodRule:
    """Methods whose full name starts with `prefix` may be called by these roles."""

    prefix: str
    roles: frozenset[str]


def rule(prefix: str, *roles: str) -> MethodRule:
    return MethodRule(prefix, frozenset(roles))


# First match wins; a method no rule names needs the admin role. docs/security.md ("Who may call what") has the
# same table with a reason per row; tests/test_security_roles.py checks that the two agree.
DEFAULT_RULES: tuple[MethodRule, ...] = (
    # A host's own Raft traffic: the sender (Send) and node_id (Join, Leave) must be its certificate's name.
    rule("/agentd.v1.Raft/Send", ROLE_NODE),
    rule("/agentd.v1.Raft/Join", ROLE_NODE),
    rule("/agentd.v1.Raft/Leave", ROLE_NODE),
    rule("/agentd.v1.Raft/", ROLE_NODE),  # any later Raft method: host-to-host only
    rule("/agentd.v1.Agent/Report", ROLE_NODE),  # its own host only
    # A voter relaying its hosts' reports to the leader: the leader also checks the caller is a current voter.
    rule("/agentd.v1.Agent/RelayReports", ROLE_NODE),
    rule("/agentd.v1.Agent/Logs", ROLE_NODE, ROLE_ADMIN),  # node: instances with a part on its host
    rule("/agentd.v1.Models/Remove", ROLE_ADMIN),  # agentd model rm
    rule("/agentd.v1.Models/", ROLE_NODE),  # copies of model files between hosts, by digest (docs/models.md)
    # Host-to-host reads the design needs: catching up (Status), the /v1/ proxy's routes (ListInstances).
    rule("/agentd.v1.Control/Status", ROLE_ADMIN, ROLE_NODE),
    rule("/agentd.v1.Control/Leader", ROLE_ADMIN, ROLE_NODE),
    rule("/agentd.v1.Control/ListInstances", ROLE_ADMIN, ROLE_NODE),
    # A follower asks the leader for a read point before it streams a backup; a member holds the whole state.
    rule("/agentd.v1.Control/Snapshot", ROLE_ADMIN, ROLE_NODE),
    rule("/agentd.v1.Control/Wake", ROLE_ADMIN, ROLE_NODE),  # a /v1/ proxy holding requests for an IDLE model
    rule("/agentd.v1.Control/", ROLE_ADMIN),
    rule("/agentd.v1.Security/ConsumeJoinToken", ROLE_NODE),  # a signer asking the leader, never a person
    rule("/agentd.v1.Security/RenewCertificate", ROLE_NODE),  # a host renewing its own certificate
    rule("/agentd.v1.Security/", ROLE_ADMIN),
    rule("/agentd.v1.Join/", ANONYMOUS, ROLE_NODE, ROLE_ADMIN),
    rule("/grpc.health.v1.Health/", ANONYMOUS, ROLE_USER, ROLE_NODE, ROLE_ADMIN),
    rule("/grpc.reflection.", ROLE_ADMIN),
)

# Methods a node that is not (yet) a member may call: the Raft join that makes it one.
NON_MEMBER_METHODS = frozenset({"/agentd.v1.Raft/Join"})
# A host the leader has just admitted often calls a follower before the follower applied its admission (a
# heartbeat and an apply behind). Such a caller is re-checked for up to MEMBER_GRACE seconds before it is
# refused as a stranger: refused, it would leave its voter for another one or the leader (1,048 and 1,463
# refusals in two 2,048-host joins). At most MEMBER_WAITERS calls wait at once; more are refused at once.
MEMBER_GRACE = 1.0
MEMBER_WAITERS = 256
MEMBER_POLL = 0.05
# A new host names the index of its admission (the join reply's) on its Watch and ReportStream calls. A voter
# that has not applied that far waits until it has, up to MEMBER_CATCHUP seconds, and then for the grace.
# (With the grace alone, 413 to 590 relayed report streams were refused in each 2,048-host join.)
ADMITTED_METADATA = "x-agentd-admitted-index"
MEMBER_CATCHUP = 10.0


def admitted_metadata(index: int) -> tuple[tuple[str, str], ...] | None:
    """The call metadata that names a host's admission index (None for 0: nothing to name)."""
    return ((ADMITTED_METADATA, str(index)),) if index > 0 else None


def _admitted_index(metadata: Sequence[tuple[str, Any]] | None) -> int:
    for key, value in metadata or ():
        if key == ADMITTED_METADATA:
            try:
                return max(0, int(value))
            except (TypeError, ValueError):
                return 0
    return 0

_current: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("agentd_caller", default=None)


def current_caller() -> Caller | None:
    """The authenticated caller of the RPC being handled (set by AuthInterceptor)."""
    return _current.get()


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


CERT_CACHE_SIZE = 1024


def cert_caller(pem: bytes, cert_cache: dict[bytes, Caller] | None = None) -> Caller:
    """Who a verified peer certificate names. `cert_cache` maps a PEM to its caller: peers send many RPCs with
    one certificate, and parsing it costs tens of microseconds. The cache holds only what the certificate says;
    revocation is checked on every call by the interceptor, after it."""
    if cert_cache is not None and pem in cert_cache:
        return cert_cache[pem]
    # The TLS handshake already verified the chain to the cluster CA; we only read what it signed.
    cert = x509.load_pem_x509_certificate(pem)
    caller = Caller("cert", cert_name(cert), cert_role(cert) or ANONYMOUS, issued_at=cert_issued_at(cert))
    if cert_cache is not None:
        if len(cert_cache) >= CERT_CACHE_SIZE:
            cert_cache.pop(next(iter(cert_cache)))
        cert_cache[pem] = caller
    return caller


def identify(auth_context: Mapping[str, Sequence[bytes]], metadata: Iterable[tuple[str, Any]] | None,
             verify_bearer: Callable[[str], Principal | None],
             cert_cache: dict[bytes, Caller] | None = None) -> Caller | None:
    """The caller, or None when a bearer token was sent but is not valid (never silently anonymous).

    A node certificate that carries a bearer token is a member forwarding its
    caller's call: the caller is the token's owner (`via` the member), so the
    agent that acts judges the original caller, never the forwarder.
    """
    pems = auth_context.get("x509_pem_cert") or []
    peer = cert_caller(pems[0], cert_cache) if pems else None
    token = bearer_token(metadata)
    if peer is not None and (token is None or peer.role != ROLE_NODE):
        return peer
    if token is not None:
        principal = verify_bearer(token)
        if principal is None:
            return None
        return Caller("token", principal.key_id, ROLE_ADMIN if principal.admin else ROLE_USER, principal,
                      via=peer.name if peer is not None else "", token=token)
    return Caller(ANONYMOUS, "", ANONYMOUS)


def _reset(token: contextvars.Token) -> None:
    try:
        _current.reset(token)
    except ValueError:  # a stream closed from another context (e.g. by cancellation); its task ends anyway
        pass


# Reads the node name a request claims to come from (None: cannot tell; the handler refuses garbage itself).
Claim = Callable[[Any], "str | None"]


def message_claim(message_cls: Any, field_name: str) -> Claim:
    """A claim read from a request, raw bytes or already parsed."""
    def claimed(request: Any) -> str | None:
        if isinstance(request, message_cls):
            return getattr(request, field_name)
        if isinstance(request, bytes):
            try:
                return getattr(message_cls.FromString(request), field_name)
            except (DecodeError, ValueError):
                return None  # the handler answers garbage itself
        return None
    return claimed


# Claims checked whatever bindings the daemon passes: a watcher streams the state under its own name only.
BUILTIN_BINDINGS: dict[str, Claim] = {"/agentd.v1.Raft/Watch": message_claim(raft_pb2.RaftWatchRequest, "node_id")}


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authorize every RPC by its method's rule before the handler runs.

    `bindings` ties a node's certificate to what it says about itself: for
    the methods named, a caller with a certificate may only send requests
    that claim its own certificate name (a peer certified as "b" cannot send
    Raft messages, or inventory reports, as "a"). On a client stream the
    first message is checked; the service keeps a stream to one sender.
    """

    def __init__(self, verify_bearer: Callable[[str], Principal | None], *,
                 rules: Sequence[MethodRule] = DEFAULT_RULES, insecure: bool = False,
                 bindings: Mapping[str, Claim] | None = None,
                 revoked: Callable[[str, float], str] | None = None,
                 is_member: Callable[[str], bool | None] | None = None, member_grace: float = MEMBER_GRACE,
                 applied: Callable[[], int] | None = None, member_catchup: float = MEMBER_CATCHUP):
        """`revoked(name, issued_at)` says why a certificate is revoked ("" when it is not);
        `is_member(name)` is True / False, or None while this agent is in no cluster yet (a new host learns
        the members from the log the leader sends it, so it cannot refuse that leader); a node that is not
        a member is asked again for `member_grace` seconds before it is refused; when it names its
        admission index (ADMITTED_METADATA), first until this agent has `applied` that far (at most
        `member_catchup` seconds)."""
        self._verify = verify_bearer
        self._rules = tuple(rules)
        self._insecure = insecure
        self._bindings = {**BUILTIN_BINDINGS, **dict(bindings or {})}
        self._revoked = revoked or (lambda name, issued_at: "")
        self._is_member = is_member or (lambda name: True)
        self._member_grace = member_grace
        self._applied = applied
        self._member_catchup = member_catchup
        self._member_waiters = 0
        self._cert_cache: dict[bytes, Caller] = {}
        self._open: dict[asyncio.Task, Caller] = {}  # streaming calls in progress, to close on revocation
        self._closing: set[asyncio.Task] = set()
        if insecure:
            warn_insecure(log)

    @property
    def rules(self) -> tuple[MethodRule, ...]:
        return self._rules

    def refusal(self, caller: Caller) -> str:
        """Why this caller's credential no longer counts ("" while it does): a revoked certificate or key."""
        if caller.kind == "cert":
            return self._revoked(caller.name, caller.issued_at)
        if caller.kind == "token" and caller.token and self._verify(caller.token) is None:
            return f"API key {caller.name} was revoked or expired"
        return ""

    def close_revoked(self) -> int:
        """Close the open streams of every caller whose credential was revoked; returns how many."""
        closed = 0
        for task, caller in list(self._open.items()):
            if task not in self._closing and not task.done() and self.refusal(caller):
                self._closing.add(task)
                task.cancel()
                closed += 1
        if closed:
            log.warning("closed the open streams of revoked credentials", extra=fields(count=closed))
        return closed

    def roles_for(self, method: str) -> frozenset[str]:
        for r in self._rules:
            if method.startswith(r.prefix):
                return r.roles
        return frozenset({ROLE_ADMIN})

    async def authorize(self, method: str, context: grpc.aio.ServicerContext) -> Caller:
        """The caller, or abort with UNAUTHENTICATED / PERMISSION_DENIED and a sentence saying why."""
        if self._insecure:
            return Caller(INSECURE, "", ROLE_ADMIN)
        auth_context = context.auth_context()
        pems = auth_context.get("x509_pem_cert") or []
        if pems:  # the peer's own certificate, whatever it carries: revoked, or a host outside the cluster
            peer = cert_caller(pems[0], self._cert_cache)
            if why := self._revoked(peer.name, peer.issued_at):
                log.warning("refused a call with a revoked certificate", extra=fields(method=method,
                                                                                      caller=peer.name))
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
            admitted = _admitted_index(context.invocation_metadata())
            if (peer.role == ROLE_NODE and method not in NON_MEMBER_METHODS
                    and not await self._member_within_grace(peer.name, admitted)):
                log.warning("refused a call from a host that is not a member", extra=fields(
                    method=method, caller=peer.name, admitted=admitted,
                    applied=self._applied() if self._applied is not None else None, waiting=self._member_waiters))
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"{peer.name!r} is not a member of this cluster: its certificate is refused")
        caller = identify(auth_context, context.invocation_metadata(), self._verify, self._cert_cache)
        if caller is None:
            log.warning("refused a call with an invalid or revoked bearer token", extra=fields(method=method))
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "the bearer token is invalid, expired or revoked")
        allowed = self.roles_for(method)
        if caller.role in allowed:
            return caller
        if caller.role == ANONYMOUS:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"{method} needs a client certificate or an admin bearer token")
        log.warning("refused a call: role not allowed", extra=fields(method=method, caller=caller.describe()))
        await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                            f"{caller.describe()} may not call {method} (needs role {' or '.join(sorted(allowed))})")
        raise AssertionError("unreachable: abort raises")

    async def _member_within_grace(self, name: str, admitted: int = 0) -> bool:
        """Whether `name` is a member (or this agent is in no cluster yet), now or within the grace; a caller
        that names its `admitted` index is waited for until this agent has applied that far (at most the
        catch-up), and the grace runs from then."""
        if self._is_member(name) is not False:
            return True
        if self._member_waiters >= MEMBER_WAITERS:
            return False
        self._member_waiters += 1
        try:
            loop = asyncio.get_running_loop()
            behind = admitted > 0 and self._applied is not None and self._applied() < admitted
            deadline = loop.time() + (self._member_catchup if behind else self._member_grace)
            while loop.time() < deadline:
                await asyncio.sleep(MEMBER_POLL)
                if self._is_member(name) is not False:
                    return True
                if behind and self._applied() >= admitted:
                    behind, deadline = False, min(deadline, loop.time() + self._member_grace)
            return False
        finally:
            self._member_waiters -= 1

    async def _watched(self, caller: Caller, context: grpc.aio.ServicerContext, run: Callable[[], Any]) -> Any:
        """Run a streaming call, registered so that a revocation of its caller closes it."""
        task = asyncio.current_task()
        if task is None:
            return await run()
        self._open[task] = caller
        try:
            return await run()
        except asyncio.CancelledError:
            if task in self._closing:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                    f"{self.refusal(caller) or 'revoked'}: the stream of {caller.describe()} "
                                    "is closed")
            raise
        finally:
            self._open.pop(task, None)
            self._closing.discard(task)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return self._wrap(handler, handler_call_details.method)

    async def _check_claim(self, method: str, caller: Caller, request: Any,
                           context: grpc.aio.ServicerContext) -> None:
        claim = self._bindings.get(method)
        if claim is None or caller.kind != "cert" or caller.role != ROLE_NODE:
            return
        claimed = claim(request)
        if claimed is not None and claimed != caller.name:
            log.warning("refused a request claiming another node", extra=fields(method=method, caller=caller.name,
                                                                                claimed=claimed))
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"the certificate of {caller.name!r} may not speak for {claimed!r} ({method})")

    def _bound_stream(self, method: str, caller: Caller, requests: Any, context: grpc.aio.ServicerContext) -> Any:
        async def checked():
            first = True
            async for item in requests:
                if first:
                    await self._check_claim(method, caller, item, context)
                    first = False
                yield item
        return checked()

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        authorize = self.authorize
        kw = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
        bound = method in self._bindings

        async def unary(request_or_iterator, context):
            caller = await authorize(method, context)
            token = _current.set(caller)
            try:
                if handler.unary_unary:
                    if bound:
                        await self._check_claim(method, caller, request_or_iterator, context)
                    return await handler.unary_unary(request_or_iterator, context)
                if bound:
                    request_or_iterator = self._bound_stream(method, caller, request_or_iterator, context)
                return await self._watched(caller, context,
                                           lambda: handler.stream_unary(request_or_iterator, context))
            finally:
                _reset(token)

        async def streaming(request_or_iterator, context):
            caller = await authorize(method, context)
            if bound and handler.unary_stream:
                await self._check_claim(method, caller, request_or_iterator, context)
            token = _current.set(caller)
            task = asyncio.current_task()
            if task is not None:
                self._open[task] = caller
            try:
                inner = handler.unary_stream or handler.stream_stream
                result = inner(request_or_iterator, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:  # a handler that writes with context.write()
                    await result
            except asyncio.CancelledError:
                if task is not None and task in self._closing:
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                        f"{self.refusal(caller) or 'revoked'}: the stream of {caller.describe()} "
                                        "is closed")
                raise
            finally:
                if task is not None:
                    self._open.pop(task, None)
                    self._closing.discard(task)
                _reset(token)

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary, **kw)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(unary, **kw)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(streaming, **kw)
        return grpc.stream_stream_rpc_method_handler(streaming, **kw)
