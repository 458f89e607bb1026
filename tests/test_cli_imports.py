"""What a client command loads (issue 16, item 5: the CLI starts fast).

Start-up time is measured by benchmarks/cli_startup.py, never asserted here; what these tests pin is its cause:
each command line runs in a fresh `python` process, and the modules it imported are read from its sys.modules
after `main()` returned. The heavy ones are the configuration loader (pydantic, pydantic-settings), the
`cryptography` package (reading an admin certificate), the placement core, the plugin manager and the daemon's
dependencies. The mTLS tests run against a real agent and also check that bad admin credentials are still
refused in the words of `agentd.security.tls.load_identity`, which the client now runs only after a failed call.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys

import pytest

from agentd.testing.localcluster import LocalCluster, free_port, simulated_host
from tests.conftest import ROOT

# Loaded by no client command (a module counts with its submodules).
HEAVY = ("pydantic", "pydantic_settings", "pydantic_core", "cryptography", "agentd.config", "agentd.placement",
         "agentd.plugins", "agentd.security.tls", "agentd.security.ca", "agentd.types", "agentd.modelinfo",
         "pluggy", "psutil", "yaml", "aiohttp", "importlib.metadata", "email")
# ... and `agentd version` loads none of the client's machinery either.
CLIENT = ("grpc", "google.protobuf", "agentd.v1", "agentd.api", "logging", "asyncio", "ssl",
          "dataclasses", "inspect")  # agentd.version's values are written out, not @dataclass (inspect: ~12 ms)

SCRIPT = """
import json, sys
from agentd.cli import main
try:
    rc = main(sys.argv[2:])
finally:  # also after argparse's SystemExit (--help)
    with open(sys.argv[1], "w") as f:
        json.dump(sorted(sys.modules), f)
