"""gRPC credentials for mutual TLS, built from a node's (or an admin's) certificate directory.

A directory holds `ca.crt`, `<name>.crt` and `<name>.key` (`node` for a host,
`admin` for an operator). Two server credentials exist because gRPC's Python
API can either require a client certificate or not ask for one at all; it
cannot ask and accept a refusal:

* `server_credentials` (the `listen` port) requires a certificate signed by
  the cluster CA: peers (Raft, Agent reports) and admins with a certificate.
* `token_server_credentials` (the `token_listen` port) is TLS without a client
  certificate, for callers that prove themselves in the request instead: a
  joining host (join token) and CLI users with an admin bearer token. The auth
  interceptor (agentd/security/auth.py) decides per method what each may call.

Both ports send the CA certificate after the node's, so a joining host can
fetch it and check it against the pin in its token (`fetch_pinned_ca`).
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agentd.errors import InvalidInput, NotAvailable, PeerError
from agentd.logs import fields
from agentd.security import channel
from agentd.security.ca import CA_CERT, ca_fingerprint, cert_name, cert_role, load_cert, verify_issued

log = logging.getLogger(__name__)

INSECURE_WARNING = ("running with --insecure: gRPC and HTTP traffic is unencrypted and unauthenticated; "
                    "anyone who can reach this host's ports controls the cluster and its models")


@dataclass(frozen=True)
class TlsIdentity:
    """One party's PEM material, checked to belong together when loaded."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    name: str
    role: str

    @property
    def chain_pem(self) -> bytes:
        """Leaf then CA: what servers send, so joiners can see the CA they pin."""
        return self.cert_pem.rstrip(b"\n") + b"\n" + self.ca_pem


def load_identity(directory: Path, name: str = "node", *, now: dt.datetime | None = None) -> TlsIdentity:
    """Load and check `ca.crt`, `<name>.crt`, `<name>.key`; every problem names its file."""
    directory = Path(directory)
    ca_path, cert_path, key_path = directory / CA_CERT, directory / f"{name}.crt", directory / f"{name}.key"
    for p in (ca_path, cert_path, key_path):
        if not p.is_file():
            raise NotAvailable(f"missing {p}: create certificates with 'agentd init-ca' (first host), "
                               "'agentd join --token' (other hosts) or 'agentd certs issue' (admins), "
                               "or run with --insecure")
    ca = load_cert(ca_path)
    cert = load_cert(cert_path)
    try:
        verify_issued(ca, cert, now)
    except InvalidInput as exc:
        raise InvalidInput(str(exc), where=str(cert_path)) from None
    role = cert_role(cert)
    if role is None:
        raise InvalidInput("the certificate carries no agentd role (agentd://role/...)", where=str(cert_path))
    key_pem = key_path.read_bytes()
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"not an unencrypted PEM private key: {exc}", where=str(key_path)) from None
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise InvalidInput(f"the key does not belong to {cert_path.name}", where=str(key_path))
    return TlsIdentity(ca_pem=ca_path.read_bytes(), cert_pem=cert_path.read_bytes(), key_pem=key_pem,
                       name=cert_name(cert), role=role)


def _spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def server_credentials(identity: TlsIdentity) -> grpc.ServerCredentials:
    """Mutual TLS: the handshake fails for a client without a certificate from the cluster CA."""
    return grpc.ssl_server_credentials([(identity.key_pem, identity.chain_pem)],
                                       root_certificates=identity.ca_pem, require_client_auth=True)


def token_server_credentials(identity: TlsIdentity) -> grpc.ServerCredentials:
    """TLS that asks for no client certificate: the caller authenticates inside the request."""
    return grpc.ssl_server_credentials([(identity.key_pem, identity.chain_pem)])


def channel_credentials(identity: TlsIdentity | None = None, *, ca_pem: bytes | None = None,
                        bearer_token: str | None = None) -> grpc.ChannelCredentials:
    """Client credentials: a certificate identity, or only the CA (plus a bearer token) for token callers."""
    root = identity.ca_pem if identity is not None else ca_pem
    if root is None:
        raise InvalidInput("a TLS channel needs the cluster CA certificate")
    return channel.channel_credentials(root, key_pem=identity.key_pem if identity is not None else None,
                                       cert_pem=identity.cert_pem if identity is not None else None,
                                       bearer_token=bearer_token)


