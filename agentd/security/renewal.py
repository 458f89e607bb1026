"""A host renews its own node certificate, through the cluster, long before it expires.

Certificates are valid for a year; a cluster that nobody touched used to stop
working on the day they ran out. Each agent checks its certificate (at start,
then hourly) and, once less than a third of its lifetime is left, makes a new
key and a certificate request for the same name and addresses, and sends it
with its current certificate to `Security/RenewCertificate` on the members
(the leader first), until a signer answers; a signer renews its own locally.
The signer issues a certificate only for the name the caller's certificate
carries, so a host can renew itself and nobody else. The new files replace
`node.crt` and `node.key`; the agent's servers present the new certificate
from the next handshake on, and new outgoing channels use it.

The pure parts are here; the daemon does the calls (`agentd.agent.renewer.CertificateRenewer`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

from cryptography import x509

from agentd.security.ca import NODE_SAN, cert_name, key_pem, make_csr, new_private_key

RENEW_FRACTION = 1 / 3  # renew once less than this share of the certificate's lifetime is left
CHECK_INTERVAL = 3600.0  # seconds between checks
RETRY_INTERVAL = 60.0  # after a failed attempt


@dataclass(frozen=True)
class RenewalRequest:
    name: str
    key_pem: bytes  # the new private key: it never leaves the host
    csr_pem: bytes


def renewal_due(cert_pem: bytes, now: dt.datetime, fraction: float = RENEW_FRACTION) -> str:
    """Why the certificate should be renewed now ("" when not yet): less than `fraction` of its life is left."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    left = end - now
    if left > (end - start) * fraction:
        return ""
    days = left.total_seconds() / 86400
    return (f"the certificate of {cert_name(cert)!r} expires on {end:%Y-%m-%d} ({days:.0f} days left, less than "
            f"{fraction:.0%} of its lifetime)")


def addresses_of(cert_pem: bytes) -> list[str]:
    """The DNS names and IPs a node certificate names, besides its node name and the shared NODE_SAN."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    name = cert_name(cert)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    dns = [d for d in sans.get_values_for_type(x509.DNSName) if d not in (name, NODE_SAN)]
    ips = [str(i) for i in sans.get_values_for_type(x509.IPAddress)
           if isinstance(i, (ipaddress.IPv4Address, ipaddress.IPv6Address))]
    return [*dns, *ips]


def renewal_request(cert_pem: bytes) -> RenewalRequest:
    """A new key and a request for the same name and addresses as the current certificate."""
    name = cert_name(x509.load_pem_x509_certificate(cert_pem))
    key = new_private_key()
    return RenewalRequest(name=name, key_pem=key_pem(key), csr_pem=make_csr(key, name, addresses_of(cert_pem)))