sys.exit(rc)
"""


def _run(tmp_path, *argv: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, set[str]]:
    out = tmp_path / "modules.json"
    out.unlink(missing_ok=True)
    (tmp_path / "empty.toml").touch()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    # No config file of this machine's, no certificates in ~/.config/agentd/tls.
    full_env.update({"AGENTD_CONFIG": str(tmp_path / "empty.toml"), "HOME": str(tmp_path), **(env or {})})
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out), *argv], capture_output=True, text=True,
                          env=full_env, timeout=60, cwd=ROOT)
    assert out.exists(), proc.stderr  # else every "not loaded" below would hold vacuously
    return proc, set(json.loads(out.read_text()))


def _loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(f"{n}.") for n in names))


def test_version_loads_neither_the_client_nor_anything_heavy(tmp_path):
    proc, modules = _run(tmp_path, "version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("agentd ") and "plugin llamabox" in proc.stdout
    assert _loaded(modules, HEAVY + CLIENT) == []


def test_version_json_too(tmp_path):
    proc, modules = _run(tmp_path, "version", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["plugins"]
    assert _loaded(modules, HEAVY + CLIENT) == []


@pytest.mark.parametrize("argv", [["ps", "--help"], ["status", "--help"]])
def test_client_command_help_loads_nothing_heavy(tmp_path, argv):
    proc, modules = _run(tmp_path, *argv)
    assert proc.returncode == 0, proc.stderr
    assert "usage: agentd" in proc.stdout
    assert _loaded(modules, HEAVY) == []
    assert "agentd.cli.cluster" in modules and "agentd.cli.model" not in modules  # only the command's module


@pytest.mark.parametrize("command", ["ps", "status", "ls"])
def test_plaintext_client_command_loads_nothing_heavy(tmp_path, command):
    """Against a port nobody listens on: the whole path (settings, channel, call, error) without a server."""
    proc, modules = _run(tmp_path, command, env={"AGENTD_INSECURE": "1",
                                                 "AGENTD_SERVER": f"127.0.0.1:{free_port()}"})
    assert proc.returncode == 3 and "is not available" in proc.stderr, proc.stderr
    assert _loaded(modules, HEAVY) == []
    assert "grpc" in modules  # the test would pass vacuously if the call had not been made


# ------------------------------------------------------------------------------------------- mutual TLS, real agent


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("cli-imports"), hosts=[simulated_host("a", gpus=1, gpu_gib=24)],
                     secure=True)
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.mark.slow
@pytest.mark.parametrize("command,expect", [("ps", "INSTANCE"), ("status", "node:         a"), ("nodes", "ADDRESS")])
def test_mtls_client_command_loads_no_cryptography(secure, tmp_path, command, expect):
    proc, modules = _run(tmp_path, command, env={"AGENTD_TLS_DIR": str(secure.admin_dir),
                                                 "AGENTD_SERVER": secure.agents["a"].listen})
    assert proc.returncode == 0, proc.stderr
    assert expect in proc.stdout
    assert _loaded(modules, HEAVY) == []


def _bad_admin_dir(secure, tmp_path, case: str):
    """A copy of the cluster's admin certificate directory, spoilt as `case` says."""
    from cryptography.hazmat.primitives import serialization

    from agentd.security.ca import (
        ROLE_ADMIN,
        create_ca,
        issue_identity,
        key_pem,
        load_ca,
        new_private_key,
        save_identity,
        utcnow,
    )

    d = tmp_path / case
    shutil.copytree(secure.admin_dir, d)
    ca = load_ca(secure.agents["a"].tls_dir, need_key=True)
    if case == "wrong-key":
        (d / "admin.key").write_bytes(key_pem(new_private_key()))
    elif case == "encrypted-key":
        key = serialization.load_pem_private_key((d / "admin.key").read_bytes(), password=None)
        (d / "admin.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.BestAvailableEncryption(b"secret")))
    elif case == "garbage-key":
        (d / "admin.key").write_text("not a key\n")
    elif case == "expired":
        save_identity(d, ROLE_ADMIN, issue_identity(ca, "old", role=ROLE_ADMIN,
                                                    now=utcnow() - dt.timedelta(days=800)))
    elif case == "other-ca-file":
        (d / "ca.crt").write_bytes(create_ca(name="another cluster").cert_pem)
    return d


@pytest.mark.slow
@pytest.mark.parametrize("case,file,words", [
    ("wrong-key", "admin.key", "the key does not belong to admin.crt"),
    ("encrypted-key", "admin.key", "not an unencrypted PEM private key"),
    ("garbage-key", "admin.key", "not an unencrypted PEM private key"),
    ("expired", "admin.crt", "is not valid now"),
    ("other-ca-file", "admin.crt", "was not issued by this cluster's CA"),
])
def test_bad_admin_credentials_are_refused_in_load_identitys_words(secure, tmp_path, case, file, words):
    d = _bad_admin_dir(secure, tmp_path, case)
    proc, _ = _run(tmp_path, "status", env={"AGENTD_TLS_DIR": str(d), "AGENTD_SERVER": secure.agents["a"].listen})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"agentd: error: {d / file}: ") and words in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1  # one line: nothing from gRPC's C core ("Invalid private key")


# ------------------------------------------------------------------------------ the one-command parser, in-process


def _helps(parser, path: str = "") -> dict[str, str]:
    """Every parser under `parser`, by command path, with its help text."""
    import argparse

    out = {path: parser.format_help()}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.update(_helps(sub, f"{path} {name}".strip()))
    return out


def test_a_command_parsed_alone_has_the_same_parsers_as_in_the_whole_parser(monkeypatch):
    """`agentd ps` builds only the `ps` parser (build_parser's `command`): each command's parsers, nested ones
    included, must read exactly as in the parser of every command."""
    from agentd.cli.main import COMMANDS, build_parser

    monkeypatch.setenv("COLUMNS", "100")
    whole = _helps(build_parser())
    for module, commands in COMMANDS.items():
        for command in commands:
            alone = _helps(build_parser([module], command))
            assert set(alone) - {""} == {p for p in whole if p == command or p.startswith(f"{command} ")}
            for path in set(alone) - {""}:
                assert alone[path] == whole[path], path