def client_credentials_from_dir(directory: Path, name: str = "admin") -> grpc.ChannelCredentials:
    """Mutual-TLS client credentials from `<directory>/<name>.crt`, `<name>.key` and `ca.crt`."""
    return channel_credentials(load_identity(directory, name))


def warn_insecure(logger: logging.Logger | None = None) -> str:
    """Log (at warning) and return the sentence every insecure start must print."""
    (logger or log).warning(INSECURE_WARNING, extra=fields(insecure=True))
    return INSECURE_WARNING


# ---------------------------------------------------------------- trust on first use, by pin


def fetch_pinned_ca(address: str, pin: str, *, timeout: float = 10.0) -> bytes:
    """The cluster CA certificate (PEM) from the peer at `address`, accepted only if its key matches `pin`.

    The TLS handshake is made without verification because the joiner does not
    have the CA yet; what makes it safe is what follows: the CA must hash to the
    pin from the join token, and the peer's own certificate must be signed by it.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise InvalidInput(f"{address!r} is not HOST:PORT")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            chain = _unverified_chain(tls)
    except (OSError, ssl.SSLError) as exc:
        raise NotAvailable(f"cannot reach {address} over TLS to fetch the cluster CA: {exc}") from None
    if not chain:
        raise PeerError(f"{address} sent no certificate")
    leaf = chain[0]
    for cert in chain:
        if ca_fingerprint(cert) != pin:
            continue
        try:
            verify_issued(cert, leaf)
        except InvalidInput as exc:
            raise PeerError(f"{address}: its certificate is not signed by the pinned CA: {exc}") from None
        return cert.public_bytes(serialization.Encoding.PEM)
    raise PeerError(f"{address} does not present a CA matching the token's pin {pin[:19]}…: "
                    "wrong cluster, a stale token, or someone in the middle")


def _unverified_chain(tls: ssl.SSLSocket) -> list[x509.Certificate]:
    public = getattr(tls, "get_unverified_chain", None)  # Python 3.13+
    if public is not None:
        ders = [c if isinstance(c, bytes) else c.public_bytes(ssl._ssl.ENCODING_DER) for c in public() or []]
    else:  # 3.11/3.12 have the same method on the underlying object
        ders = [c.public_bytes(ssl._ssl.ENCODING_DER) for c in tls._sslobj.get_unverified_chain() or []]
    return [x509.load_der_x509_certificate(d) for d in ders]


def reloadable_server_credentials(current: Callable[[], TlsIdentity], *,
                                  require_client_auth: bool) -> grpc.ServerCredentials:
    """Server credentials that present `current()`'s certificate from the next handshake on (a renewed node
    certificate takes effect without a restart; handshakes already made keep theirs)."""
    served = [current()]

    def config(identity: TlsIdentity) -> Any:
        return grpc.ssl_server_certificate_configuration([(identity.key_pem, identity.chain_pem)],
                                                         root_certificates=identity.ca_pem)

    def fetch() -> Any:
        identity = current()
        if identity is served[0]:
            return None  # unchanged
        served[0] = identity
        return config(identity)

    return grpc.dynamic_ssl_server_credentials(config(served[0]), fetch,
                                               require_client_authentication=require_client_auth)


def add_secure_ports(server: grpc.aio.Server, identity: TlsIdentity, *, listen: str,
                     token_listen: str | None,
                     current: Callable[[], TlsIdentity] | None = None) -> tuple[int, int | None]:
    """Bind the mutual-TLS port and, if given, the token port; returns the bound port numbers.

    With `current`, both ports present whatever identity it returns at each handshake (renewal)."""
    if current is not None:
        mutual = reloadable_server_credentials(current, require_client_auth=True)
        token_creds = reloadable_server_credentials(current, require_client_auth=False)
    else:
        mutual, token_creds = server_credentials(identity), token_server_credentials(identity)
    port = server.add_secure_port(listen, mutual)
    if port == 0:
        raise NotAvailable(f"cannot listen on {listen}")
    token_port = None
    if token_listen:
        token_port = server.add_secure_port(token_listen, token_creds)
        if token_port == 0:
            raise NotAvailable(f"cannot listen on {token_listen}")
    return port, token_port


def http_ssl_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    """Server TLS for the HTTP side (/v1/, /metrics), from operator-provided PEM files."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert_path), str(key_path))
    except (OSError, ssl.SSLError) as exc:
        raise InvalidInput(f"cannot load the HTTPS certificate and key: {exc}", where=str(cert_path)) from None
    return ctx
