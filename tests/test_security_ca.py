"""The cluster CA: certificates carry a signed role, CSRs cannot grant themselves one, files are private."""

from __future__ import annotations

import datetime as dt
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from agentd.errors import InvalidInput, NotAvailable
from agentd.security import ca as C
from agentd.security.tls import load_identity

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def authority():
    return C.create_ca(now=NOW)


def test_init_ca_writes_a_private_key_and_refuses_to_overwrite(tmp_path):
    ca = C.init_ca(tmp_path / "tls", now=NOW)
    key = tmp_path / "tls" / "ca.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "tls").stat().st_mode) == 0o700
    loaded = C.load_ca(tmp_path / "tls", need_key=True)
    assert loaded.fingerprint == ca.fingerprint
    assert ca.fingerprint.startswith("sha256:") and len(ca.fingerprint) == 7 + 64
    with pytest.raises(InvalidInput, match="already exists"):
        C.init_ca(tmp_path / "tls")
    assert C.init_ca(tmp_path / "tls", force=True).fingerprint != ca.fingerprint
    basic = loaded.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca and basic.path_length == 0


def test_load_ca_without_key_cannot_sign(tmp_path, authority):
    C.write_public(tmp_path / "ca.crt", authority.cert_pem)
    ca = C.load_ca(tmp_path)
    assert ca.key is None
    with pytest.raises(NotAvailable, match="cannot sign"):
        C.issue_identity(ca, "n1", role="node")
    with pytest.raises(NotAvailable, match="no CA key"):
        C.load_ca(tmp_path, need_key=True)
    with pytest.raises(NotAvailable, match="init-ca"):
        C.load_ca(tmp_path / "nowhere")


def test_a_mismatched_ca_key_is_refused(tmp_path, authority):
    C.write_public(tmp_path / "ca.crt", authority.cert_pem)
    C.write_private(tmp_path / "ca.key", C.key_pem(C.new_private_key()))
    with pytest.raises(InvalidInput, match="does not belong"):
        C.load_ca(tmp_path)


def test_node_certificate_has_role_sans_and_both_usages(authority):
    ident = C.issue_identity(authority, "gpu-1", role="node", addresses=["10.0.0.3:7070", "gpu-1.rack", "[::1]:1"],
                             now=NOW)
    cert = x509.load_pem_x509_certificate(ident.cert_pem)
    assert C.cert_role(cert) == "node" and C.cert_name(cert) == "gpu-1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"gpu-1", "gpu-1.rack", C.NODE_SAN}
    assert {str(i) for i in san.get_values_for_type(x509.IPAddress)} == {"10.0.0.3", "::1"}
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {u._name for u in eku} == {"serverAuth", "clientAuth"}
    C.verify_issued(authority.cert, cert, NOW)
    admin = x509.load_pem_x509_certificate(C.issue_identity(authority, "alice", role="admin", now=NOW).cert_pem)
    assert C.cert_role(admin) == "admin"
    assert [u._name for u in admin.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value] == ["clientAuth"]


def test_unknown_role_and_bad_names_are_refused(authority):
    with pytest.raises(InvalidInput, match="unknown certificate role"):
        C.issue_identity(authority, "n1", role="root")
    with pytest.raises(InvalidInput, match="node name"):
        C.make_csr(C.new_private_key(), "bad name; rm -rf /")
    with pytest.raises(InvalidInput, match="neither an IP"):
        C.issue_identity(authority, "n1", role="node", addresses=["not a host!"])


def test_sign_csr_ignores_a_requested_admin_role(authority):
    key = ec.generate_private_key(ec.SECP256R1())
    sneaky = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "n2")]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier("agentd://role/admin"),
                                                    x509.DNSName("n2")]), critical=False)
        .sign(key, hashes.SHA256())
        .public_bytes(C.serialization.Encoding.PEM)
    )
    cert = x509.load_pem_x509_certificate(C.sign_csr(authority, sneaky, role="node", now=NOW))
    assert C.cert_role(cert) == "node"
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)
    assert uris == ["agentd://role/node"]


def test_sign_csr_checks_name_binding_garbage_and_weak_keys(authority):
    csr = C.make_csr(C.new_private_key(), "n3", ["10.0.0.9"])
    with pytest.raises(InvalidInput, match="bound to 'n4'"):
        C.sign_csr(authority, csr, expected_name="n4")
    with pytest.raises(InvalidInput, match="not a PEM certificate request"):
        C.sign_csr(authority, b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    weak_csr = (x509.CertificateSigningRequestBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "n5")]))
                .sign(weak, hashes.SHA256()).public_bytes(C.serialization.Encoding.PEM))
    with pytest.raises(InvalidInput, match="too weak"):
        C.sign_csr(authority, weak_csr)


def test_leaf_never_outlives_the_ca_and_expiry_is_detected(authority):
    late = authority.cert.not_valid_after_utc - dt.timedelta(days=10)
    cert = x509.load_pem_x509_certificate(C.issue_identity(authority, "n1", role="node", now=late).cert_pem)
    assert cert.not_valid_after_utc == authority.cert.not_valid_after_utc
    with pytest.raises(InvalidInput, match="not valid now"):
        C.verify_issued(authority.cert, cert, authority.cert.not_valid_after_utc + dt.timedelta(days=1))


def test_certificate_from_another_ca_is_not_issued_by_ours(authority):
    other = C.create_ca(now=NOW)
    cert = x509.load_pem_x509_certificate(C.issue_identity(other, "n1", role="node", now=NOW).cert_pem)
    with pytest.raises(InvalidInput, match="not issued by this cluster's CA"):
        C.verify_issued(authority.cert, cert, NOW)


def test_identity_directory_round_trip_and_checks(tmp_path, authority):
    ident = C.issue_identity(authority, "n1", role="node", addresses=["127.0.0.1"])
    C.save_identity(tmp_path, "node", ident)
    assert stat.S_IMODE((tmp_path / "node.key").stat().st_mode) == 0o600
    loaded = load_identity(tmp_path)
    assert (loaded.name, loaded.role) == ("n1", "node")
    assert loaded.chain_pem.count(b"BEGIN CERTIFICATE") == 2
    (tmp_path / "node.key").write_bytes(C.key_pem(C.new_private_key()))
    with pytest.raises(InvalidInput, match="does not belong"):
        load_identity(tmp_path)
    with pytest.raises(NotAvailable, match=r"admin\.crt"):
        load_identity(tmp_path, "admin")
    other = C.issue_identity(C.create_ca(), "n1", role="node")
    C.save_identity(tmp_path / "x", "node", other)
    C.write_public(tmp_path / "x" / "ca.crt", authority.cert_pem)
    with pytest.raises(InvalidInput, match=r"node\.crt.*not issued"):
        load_identity(tmp_path / "x")
