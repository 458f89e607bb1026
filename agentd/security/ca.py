"""The cluster CA: one ECDSA P-256 key that signs every node and admin certificate.

Why our own CA rather than the system trust store: peers must trust exactly the
hosts of this cluster and nothing else, and the role a certificate grants
(node or admin) must be something only the cluster can assert. The role is a
URI SAN, `agentd://role/node` or `agentd://role/admin`; gRPC hands the peer's
PEM certificate to the server, so the server reads the role from a field
the CA signed, never from anything the client merely claims.

Trust is pinned by the SHA-256 of the CA's SubjectPublicKeyInfo (as kubeadm's
`--discovery-token-ca-cert-hash`): a joining host that knows the pin can
recognise the real CA without having a copy of it yet.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agentd.errors import InvalidInput, NotAvailable
from agentd.security.channel import NODE_SAN  # in every node certificate; peers verify against it

ROLE_NODE = "node"
ROLE_ADMIN = "admin"
ROLES = (ROLE_NODE, ROLE_ADMIN)
ROLE_URI_PREFIX = "agentd://role/"

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CA_VALIDITY_DAYS = 3650
LEAF_VALIDITY_DAYS = 365
# Clocks on a rack drift; a certificate valid from "now" would be refused for
# a few seconds by a peer whose clock is behind.
BACKDATE = dt.timedelta(minutes=5)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")


@dataclass(frozen=True)
class CertificateAuthority:
    """The CA certificate, and its key on hosts allowed to sign (None elsewhere)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey | None = None

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def fingerprint(self) -> str:
        return ca_fingerprint(self.cert)

    def signing_key(self) -> ec.EllipticCurvePrivateKey:
        if self.key is None:
            raise NotAvailable("this host holds only the CA certificate, not its key: it cannot sign certificates")
        return self.key


@dataclass(frozen=True)
class IssuedIdentity:
    """A key and the certificate the CA issued for it, both PEM."""

    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def ca_fingerprint(cert: x509.Certificate) -> str:
    """`sha256:<hex>` of the certificate's SubjectPublicKeyInfo: the pin a joining host checks."""
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(spki).hexdigest()


def check_name(name: str, what: str = "node name") -> str:
    if not NAME_RE.fullmatch(name or ""):
        raise InvalidInput(f"{what} {name!r} must be 1-63 characters of letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit")
    return name


# ---------------------------------------------------------------- creating a CA


def create_ca(*, name: str = "agentd cluster CA", now: dt.datetime | None = None,
              validity_days: int = CA_VALIDITY_DAYS) -> CertificateAuthority:
    now = now or utcnow()
    key = new_private_key()
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "agentd"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=validity_days))
        # path_length=0: this CA signs leaves only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(cert=cert, key=key)


def init_ca(directory: Path, *, name: str = "agentd cluster CA", now: dt.datetime | None = None,
            force: bool = False) -> CertificateAuthority:
    """Create the cluster CA in `directory` (ca.crt, and ca.key readable by the owner only).

    Refuses to replace an existing CA unless `force`: every certificate the old
    one signed would stop being trusted, which splits the cluster.
    """
    directory = Path(directory)
    if not force and ((directory / CA_KEY).exists() or (directory / CA_CERT).exists()):
        raise InvalidInput(f"a cluster CA already exists in {directory}; replacing it would make every certificate "
                           "it signed untrusted (use --force to do it anyway)")
    ca = create_ca(name=name, now=now)
    write_private(directory / CA_KEY, key_pem(ca.signing_key()))
    write_public(directory / CA_CERT, ca.cert_pem)
    return ca


def load_ca(directory: Path, *, need_key: bool = False) -> CertificateAuthority:
    directory = Path(directory)
    cert_path = directory / CA_CERT
    if not cert_path.is_file():
        raise NotAvailable(f"no cluster CA certificate at {cert_path}: run 'agentd init-ca' on the first host, "
                           "or join with a token")
    cert = load_cert(cert_path)
    key = None
    key_path = directory / CA_KEY
    if key_path.is_file():
        key = load_key(key_path)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or _spki(key.public_key()) != _spki(cert.public_key()):
            raise InvalidInput("the CA key does not belong to the CA certificate", where=str(key_path))
    elif need_key:
        raise NotAvailable(f"no CA key at {key_path}: certificates can only be issued on a host that holds it")
    return CertificateAuthority(cert=cert, key=key)


# ---------------------------------------------------------------- issuing leaves


def split_addresses(addresses: Iterable[str]) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """DNS names and IPs from "host", "host:port", "[v6]:port" strings; ports are dropped."""
    dns: list[str] = []
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for raw in addresses:
        host = raw.strip()
        if not host:
            continue
        if host.startswith("["):
            host = host[1:].split("]", 1)[0]
        elif host.count(":") == 1:
            host = host.rsplit(":", 1)[0]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            if not _DNS_RE.fullmatch(host):
                raise InvalidInput(f"{raw!r} is neither an IP address nor a DNS name") from None
            if host not in dns:
                dns.append(host)
        else:
            if ip not in ips:
                ips.append(ip)
    return dns, ips


