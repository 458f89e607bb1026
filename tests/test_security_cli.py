"""`agentd init-ca`, `agentd certs issue` and `agentd keys`: the CLI code in-process, one real subprocess."""

from __future__ import annotations

import json
import stat

import pytest

from agentd.cli.main import main
from agentd.security.tls import load_identity
from tests.conftest import run_cli


@pytest.fixture
def cli(capsys):
    def run(*args: str) -> tuple[int, str, str]:
        rc = main(list(args))
        out, err = capsys.readouterr()
        return rc, out, err
    return run


def test_init_ca_then_admin_certificate(tmp_path, monkeypatch, cli):
    monkeypatch.setenv("AGENTD_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("AGENTD_NODE_NAME", "gpu-1")
    rc, out, err = cli("init-ca", "--address", "10.0.0.5", "--json")
    assert rc == 0, err
    out = json.loads(out)
    assert out["ca_pin"].startswith("sha256:") and out["node"] == "gpu-1"
    tls = tmp_path / "tls"
    assert stat.S_IMODE((tls / "ca.key").stat().st_mode) == 0o600
    node = load_identity(tls)
    assert (node.name, node.role) == ("gpu-1", "node")
    rc, _, err = cli("init-ca")
    assert rc == 2 and "already exists" in err
    rc, out, err = cli("certs", "issue", "--name", "alice", "--out", str(tmp_path / "alice"))
    assert rc == 0 and "issued an admin certificate for alice" in out, err
    assert load_identity(tmp_path / "alice", "admin").role == "admin"
    rc, _, err = cli("certs", "issue", "--name", "x", "--out", str(tmp_path / "x"), "--ca-dir", str(tmp_path / "no"))
    assert rc == 3 and "init-ca" in err


def test_keys_and_tokens_check_their_input_before_calling_the_cluster(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    rc, _, err = cli("keys", "create", "--tenant", "acme", "--expires", "soon")
    assert rc == 2 and "90d" in err
    rc, _, err = cli("token", "create", "--ttl", "forever")
    assert rc == 2 and "--ttl" in err
    for lifetime in ("0s", "0d", "nand", "infd", "-1d"):  # each would give a key that never expires
        rc, _, err = cli("keys", "create", "--tenant", "acme", "--expires", lifetime)
        assert rc == 2 and "--expires" in err, (lifetime, err)
    rc, _, err = cli("token", "create", "--ttl", "0s")
    assert rc == 2 and "positive" in err
    rc, _, err = cli("join", "--token", "not-a-token", "--server", "127.0.0.1:1", "--dir", str(tmp_path / "j"))
    assert rc == 2 and "<8 chars>.<32 chars>.<64 hex digits>" in err
    rc, _, err = cli("join", "--token", "abcdefgh." + "a" * 32 + "." + "0" * 64, "--server", "nowhere")
    assert rc == 2 and "HOST:PORT" in err


def test_keys_without_a_cluster_say_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    r = run_cli("keys", "ls", "--server", "127.0.0.1:1", env={"HOME": str(tmp_path)})
    assert r.returncode == 3 and "not available" in r.stderr and "AGENTD_TOKEN" in r.stderr
    r = run_cli("keys", "ls", "--server", "127.0.0.1:1", env={"HOME": str(tmp_path), "AGENTD_TOKEN": "agd_x"})
    assert r.returncode == 2 and "no cluster CA certificate" in r.stderr


def test_serve_without_certificates_says_what_to_run(tmp_path):
    r = run_cli("serve", "--data-dir", str(tmp_path), "--node-name", "n1", "--listen", "127.0.0.1:7",
                "--http-listen", "127.0.0.1:9", env={"HOME": str(tmp_path)})
    assert r.returncode == 3, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert "agentd init-ca" in line and "agentd join --token" in line and "--insecure" in line
    r = run_cli("serve", "--data-dir", str(tmp_path), "--listen", "0.0.0.0:7070", env={"HOME": str(tmp_path)})
    assert r.returncode == 2 and "wildcard" in r.stderr and "advertise" in r.stderr
