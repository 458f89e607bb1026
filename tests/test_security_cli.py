"""`agentd init-ca`, `agentd certs issue` and `agentd keys`: the CLI code in-process, one real subprocess."""

from __future__ import annotations

import json
import stat

import pytest

from agentd.cli.main import main
from agentd.security import apikeys as K
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


def test_keys_create_ls_revoke(tmp_path, cli):
    store = tmp_path / "keys.json"
    rc, out, err = cli("keys", "create", "--tenant", "acme", "--model", "llama", "--name", "ci", "--store", str(store),
                       "--json")
    assert rc == 0, err
    created = json.loads(out)
    secret = created["key"]
    assert secret not in store.read_text(), "only the hash is stored"
    principal = K.verify_key(K.load_store(store), secret, now=created["created_at"] + 1)
    assert principal is not None and principal.tenant == "acme" and principal.models == frozenset({"llama"})

    _, listed, _ = cli("keys", "ls", "--store", str(store))
    assert created["id"] in listed and "active" in listed and secret not in listed
    rc, out, _ = cli("keys", "revoke", created["id"], "--store", str(store))
    assert rc == 0 and "revoked" in out
    assert K.verify_key(K.load_store(store), secret, now=created["created_at"] + 2) is None
    assert "revoked" in cli("keys", "ls", "--store", str(store))[1]

    rc, _, err = cli("keys", "revoke", "nosuchkey0", "--store", str(store))
    assert rc == 2 and "keys ls" in err
    rc, _, err = cli("keys", "create", "--tenant", "acme", "--expires", "soon", "--store", str(store))
    assert rc == 2 and "90d" in err
    store.write_text("{broken")
    rc, _, err = cli("keys", "ls", "--store", str(store))
    assert rc == 2 and "keys.json" in err and "not valid JSON" in err


def test_keys_create_as_a_real_process_prints_the_key_once(tmp_path):
    config = tmp_path / "agentd.toml"
    config.write_text(f'data_dir = "{tmp_path}"\n')
    r = run_cli("keys", "create", "--tenant", "acme", env={"AGENTD_CONFIG": str(config)})
    assert r.returncode == 0, r.stderr
    secret = r.stdout.splitlines()[0]
    assert secret.startswith("agd_") and "only time" in r.stdout
    assert K.verify_key(K.load_store(tmp_path / "apikeys.json"), secret, now=2e9) is not None