def make_csr(key: ec.EllipticCurvePrivateKey, name: str, addresses: Iterable[str] = ()) -> bytes:
    """A certificate request for a joining host; its private key never leaves the host."""
    check_name(name)
    dns, ips = split_addresses([name, *addresses])
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns] + [x509.IPAddress(i) for i in ips]
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def sign_csr(ca: CertificateAuthority, csr_pem: bytes, *, role: str = ROLE_NODE, now: dt.datetime | None = None,
             validity_days: int = LEAF_VALIDITY_DAYS, expected_name: str | None = None) -> bytes:
    """Sign a host's CSR. The role is the caller's decision; any role the CSR asks for is ignored.

    Only DNS and IP SANs are copied from the request, so a joining host cannot
    make itself an admin through a URI SAN of its own.
    """
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise InvalidInput(f"not a PEM certificate request: {exc}") from None
    if not csr.is_signature_valid:
        raise InvalidInput("the certificate request's signature does not match its key")
    _check_public_key(csr.public_key())
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise InvalidInput("the certificate request must have exactly one common name (the node name)")
    name = check_name(str(names[0].value))
    if expected_name is not None and name != expected_name:
        raise InvalidInput(f"the certificate request is for {name!r}, but this token is bound to {expected_name!r}")
    dns: list[str] = []
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = [d for d in san.get_values_for_type(x509.DNSName) if _DNS_RE.fullmatch(d)]
        ips = list(san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        pass
    return _issue(ca, csr.public_key(), name, role, dns, ips, now=now, validity_days=validity_days)


def issue_identity(ca: CertificateAuthority, name: str, *, role: str, addresses: Iterable[str] = (),
                   now: dt.datetime | None = None, validity_days: int = LEAF_VALIDITY_DAYS) -> IssuedIdentity:
    """A fresh key and certificate, for hosts and admins set up on the CA host itself."""
    check_name(name, "certificate name")
    key = new_private_key()
    dns, ips = split_addresses([name, *addresses]) if role == ROLE_NODE else ([], [])
    cert = _issue(ca, key.public_key(), name, role, dns, ips, now=now, validity_days=validity_days)
    return IssuedIdentity(key_pem=key_pem(key), cert_pem=cert, ca_pem=ca.cert_pem)


def _issue(ca: CertificateAuthority, public_key, name: str, role: str, dns: list[str],
           ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address], *, now: dt.datetime | None,
           validity_days: int) -> bytes:
    if role not in ROLES:
        raise InvalidInput(f"unknown certificate role {role!r}: use one of {', '.join(ROLES)}")
    now = now or utcnow()
    not_after = min(now + dt.timedelta(days=validity_days), ca.cert.not_valid_after_utc)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(ROLE_URI_PREFIX + role)]
    sans += [x509.DNSName(d) for d in dns] + [x509.IPAddress(i) for i in ips]
    if role == ROLE_NODE and NODE_SAN not in dns:
        sans.append(x509.DNSName(NODE_SAN))
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role == ROLE_NODE:  # nodes are servers to their peers as well as clients
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "agentd"),
                                 x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                                 x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.cert.public_key()), critical=False)
    )
    cert = builder.sign(ca.signing_key(), hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM)


def _check_public_key(key) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1"):
            raise InvalidInput(f"elliptic curve {key.curve.name} is not accepted: use P-256 or P-384")
        return
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise InvalidInput(f"an RSA key of {key.key_size} bits is too weak: use at least 2048")
        return
    raise InvalidInput(f"unsupported key type {type(key).__name__}: use ECDSA P-256")


# ---------------------------------------------------------------- reading certificates


def cert_role(cert: x509.Certificate) -> str | None:
    """The role the CA granted (`node` / `admin`), or None for a certificate without one."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(ROLE_URI_PREFIX) and uri[len(ROLE_URI_PREFIX):] in ROLES:
            return uri[len(ROLE_URI_PREFIX):]
    return None


def cert_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def cert_issued_at(cert: x509.Certificate) -> float:
    """When agentd issued `cert` (unix seconds, whole): its start of validity is backdated by BACKDATE."""
    return (cert.not_valid_before_utc + BACKDATE).timestamp()


def verify_issued(ca_cert: x509.Certificate, cert: x509.Certificate, now: dt.datetime | None = None) -> None:
    """Raise InvalidInput unless `cert` was signed by `ca_cert` and is within its validity window."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise InvalidInput(f"certificate {cert_name(cert)!r} was not issued by this cluster's CA "
                           f"({exc or 'bad signature'})") from None
    now = now or utcnow()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        raise InvalidInput(f"certificate {cert_name(cert)!r} is not valid now "
                           f"(valid {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC)")


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except ValueError as exc:
        raise InvalidInput(f"not a PEM certificate: {exc}", where=str(path)) from None
    except OSError as exc:
        raise InvalidInput(f"cannot read: {exc.strerror}", where=str(path)) from None


def load_key(path: Path):
    try:
        return serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"not an unencrypted PEM private key: {exc}", where=str(path)) from None
    except OSError as exc:
        raise InvalidInput(f"cannot read: {exc.strerror}", where=str(path)) from None


def _spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


# ---------------------------------------------------------------- files


def write_private(path: Path, data: bytes) -> None:
    _write_atomic(Path(path), data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    _write_atomic(Path(path), data, 0o644)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write then rename, so a crash never leaves half a key; the mode is set before any byte is written."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def save_identity(directory: Path, name: str, identity: IssuedIdentity) -> None:
    """Write `<name>.key` (owner-only), `<name>.crt` and `ca.crt`: the layout tls.load_identity reads."""
    directory = Path(directory)
    write_private(directory / f"{name}.key", identity.key_pem)
    write_public(directory / f"{name}.crt", identity.cert_pem)
    write_public(directory / CA_CERT, identity.ca_pem)
