"""DESIGN.md §2: imports point downward only. The placement core does no I/O."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "agentd"

FORBIDDEN = {
    "placement": {"asyncio", "grpc", "pynvml", "psutil", "subprocess", "socket", "aiohttp",
                  "agentd.cluster", "agentd.runtime", "agentd.api", "agentd.inventory", "agentd.daemon"},
    "modelinfo": {"asyncio", "grpc", "aiohttp", "agentd.cluster", "agentd.runtime", "agentd.api",
                  "agentd.placement"},
    "inventory": {"agentd.placement", "agentd.cluster", "agentd.runtime", "agentd.api"},
    "cluster": {"agentd.runtime", "agentd.api", "agentd.daemon"},
    "runtime": {"agentd.cluster", "agentd.api", "agentd.daemon"},
}


def imported_modules(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module)
    return mods


def _violations(layer: str) -> list[str]:
    bad = []
    for f in sorted((PKG / layer).rglob("*.py")):
        for mod in imported_modules(f):
            for forbidden in FORBIDDEN[layer]:
                if mod == forbidden or mod.startswith(forbidden + "."):
                    bad.append(f"{f.relative_to(PKG.parent)} imports {mod}")
    return bad


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_downward(layer):
    assert _violations(layer) == []


def test_the_check_itself_catches_a_violation(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import subprocess\nfrom grpc import aio\n")
    assert imported_modules(f) == {"subprocess", "grpc"}
