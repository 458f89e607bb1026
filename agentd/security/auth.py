"""Who is calling a gRPC method, and may they?

The TLS layer proves a client certificate was signed by the cluster CA (or
that there is none). This module turns what the connection and the metadata
carry into a `Caller` with a role, and refuses a call whose role the method's
rule does not allow:

* `node`  — a peer host's certificate (Raft, Agent reports, forwarded Control calls);
* `admin` — an admin certificate, or an admin API key sent as `authorization: Bearer`;
* `user`  — a non-admin API key: good for the HTTP /v1/ entry point, not for gRPC;
* `anonymous` — neither: only the join handshake and health checks.

The check runs inside the wrapped handler because gRPC only exposes the peer
certificate there (`context.auth_context()`), not to the interceptor itself.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509

from agentd.logs import fields
from agentd.security.apikeys import Principal
from agentd.security.ca import ROLE_ADMIN, ROLE_NODE, cert_name, cert_role
from agentd.security.tls import warn_insecure

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

    def describe(self) -> str:
        return f"{self.kind} {self.name!r} (role {self.role})" if self.name else f"{self.kind} caller"


@dataclass(frozen=True)
class MethodRule:
    """Methods whose full name starts with `prefix` may be called by these roles."""

    prefix: str
    roles: frozenset[str]


def rule(prefix: str, *roles: str) -> MethodRule:
    return MethodRule(prefix, frozenset(roles))


# First match wins; a method no rule names needs the admin role.
DEFAULT_RULES: tuple[MethodRule, ...] = (
    # Nodes call Control too: a follower forwards a caller's call to the leader after checking that caller.
    rule("/agentd.v1.Control/", ROLE_ADMIN, ROLE_NODE),
    rule("/agentd.v1.Agent/", ROLE_NODE),
    rule("/agentd.v1.Raft/", ROLE_NODE),
    rule("/agentd.v1.Security/ConsumeJoinToken", ROLE_NODE),  # a signer asking the leader, never a person
    rule("/agentd.v1.Security/", ROLE_ADMIN, ROLE_NODE),
    rule("/agentd.v1.Join/", ANONYMOUS, ROLE_NODE, ROLE_ADMIN),
    rule("/grpc.health.v1.Health/", ANONYMOUS, ROLE_USER, ROLE_NODE, ROLE_ADMIN),
    rule("/grpc.reflection.", ROLE_ADMIN, ROLE_NODE),
)

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


def identify(auth_context: Mapping[str, Sequence[bytes]], metadata: Iterable[tuple[str, Any]] | None,
             verify_bearer: Callable[[str], Principal | None],
             cert_cache: dict[bytes, Caller] | None = None) -> Caller | None:
    """The caller, or None when a bearer token was sent but is not valid (never silently anonymous).

    `cert_cache` maps a peer's PEM to its caller: peers send many RPCs with one
    certificate, and parsing it costs tens of microseconds.
    """
    pems = auth_context.get("x509_pem_cert") or []
    if pems:
        pem = pems[0]
        if cert_cache is not None and pem in cert_cache:
            return cert_cache[pem]
        # The TLS handshake already verified the chain to the cluster CA; we only read what it signed.
        cert = x509.load_pem_x509_certificate(pem)
        caller = Caller("cert", cert_name(cert), cert_role(cert) or ANONYMOUS)
        if cert_cache is not None:
            if len(cert_cache) >= CERT_CACHE_SIZE:
                cert_cache.pop(next(iter(cert_cache)))
            cert_cache[pem] = caller
        return caller
    token = bearer_token(metadata)
    if token is not None:
        principal = verify_bearer(token)
        if principal is None:
            return None
        return Caller("token", principal.key_id, ROLE_ADMIN if principal.admin else ROLE_USER, principal)
    return Caller(ANONYMOUS, "", ANONYMOUS)


def _reset(token: contextvars.Token) -> None:
    try:
        _current.reset(token)
    except ValueError:  # a stream closed from another context (e.g. by cancellation); its task ends anyway
        pass


# Reads the node name a request claims to come from (None: cannot tell; the handler refuses garbage itself).
Claim = Callable[[Any], "str | None"]


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
                 bindings: Mapping[str, Claim] | None = None):
        self._verify = verify_bearer
        self._rules = tuple(rules)
        self._insecure = insecure
        self._bindings = dict(bindings or {})
        self._cert_cache: dict[bytes, Caller] = {}
        if insecure:
            warn_insecure(log)

    def roles_for(self, method: str) -> frozenset[str]:
        for r in self._rules:
            if method.startswith(r.prefix):
                return r.roles
        return frozenset({ROLE_ADMIN})

    async def authorize(self, method: str, context: grpc.aio.ServicerContext) -> Caller:
        """The caller, or abort with UNAUTHENTICATED / PERMISSION_DENIED and a sentence saying why."""
        if self._insecure:
            return Caller(INSECURE, "", ROLE_ADMIN)
        caller = identify(context.auth_context(), context.invocation_metadata(), self._verify, self._cert_cache)
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

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return self._wrap(handler, handler_call_details.method)

    async def _check_claim(self, method: str, caller: Caller, request: Any,
                           context: grpc.aio.ServicerContext) -> None:
        claim = self._bindings.get(method)
        if claim is None or caller.kind != "cert":
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
                return await handler.stream_unary(request_or_iterator, context)
            finally:
                _reset(token)

        async def streaming(request_or_iterator, context):
            token = _current.set(await authorize(method, context))
            try:
                inner = handler.unary_stream or handler.stream_stream
                result = inner(request_or_iterator, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:  # a handler that writes with context.write()
                    await result
            finally:
                _reset(token)

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary, **kw)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(unary, **kw)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(streaming, **kw)
        return grpc.stream_stream_rpc_method_handler(streaming, **kw)
