"""Ray's TLS for a secure multi-host instance: a CA of the instance's own that every agent derives.

Ray's token (process.ray_auth_token) authenticates but travels in the clear; Ray's TLS (`RAY_USE_TLS=1`)
encrypts every gRPC connection between its processes and makes both ends show a certificate from
`RAY_TLS_CA_CERT` (mutual TLS). Which CA: not the cluster CA. Its key is on the signing hosts only, so a host
cannot issue a certificate for an instance, and a node certificate it did issue is trusted by every other
instance's Ray alike. Instead each instance has its own CA whose P-256 key is derived from the instance's key
(HMAC-SHA512(instance key, "agentd-ray-tls-ca"), reduced modulo the group order), which exactly the agents of
the cluster can derive, like the Ray token. Each host makes the same CA (same key, same subject) and issues its
own node a certificate for its address with a fresh key that never leaves it. So a Ray process of another
instance, an agentd node certificate or anything not derived from this instance's key is refused at the
handshake, and the token then travels encrypted. Nothing here is stronger than the instance key, which is what
the token already rests on.

The files go into the instance's work dir (0700): `ray-tls/ca.crt`, `node.crt`, `node.key` (0600), named by
environment variables, never on a command line; they are removed with the instance.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TLS_DIR = "ray-tls"
CA_LABEL = b"agentd-ray-tls-ca"
# The CA is made again on every launch, so its own validity only has to cover the node certificates it signs.
VALIDITY = dt.timedelta(days=365)
BACKDATE = dt.timedelta(minutes=5)  # a host whose clock is a little behind still accepts a fresh certificate
RENEW_BEFORE = dt.timedelta(days=30)


def instance_ca_key(instance_key: str) -> ec.EllipticCurvePrivateKey:
    """The instance CA's key: the same on every host that can derive the instance key, unguessable elsewhere."""
    seed = int.from_bytes(hmac.new(instance_key.encode(), CA_LABEL, hashlib.sha512).digest(), "big")
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # of P-256
    return ec.derive_private_key(seed % (order - 1) + 1, ec.SECP256R1())


def _ca_name(instance_id: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "agentd"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"ray {instance_id}"[:64])])


def instance_ca_cert(key: ec.EllipticCurvePrivateKey, instance_id: str, now: dt.datetime) -> x509.Certificate:
    name = _ca_name(instance_id)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))


def node_cert(ca_key: ec.EllipticCurvePrivateKey, instance_id: str, node_key: ec.EllipticCurvePrivateKey,
              address: str, now: dt.datetime) -> x509.Certificate:
    """A Ray node's certificate: server and client (Ray dials and is dialled), valid for the node's address.

    gRPC checks the address a client dials against the server's SANs; the address is put in both as an IP and as
    a DNS name, the form Ray's own test certificates use."""
    try:
        sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(address))]
    except ValueError:
        sans = []
    sans.append(x509.DNSName(address))
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, address)]))
            .issuer_name(_ca_name(instance_id)).public_key(node_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write then rename (a Ray process starting meanwhile reads the old file or the new one, never half)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _still_good(directory: Path, ca: x509.Certificate, address: str, now: dt.datetime) -> bool:
    """The node's files from an earlier launch, issued by this instance's CA for this address, not near expiry."""
    try:
        cert = x509.load_pem_x509_certificate((directory / "node.crt").read_bytes())
        key = serialization.load_pem_private_key((directory / "node.key").read_bytes(), password=None)
        cert.verify_directly_issued_by(ca)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    same_key = key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo) == \
        cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return same_key and address in sans.get_values_for_type(x509.DNSName) and \
        cert.not_valid_after_utc - now > RENEW_BEFORE


def write_node_tls(work_dir: Path, instance_key: str, instance_id: str, address: str) -> dict[str, Path]:
    """This host's Ray TLS files for the instance (kept from an earlier launch while still good): paths by role.

    A restart keeps the node's key and certificate, so a Ray process that reads them while another part of the
    instance is relaunched never sees a certificate and a key from two different launches."""
    directory = work_dir / TLS_DIR
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    now = dt.datetime.now(dt.UTC)
    ca_key = instance_ca_key(instance_key)
    ca = instance_ca_cert(ca_key, instance_id, now)
    paths = {"ca": directory / "ca.crt", "cert": directory / "node.crt", "key": directory / "node.key"}
    if not _still_good(directory, ca, address, now):
        key = ec.generate_private_key(ec.SECP256R1())
        _write(paths["key"], key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()), 0o600)
        _write(paths["cert"], node_cert(ca_key, instance_id, key, address, now).public_bytes(
            serialization.Encoding.PEM), 0o600)
    _write(paths["ca"], ca.public_bytes(serialization.Encoding.PEM), 0o600)
    return paths
