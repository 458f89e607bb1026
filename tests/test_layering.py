"""DESIGN.md §2: imports point downward only. The placement core does no I/O."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "agentd"
PLUGINS = PKG.parent / "plugins"

FORBIDDEN = {
    "placement": {"asyncio", "grpc", "pynvml", "psutil", "subprocess", "socket", "aiohttp", "gc",
                  "agentd.cluster", "agentd.runtime", "agentd.api", "agentd.inventory", "agentd.daemon",
                  "agentd.agent"},
    "modelinfo": {"asyncio", "grpc", "aiohttp", "agentd.cluster", "agentd.runtime", "agentd.api",
                  "agentd.placement"},
    "inventory": {"agentd.placement", "agentd.cluster", "agentd.runtime", "agentd.api"},
    "cluster": {"agentd.runtime", "agentd.api", "agentd.daemon", "agentd.agent"},
    "runtime": {"agentd.cluster", "agentd.api", "agentd.daemon", "agentd.agent"},
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


# A runtime plugin imports agentd.plugins.api and agentd.types, nothing else of agentd (issue 15): the
# rest of agentd may be refactored freely. Checked on every plugin distribution under plugins/.
PLUGIN_MAY_IMPORT = ("agentd.plugins.api", "agentd.types")
# The API module itself sits just above the types layer (DESIGN.md section 2).
API_MAY_IMPORT = ("agentd.types", "agentd.errors")


def _agentd_imports_outside(files, allowed) -> list[str]:
    bad = []
    for f in files:
        for mod in imported_modules(f):
            if (mod == "agentd" or mod.startswith("agentd.")) and mod not in allowed:
                bad.append(f"{f} imports {mod}")
    return bad


def _plugin_sources(root: Path) -> list[Path]:
    return sorted(f for f in root.rglob("*.py") if "tests" not in f.relative_to(root).parts)


def test_plugins_import_only_the_plugin_api():
    files = _plugin_sources(PLUGINS)
    assert len({f.relative_to(PLUGINS).parts[0] for f in files}) >= 2  # the check sees the built-in plugins
    assert _agentd_imports_outside(files, PLUGIN_MAY_IMPORT) == []


def test_the_plugin_api_imports_only_the_types_layer():
    assert _agentd_imports_outside([PKG / "plugins" / "api.py"], API_MAY_IMPORT) == []


def test_the_plugin_check_catches_a_private_import(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "x.py").write_text(
        "from agentd.plugins.api import hookimpl\nfrom agentd.types import ModelInfo\n"
        "def f():\n    from agentd.runtime.binaries import find_binary\n")
    files = _plugin_sources(tmp_path)
    assert [b.split(" imports ")[1] for b in _agentd_imports_outside(files, PLUGIN_MAY_IMPORT)] == \
        ["agentd.runtime.binaries"]


def test_the_check_itself_catches_a_violation(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import subprocess\nfrom grpc import aio\n")
    assert imported_modules(f) == {"subprocess", "grpc"}


# agentd.demo runs a LocalCluster on purpose (`scripts/demo`); nothing else in production imports test code. The
# agent loads test hooks only through its one seam (agentd.agent.wiring.load_test_hooks, by module name).
USES_TEST_CODE = {"agentd/demo.py"}


def test_production_modules_do_not_import_the_testing_package():
    bad = []
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG.parent).as_posix()
        if rel.startswith("agentd/testing/") or rel in USES_TEST_CODE:
            continue
        bad += [f"{rel} imports {m}" for m in imported_modules(f) if m == "agentd.testing" or
                m.startswith("agentd.testing.")]
    assert bad == []
