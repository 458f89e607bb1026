"""The joining host's side of `agentd join --token` (and `agentd serve --join ADDR --token TOKEN`).

1. Parse the token, make a key pair and a certificate request locally
   (agentd.security.join.prepare_join): the private key never leaves the host.
2. Fetch the cluster CA from the agent over TLS it does not trust yet, and
   accept it only if its public key hashes to the pin inside the token
   (agentd.security.tls.fetch_pinned_ca).
3. Call `agentd.v1.Join` over TLS that trusts only that CA; the signer
   consumes the token through the Raft log and returns a node certificate.
4. Write `node.key` (0600), `node.crt` and `ca.crt` into `tls_dir` and check
   that they load as one identity.

The address may be the agent's token port or its gRPC port: the token port
is the one that accepts callers without a certificate, so when the address
given refuses us, the next port (the default token port) is tried.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from agentd.errors import AgentdError, InvalidInput, NotAvailable, PeerError
from agentd.logs import fields
from agentd.security.ca import (
    CA_CERT,
    ca_fingerprint,
    split_addresses,
    verify_issued,
    write_private,
    write_public,
)
from agentd.security.channel import channel_options
from agentd.security.join import prepare_join
from agentd.security.tls import fetch_pinned_ca, load_identity
from agentd.v1 import security_pb2 as pb
from agentd.v1 import security_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

JOIN_TIMEOUT = 30.0


@dataclass(frozen=True)
class JoinResult:
    node_name: str
    tls_dir: Path
    peers: tuple[str, ...]  # members' gRPC addresses: where the Raft join goes
    signer: str
    via: str  # the address that answered
    ca_pin: str


def node_addresses(settings, extra: Iterable[str] = ()) -> list[str]:
    """Names and addresses for this host's certificate: what peers and admins may dial it by.

    Wildcards are left out, and so is a detected host name that is not a valid
    DNS name (e.g. with '_'), which would otherwise make the request invalid.
    """
    extra = list(extra)
    split_addresses(extra)  # what the operator named must be valid; what we guessed is dropped if not
    out = []
    for raw in [*extra, settings.advertise_address, settings.listen, socket.getfqdn()]:
        host = raw.strip()
        if host.startswith("["):
            host = host[1:].split("]", 1)[0]
        elif host.count(":") == 1:
            host = host.rsplit(":", 1)[0]
        if not host or host in ("0.0.0.0", "::", "*"):
            continue
        try:
            split_addresses([host])
        except InvalidInput:
            continue
        out.append(host)
    return list(dict.fromkeys(out))


def token_port_candidates(address: str) -> list[str]:
    """`address` itself, then the same host on the next port (the default token port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InvalidInput(f"{address!r} is not HOST:PORT", where="--server")
    out = [address]
    if int(port) < 65535:
        out.append(f"{host}:{int(port) + 1}")
    return out


def join_cluster(token_text: str, servers: Iterable[str], *, tls_dir: Path, node_name: str,
                 addresses: Iterable[str] = (), force: bool = False, timeout: float = JOIN_TIMEOUT) -> JoinResult:
    """Get this host's node certificate with a join token; raises with the signer's sentence when refused."""
    tls_dir = Path(tls_dir)
    if (tls_dir / "node.crt").exists() and not force:
        raise InvalidInput(f"{tls_dir / 'node.crt'} already exists: this host has joined already "
                           "(remove it, or pass --force, to join again)")
    prepared = prepare_join(token_text, node_name, addresses)
    candidates = [c for s in servers for c in token_port_candidates(s)]
    if not candidates:
        raise InvalidInput("no address to join through: give an agent's address with --server (or --join)")
    failures: list[str] = []
    for address in dict.fromkeys(candidates):
        try:
            ca_pem = fetch_pinned_ca(address, prepared.token.ca_pin, timeout=min(timeout, 10.0))
        except NotAvailable as exc:
            failures.append(str(exc))
            continue
        try:
            reply = _call_join(address, ca_pem, prepared, timeout)
        except _Unreachable as exc:
            failures.append(f"{address}: {exc}")
            continue
        return _store(reply, prepared.key_pem, tls_dir, node_name, address, prepared.token.ca_pin)
    raise NotAvailable("could not reach an agent to join through: " + "; ".join(failures))


class _Unreachable(Exception):
    pass


def _call_join(address: str, ca_pem: bytes, prepared, timeout: float) -> pb.JoinReply:
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    with grpc.secure_channel(address, creds, options=channel_options()) as channel:
        stub = pb_grpc.JoinStub(channel)
        request = pb.JoinRequest(token_id=prepared.token.id, secret=prepared.token.secret,
                                 csr_pem=prepared.csr_pem)
        try:
            return stub.Join(request, timeout=timeout)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise _Unreachable(details) from None
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                        grpc.StatusCode.INVALID_ARGUMENT):
                raise InvalidInput(f"join refused by {address}: {details}") from None
            raise AgentdError(f"join through {address} failed: {code.name}: {details}") from None


def _store(reply: pb.JoinReply, key_pem: bytes, tls_dir: Path, node_name: str, address: str,
           pin: str) -> JoinResult:
    from cryptography import x509

    try:
        ca = x509.load_pem_x509_certificate(reply.ca_pem)
        cert = x509.load_pem_x509_certificate(reply.cert_pem)
    except ValueError as exc:
        raise PeerError(f"{address} answered with a malformed certificate: {exc}") from None
    if ca_fingerprint(ca) != pin:
        raise PeerError(f"{address} answered with a CA that does not match the token's pin")
    verify_issued(ca, cert)
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(tls_dir / "node.key", key_pem)
    write_public(tls_dir / "node.crt", reply.cert_pem)
    write_public(tls_dir / CA_CERT, reply.ca_pem)
    identity = load_identity(tls_dir, "node")  # the files belong together, or this names the one that does not
    if identity.name != node_name:
        raise PeerError(f"{address} signed a certificate for {identity.name!r}, not {node_name!r}")
    log.debug("joined: node certificate written", extra=fields(node=node_name, tls_dir=str(tls_dir),
                                                             signer=reply.signer, via=address))
    return JoinResult(node_name=node_name, tls_dir=tls_dir, peers=tuple(reply.peers), signer=reply.signer,
                      via=address, ca_pin=pin)
