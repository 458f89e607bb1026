"""Ray's TLS for a secure multi-host vLLM instance (issue 14 item 2): what the plugin hands Ray, without Ray.

Real Ray with these certificates (the cluster forms, strangers are refused at the handshake) is in
tests/test_vllm_multihost.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from agentd_vllm import process as vl
from agentd_vllm import ray_tls
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from agentd.errors import InvalidInput
from agentd.plugins.reserved import check_launch_options
from agentd.testing.launches import launch_context as ctx
from agentd.testing.launches import vllm_assignment

TLS_VARS = ("RAY_USE_TLS", "RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT")


def _settings(tmp_path: Path) -> dict:
    (tmp_path / "bin").mkdir(parents=True, exist_ok=True)
    (tmp_path / "bin" / "ray").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "ray").chmod(0o755)
    # A range below the kernel's ephemeral ports: outgoing connections of other jobs do not fill it.
    return {"vllm_binary": str(tmp_path / "bin" / "vllm"), "ray_port_range": (24000, 24999)}


def _launch_both(tmp_path: Path, key: str):
    a = vllm_assignment(["a", "b"], tp=2, pp=2).model_copy(update={"api_key": key})
    settings = _settings(tmp_path)
    head, serve = vl.agentd_launch(a, 0, ctx(tmp_path, **settings))
    [worker] = vl.agentd_launch(a, 1, ctx(tmp_path / "b", node="b", **settings))
    return a, head, serve, worker


def _cert(spec, var: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(spec.env[var]).read_bytes())


def test_secure_multi_host_gives_every_ray_process_mutual_tls_from_the_instance_ca(tmp_path):
    a, head, serve, worker = _launch_both(tmp_path, "agdsrv_k1")
    for spec in (head, serve, worker):
        assert spec.env["RAY_USE_TLS"] == "1" and spec.env["RAY_AUTH_MODE"] == "token"  # both, not one or the other
        key = Path(spec.env["RAY_TLS_SERVER_KEY"])
        assert key.stat().st_mode & 0o777 == 0o600 and key.parent.stat().st_mode & 0o777 == 0o700
        assert key.parent.parent.stat().st_mode & 0o777 == 0o700  # the instance's work dir
        assert not any(spec.env[v] in " ".join(spec.argv) for v in TLS_VARS[1:])
    # vllm serve (the Ray driver) shows its host's certificate, the one the head serves with.
    assert serve.env["RAY_TLS_SERVER_CERT"] == head.env["RAY_TLS_SERVER_CERT"]
    head_cert, worker_cert = _cert(head, "RAY_TLS_SERVER_CERT"), _cert(worker, "RAY_TLS_SERVER_CERT")
    # Each certificate names its own host's address (gRPC checks the dialled address against it) ...
    for cert, address in ((head_cert, "10.1.0.1"), (worker_cert, "10.1.0.2")):
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(i) for i in sans.get_values_for_type(x509.IPAddress)] == [address]
        assert sans.get_values_for_type(x509.DNSName) == [address]
    # ... and each host's CA, made on its own, accepts the other host's certificate: the same derived key.
    head_ca, worker_ca = _cert(head, "RAY_TLS_CA_CERT"), _cert(worker, "RAY_TLS_CA_CERT")
    assert head_ca.fingerprint(head_ca.signature_hash_algorithm) != worker_ca.fingerprint(
        worker_ca.signature_hash_algorithm)  # two certificates (own serial and signature) ...
    worker_cert.verify_directly_issued_by(head_ca)  # ... one key
    head_cert.verify_directly_issued_by(worker_ca)
    # The node keys are the hosts' own, not derived: not equal, and not the CA's.
    keys = {Path(s.env["RAY_TLS_SERVER_KEY"]).read_bytes() for s in (head, worker)}
    assert len(keys) == 2
    # Another instance (another instance key) has another CA: its Ray refuses this instance's certificates.
    _, other_head, _, _ = _launch_both(tmp_path / "other", "agdsrv_k2")
    with pytest.raises(InvalidSignature):
        worker_cert.verify_directly_issued_by(_cert(other_head, "RAY_TLS_CA_CERT"))
    vl.remove_ray_temp_dir(tmp_path / "other" / "work")
    vl.remove_ray_temp_dir(tmp_path / "other" / "b" / "work")
    # Removed with the instance.
    vl.agentd_stop(a, 0, ctx(tmp_path, **_settings(tmp_path)))
    vl.agentd_stop(a, 1, ctx(tmp_path / "b", node="b", **_settings(tmp_path)))
    assert not Path(head.env["RAY_TLS_SERVER_KEY"]).parent.exists()
    assert not Path(worker.env["RAY_TLS_SERVER_KEY"]).parent.exists()


def _public(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_instance_ca_key_is_derived_from_the_instance_key_only():
    assert _public(ray_tls.instance_ca_key("agdsrv_k1")) == _public(ray_tls.instance_ca_key("agdsrv_k1"))
    assert _public(ray_tls.instance_ca_key("agdsrv_k1")) != _public(ray_tls.instance_ca_key("agdsrv_k2"))


def test_a_relaunch_keeps_the_node_key_and_a_new_address_gets_a_new_certificate(tmp_path):
    """A part restarted while others of the instance run reads the same key and certificate (never a mixed pair)."""
    work = tmp_path / "work"
    first = ray_tls.write_node_tls(work, "agdsrv_k1", "qwen-r1-g0", "10.1.0.1")
    first_key, cert = first["key"].read_bytes(), first["cert"].read_bytes()
    again = ray_tls.write_node_tls(work, "agdsrv_k1", "qwen-r1-g0", "10.1.0.1")
    assert again["key"].read_bytes() == first_key and again["cert"].read_bytes() == cert
    moved = ray_tls.write_node_tls(work, "agdsrv_k1", "qwen-r1-g0", "10.1.0.9")
    key = moved["key"].read_bytes()
    assert key != first_key
    # A certificate left by another instance key in the same place is not reused.
    other = ray_tls.write_node_tls(work, "agdsrv_k2", "qwen-r1-g0", "10.1.0.9")
    assert other["key"].read_bytes() != key
    x509.load_pem_x509_certificate(other["cert"].read_bytes()).verify_directly_issued_by(
        x509.load_pem_x509_certificate(other["ca"].read_bytes()))


def test_insecure_multi_host_runs_ray_without_tls(tmp_path):
    _, head, serve, worker = _launch_both(tmp_path, "")
    for spec in (head, serve, worker):
        assert not set(TLS_VARS) & set(spec.env)
    assert not (tmp_path / "work" / ray_tls.TLS_DIR).exists()
    vl.remove_ray_temp_dir(tmp_path / "work")
    vl.remove_ray_temp_dir(tmp_path / "b" / "work")


@pytest.mark.parametrize("var", TLS_VARS)
def test_a_deploy_cannot_set_rays_tls_variables(var):
    with pytest.raises(InvalidInput, match=var):
        check_launch_options("vllm", (), {var: "0"}, vl.agentd_reserved_launch("vllm"))
