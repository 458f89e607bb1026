"""gRPC client credentials for the cluster's TLS, from PEM bytes.

Every agentd client dials with these: the daemon's peers (through
agentd.security.tls, from a checked `TlsIdentity`) and the CLI (from the
admin certificate's files, unparsed). This module imports nothing at load
(grpc when credentials are built), so the CLI builds its channel without
loading `cryptography`, which cost more than a whole `agentd ps` call (issue
16: start-up time), and agentd.security.ca takes NODE_SAN from here without
loading grpc into the tunnel processes.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from typing import Any

    import grpc

# Every node certificate also carries this DNS name, and peers verify each other's certificate against it
# (grpc.ssl_target_name_override): the chain to the cluster CA and the role are what authenticate a peer,
# so a host reached by an address its certificate does not list (a NAT, a renumbered host) still works.
# `.invalid` is reserved (RFC 2606): no real host can have this name. agentd.security.ca puts it in every
# node certificate.
NODE_SAN = "node.agentd.invalid"


def channel_credentials(ca_pem: bytes, *, key_pem: bytes | None = None, cert_pem: bytes | None = None,
                        bearer_token: str | None = None) -> grpc.ChannelCredentials:
    """Trust only the cluster CA; present a certificate when given one, and a bearer token when given one."""
    import grpc

    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem)
    if bearer_token:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(bearer_token))
    return creds


def channel_options(server_name: str = NODE_SAN) -> list[tuple[str, Any]]:
    """Verify the server's certificate as `server_name` whatever address is dialled.

    The default is the name every node certificate carries (NODE_SAN): a peer is authenticated by its chain
    to the cluster CA and its role, not by the address it was reached at.
    """
    return [("grpc.ssl_target_name_override", server_name)]
