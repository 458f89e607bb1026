"""A small synchronous Control client for the CLI and scripts.

gRPC status codes become agentd errors, so the CLI's exit codes follow:
INVALID_ARGUMENT / NOT_FOUND / ALREADY_EXISTS -> InvalidInput (2),
FAILED_PRECONDITION (cannot be placed) and UNAVAILABLE -> exit 3.

`ControlClient.for_cli` finds the caller's credentials the way the CLI
does (docs/security.md, "The CLI against a secure cluster"), first match wins:

1. the `insecure` setting (AGENTD_INSECURE=1): plaintext, for --insecure clusters;
2. AGENTD_TOKEN: an admin API key sent as a bearer token over TLS to the
   agent's token port, trusting the `ca.crt` found as below;
3. an admin certificate (`admin.crt`, `admin.key`, `ca.crt`) in `tls_dir`
   (AGENTD_TLS_DIR) or ~/.config/agentd/tls: mutual TLS on `listen`;
4. otherwise plaintext, which only an --insecure cluster answers.

A host's own node certificate is never used: it authorizes no admin action
(docs/security.md). An operator on a GPU host uses an admin certificate or an
admin key like anyone else.

An agent that is not the leader does not forward a certificate caller's
write (the leader must see the caller's own certificate): it answers with
the leader's address in trailing metadata, and the client calls there
(`REDIRECT_KEY`, at most `MAX_REDIRECTS` times per call).

Start-up time (issue 16: operators run `agentd ps` in loops): the admin
certificate's files go to gRPC as bytes, unparsed. Checking them first
(`agentd.security.tls.load_identity`: chain, validity, role, key) loads the
`cryptography` package, which cost more than the call itself; gRPC's own
handshake checks the same things. The check runs only when a call fails, so a
bad certificate, key or CA is still reported in the words of `load_identity`,
naming its file, rather than as the handshake's failure. Stubs are built per
method on first use, from the service descriptors, not for every method of
both services.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from agentd.errors import AgentdError, InvalidInput, NotAvailable
from agentd.security.channel import channel_credentials, channel_options
from agentd.v1 import control_pb2 as pb

DEFAULT_TIMEOUT = 60.0
REDIRECT_KEY = "x-agentd-redirect"  # agentd.security.auth.REDIRECT_KEY (not imported: CLI start-up time)
MAX_REDIRECTS = 3
# Nodes per ListNodes reply (ControlClient.nodes): 256 hosts with 8-GPU inventories are about 0.6 MB, far below
# gRPC's 4 MiB limit, and the leader builds one page between other work
NODES_PAGE = 256
USER_TLS_DIR = Path("~/.config/agentd/tls")
TLS_HINT = ("if the cluster runs with TLS, give this client credentials: an admin certificate in "
            "~/.config/agentd/tls or AGENTD_TLS_DIR, or AGENTD_TOKEN=<admin API key> with --server <token port>")


@dataclass(frozen=True)
class ClientAuth:
    """How a client authenticates: channel credentials (None = plaintext) and what to call it in messages."""

    credentials: grpc.ChannelCredentials | None = None
    options: tuple[tuple[str, Any], ...] = ()
    describe: str = "plaintext (--insecure clusters only)"
    token_port: bool = False  # bearer-token callers talk to the agent's token port
    # Raises the precise error for credentials that were handed to gRPC unchecked; run when a call fails.
    check: Callable[[], None] | None = None


def user_tls_dirs(settings: Any, environ: Mapping[str, str] | None = None) -> list[Path]:
    """Where the CLI looks for an admin certificate: `tls_dir` when set (AGENTD_TLS_DIR), ~/.config/agentd/tls."""
    env = os.environ if environ is None else environ
    dirs = [Path(settings.tls_dir).expanduser()] if settings.tls_dir else []
    home = env.get("HOME")
    if home:
        dirs.append(Path(home) / ".config" / "agentd" / "tls")
    return dirs


def _readable(*paths: Path) -> bool:
    return all(p.is_file() and os.access(p, os.R_OK) for p in paths)


def cli_auth(settings: Any, environ: Mapping[str, str] | None = None) -> ClientAuth:
    """The credentials the CLI uses against the cluster (see the module docstring for the order)."""
    env = os.environ if environ is None else environ
    if settings.insecure:
        return ClientAuth()
    # The credentials are built from the files' bytes (agentd.security.channel): agentd.security.tls would
    # check them first, which loads cryptography (~90 ms of a ~300 ms command; issue 16).
    options = tuple(channel_options())
    dirs = user_tls_dirs(settings, env)
    node_dir = Path(settings.tls_directory)
    token = env.get("AGENTD_TOKEN", "").strip()
    if token:
        for d in [*dirs, node_dir]:
            if _readable(d / "ca.crt"):
                creds = channel_credentials((d / "ca.crt").read_bytes(), bearer_token=token)
                return ClientAuth(creds, options, f"bearer token (CA from {d})", token_port=True)
        raise InvalidInput("AGENTD_TOKEN is set but no cluster CA certificate was found: copy the cluster's "
                           f"ca.crt into {dirs[-1] if dirs else USER_TLS_DIR} or point AGENTD_TLS_DIR at it")
    for d in dirs:
        if _readable(d / "admin.crt", d / "admin.key", d / "ca.crt"):
            _usable_by_grpc(d)
            creds = channel_credentials((d / "ca.crt").read_bytes(), key_pem=(d / "admin.key").read_bytes(),
                                        cert_pem=(d / "admin.crt").read_bytes())
            return ClientAuth(creds, options, f"admin certificate from {d}", check=_identity_check(d))
    return ClientAuth()


def _usable_by_grpc(directory: Path) -> None:
    """Refuse, in load_identity's words, PEM files that gRPC cannot even load.

    gRPC takes any bytes, then fails each connection with lines of its own on stderr ("Invalid private
    key"). OpenSSL, through the stdlib `ssl` module that gRPC has loaded already, reads the files in about
    2 ms: the CA certificate, the certificate, and the key, which must be unencrypted and match the
    certificate. Whatever else is wrong (signature, validity, role) fails the handshake or the call, and
    `ClientAuth.check` words that.
    """
    import ssl

    def no_password() -> bytes:
        raise ValueError("the key is encrypted")  # never OpenSSL's interactive prompt

    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(directory / "ca.crt"))
        ctx.load_cert_chain(str(directory / "admin.crt"), str(directory / "admin.key"), password=no_password)
    except (ssl.SSLError, ValueError, OSError) as exc:
        _identity_check(directory)()  # raises the precise error
        raise InvalidInput(f"cannot use the admin certificate: {exc}", where=str(directory)) from None


def _identity_check(directory: Path) -> Callable[[], None]:
    """`load_identity(directory, "admin")`, the full check of an admin certificate directory, for later."""

    def check() -> None:
        from agentd.security.tls import load_identity

        load_identity(directory, "admin")

    return check


def _multicallable(channel: grpc.Channel, method: str) -> Any:
    """What the generated `ControlStub` / `SecurityStub` holds for `method`, built from the service descriptor.

    The generated stubs build a callable for every method of the service (and `security_pb2_grpc` imports
    `security_pb2`); a CLI command calls one or two.
    """
    service = pb.DESCRIPTOR.services_by_name["Control"]
    m = service.methods_by_name.get(method)
    if m is None:
        from agentd.v1 import security_pb2

        service = security_pb2.DESCRIPTOR.services_by_name["Security"]
        m = service.methods_by_name.get(method)
        if m is None:
            raise AttributeError(f"no method {method!r} in the Control or Security service")
    from google.protobuf.message_factory import GetMessageClass

    kind = f"{'stream' if m.client_streaming else 'unary'}_{'stream' if m.server_streaming else 'unary'}"
    return getattr(channel, kind)(f"/{service.full_name}/{method}",
                                  request_serializer=GetMessageClass(m.input_type).SerializeToString,
                                  response_deserializer=GetMessageClass(m.output_type).FromString,
                                  _registered_method=True)


class CannotPlace(NotAvailable):
    """The coordinator could not place the deployment; the message is its diagnosis."""


def error_from_rpc(exc: grpc.RpcError, address: str, plaintext: bool = False) -> AgentdError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
                grpc.StatusCode.OUT_OF_RANGE):
        return InvalidInput(details)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return CannotPlace(details)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        hint = f" ({TLS_HINT})" if plaintext and code == grpc.StatusCode.UNAVAILABLE else ""
        return NotAvailable(f"agent at {address} is not available: {details}{hint}")
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return InvalidInput(f"refused by {address}: {details}")
    return AgentdError(f"{address}: {code.name if code else 'error'}: {details}")


class ControlClient:
    """Control and Security calls to one agent. Plaintext unless `credentials` (or `auth`) say otherwise."""

    def __init__(self, address: str, timeout: float = DEFAULT_TIMEOUT,
                 credentials: grpc.ChannelCredentials | None = None, *, auth: ClientAuth | None = None):
        self.timeout = timeout
        self.auth = auth or ClientAuth(credentials, describe="given credentials" if credentials else "plaintext")
        self._connect(address)

    def _connect(self, address: str) -> None:
        self.address = address
        options = list(self.auth.options)
        self._channel = (grpc.secure_channel(address, self.auth.credentials, options=options)
                         if self.auth.credentials else grpc.insecure_channel(address, options=options))
        self._methods: dict[str, Any] = {}

    def _redirected(self, exc: grpc.RpcError) -> bool:
        """Follow an agent's "call the leader (or host) at ADDRESS" answer: reconnect there; False if none."""
        if not hasattr(exc, "trailing_metadata") or exc.code() != grpc.StatusCode.UNAVAILABLE:
            return False
        target = next((str(v) for k, v in (exc.trailing_metadata() or ()) if k == REDIRECT_KEY), "")
        if not target or target == self.address:
            return False
        self._channel.close()
        self._connect(target)
        return True

    @classmethod
    def for_cli(cls, server: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                environ: Mapping[str, str] | None = None) -> ControlClient:
        """The CLI's client: `server`, else AGENTD_SERVER, else this host's agent; credentials from the environment.

        The settings come from `client_settings`, which skips pydantic when it can (start-up time).
        """
        from agentd.clientconfig import client_settings

        env = os.environ if environ is None else environ
        settings = client_settings()
        auth = cli_auth(settings, env)
        address = server or env.get("AGENTD_SERVER") or (
            settings.token_listen_address if auth.token_port else settings.listen)
        return cls(address, timeout, auth=auth)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _method(self, method: str) -> Any:
        """The callable for `method` of the Control service, else of the Security service; built on first use."""
        if method not in self._methods:
            self._methods[method] = _multicallable(self._channel, method)
        return self._methods[method]

    def _error(self, exc: grpc.RpcError) -> AgentdError:
        """The error to raise for a failed call: the credentials' own problem first, if they have one."""
        if self.auth.check is not None:
            self.auth.check()  # raises what a bad certificate, key or CA deserves (load_identity's words)
        return error_from_rpc(exc, self.address, plaintext=self.auth.credentials is None)

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        for attempt in range(MAX_REDIRECTS + 1):
            try:
                return self._method(method)(request, timeout=timeout or self.timeout)
            except grpc.RpcError as exc:
                if attempt < MAX_REDIRECTS and self._redirected(exc):
                    continue
                raise self._error(exc) from None
        raise AssertionError("unreachable")

    def nodes(self, page: int = NODES_PAGE) -> list[Any]:
        """Every node (ListNodes), `page` at a time: a fleet's whole list outgrows gRPC's 4 MiB message limit.
        An agent from before paging answers all of them at once, with no token."""
        nodes: list[Any] = []
        token = ""
        while True:
            reply = self.call("ListNodes", pb.ListNodesRequest(limit=page, page_token=token))
            nodes.extend(reply.nodes)
            if not reply.next_page_token:
                return nodes
            if reply.next_page_token <= token:
                raise AgentdError(f"{self.address}: ListNodes paged backwards ({token!r}, then "
                                  f"{reply.next_page_token!r})")
            token = reply.next_page_token

    def stream(self, method: str, request: Any) -> Iterator[Any]:
        for attempt in range(MAX_REDIRECTS + 1):
            started = False
            try:
                for item in self._method(method)(request):
                    started = True
                    yield item
                return
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.CANCELLED:
                    return
                if not started and attempt < MAX_REDIRECTS and self._redirected(exc):
                    continue
                raise self._error(exc) from None

    # Convenience wrappers used by the CLI and tests.
    def deploy(self, spec: pb.DeploymentSpec, replace: bool = False) -> pb.DeployReply:
        return self.call("Deploy", pb.DeployRequest(spec=spec, replace=replace))

    def leader(self) -> pb.LeaderReply:
        return self.call("Leader", pb.LeaderRequest())

    def status(self) -> pb.StatusReply:
        return self.call("Status", pb.StatusRequest())
