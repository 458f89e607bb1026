"""The two halves of `agentd join --token`, without the transport.

Joiner: `prepare_join` parses the token and makes a key and CSR locally (the
key never leaves the host); the daemon then fetches the CA with
`tls.fetch_pinned_ca(address, prepared.token.ca_pin)` and sends token id,
secret and CSR over TLS that trusts only that CA.

Signer: `check_token` first (cheap refusal), then the token is consumed
through the replicated store (`tokens.consume_token` applied as a Raft
entry), and only then `sign_csr` with role `node`. `approve_join` is that
sequence for a store held in one place, and the reference for the daemon.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from agentd.errors import InvalidInput
from agentd.security.ca import (
    ROLE_NODE,
    CertificateAuthority,
    check_name,
    key_pem,
    make_csr,
    new_private_key,
    sign_csr,
)
from agentd.security.tokens import (
    JoinTokenRecord,
    ParsedToken,
    TokenDecision,
    TokenStore,
    consume_token,
    hash_secret,
    parse_join_token,
)


@dataclass(frozen=True)
class JoinPreparation:
    token: ParsedToken
    node_name: str
    key_pem: bytes
    csr_pem: bytes


def prepare_join(token_text: str, node_name: str, addresses: Iterable[str] = ()) -> JoinPreparation:
    token = parse_join_token(token_text)
    check_name(node_name)
    key = new_private_key()
    return JoinPreparation(token=token, node_name=node_name, key_pem=key_pem(key),
                           csr_pem=make_csr(key, node_name, addresses))


def csr_node_name(csr_pem: bytes) -> str:
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise InvalidInput(f"not a PEM certificate request: {exc}") from None
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise InvalidInput("the certificate request must have exactly one common name (the node name)")
    return check_name(str(names[0].value))


@dataclass(frozen=True)
class JoinOutcome:
    decision: TokenDecision
    cert_pem: bytes | None = None
    ca_pem: bytes | None = None


def approve_join(ca: CertificateAuthority, store: TokenStore, *, token_id: str, secret: str, csr_pem: bytes,
                 now: float) -> tuple[dict[str, JoinTokenRecord], JoinOutcome]:
    """Consume the token and sign the CSR as a node certificate; the store changes only if both succeed."""
    name = csr_node_name(csr_pem)
    new_store, decision = consume_token(store, token_id, hash_secret(token_id, secret), now=now, node_name=name)
    if not decision.ok:
        return dict(store), JoinOutcome(decision)
    cert = sign_csr(ca, csr_pem, role=ROLE_NODE, now=dt.datetime.fromtimestamp(now, dt.UTC), expected_name=name)
    return new_store, JoinOutcome(decision, cert, ca.cert_pem)
