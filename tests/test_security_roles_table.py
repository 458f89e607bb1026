"""docs/security.md's table of who may call each RPC, and its threat model, agree with the code (issue 13)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from agentd.security.auth import DEFAULT_RULES, NON_MEMBER_METHODS, AuthInterceptor

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "security.md").read_text()


def section(title: str) -> str:
    start = DOC.index(f"## {title}")
    end = DOC.find("\n## ", start + 1)
    return DOC[start:end if end > 0 else None]


def table_rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("| `/")]


def documented_roles() -> dict[str, frozenset[str]]:
    rows = table_rows(section("Who may call what (gRPC)"))
    return {row[0].strip("`"): frozenset(r.strip() for r in row[1].split(",")) for row in rows}


def served_methods() -> list[str]:
    """Every RPC of every service the generated code in agentd/v1 defines (a new proto gets checked too)."""
    out = []
    for path in sorted((ROOT / "agentd" / "v1").glob("*_pb2.py")):
        module = importlib.import_module(f"agentd.v1.{path.stem}")
        for service in module.DESCRIPTOR.services_by_name.values():
            out += [f"/{service.full_name}/{m.name}" for m in service.methods]
    return out


def test_every_rpc_has_a_row_and_each_row_says_what_the_code_does():
    table = documented_roles()
    assert len(table) >= 30
    missing = [m for m in served_methods() if m not in table]
    assert not missing, f"RPCs without a row in docs/security.md: {missing}"
    interceptor = AuthInterceptor(lambda token: None)
    wrong = {m: (sorted(roles), sorted(interceptor.roles_for(m))) for m, roles in table.items()
             if interceptor.roles_for(m) != roles}
    assert not wrong, f"docs/security.md says (first) what the code (second) does not: {wrong}"


def test_a_host_never_gets_an_admin_action():
    """The node role covers exactly the rows that say what a host may do, no admin write."""
    interceptor = AuthInterceptor(lambda token: None)
    node = {m for m in documented_roles() if "node" in interceptor.roles_for(m)}
    writes = {"Deploy", "Delete", "Scale", "Cordon", "Uncordon", "CreateApiKey", "CreateJoinToken",
              "RevokeApiKey", "RevokeCertificate", "ApproveNode", "RevokeJoinToken", "ListApiKeys"}
    assert not {m.rsplit("/", 1)[1] for m in node if "/Control/" in m or "/Security/" in m} & writes, node
    assert {"/agentd.v1.Raft/Join"} == NON_MEMBER_METHODS
    assert all(r.prefix.startswith("/") for r in DEFAULT_RULES)


def test_every_test_the_threat_model_names_exists():
    threat = section("Threat model")
    names = set(re.findall(r"`(test_[a-z0-9_]+)`", threat))
    assert len(names) >= 15
    sources = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    defined = set(re.findall(r"^(?:async )?def (test_[a-z0-9_]+)", sources, re.M))
    assert not names - defined, f"the threat model names tests that do not exist: {sorted(names - defined)}"
    for actor in ("tenant", "operator", "a host", "holder of a join token", "someone on the network",
                  "local user"):
        assert f"**{actor}" in threat, actor
